"""Case 5: one GeneralizationMonitor evaluation against the cost of training samples.

The evaluation is timed through the callback's own machinery: a real (one-step)
``Trainer.fit`` draws the probes, sets every proxy up and evaluates twice (the warm-up);
then ``callback._evaluate`` is called directly. The unit of cost is the time to train on
one sample: plain SGD steps on batches of 128 with the same network and no Lightning
overhead (which would flatter the ratio). The breakdown comes from the same calls: the
shared forward pass and each proxy's ``statistics`` are wrapped in a stopwatch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from common import Sizes, cifar_resnet, random_images, row, seeded, time_round_robin
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gapwatch import GeneralizationMonitor

BATCH = 128
BUDGET = 2500  # training samples: 5% of a CIFAR-10 epoch


class Classifier(LightningModule):
    """Cross-entropy training of ``net`` with SGD and momentum."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return sgd(self)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of both the fit and the timed training steps."""
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _loader(num: int, seed: int) -> DataLoader:
    """Random CIFAR-shaped images with random labels, in batches of 128."""
    labels = torch.randint(10, (num,), generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(random_images(num, (3, 32, 32), seed), labels), BATCH)


def _fit(callback: GeneralizationMonitor, num_train: int) -> tuple[Trainer, Classifier]:
    """One real training step with the callback attached (probes, setup, two evaluations)."""
    model = Classifier(seeded(cifar_resnet).train())
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(model, _loader(num_train, 1), _loader(num_train // 2, 2))
    return trainer, model


def _stopwatch(spent: dict[str, float], name: str, run: Callable) -> Callable:
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return run(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start

    return timed


def _instrument(callback: GeneralizationMonitor) -> dict[str, float]:
    """Time the shared forward passes and every proxy of ``callback`` into the returned dict.

    A proxy that runs a probe's shared pass itself (``run_probe``) is charged for it:
    ``shared_forward`` is what the plain passes cost.
    """
    spent: dict[str, float] = {}
    callback._forward = _stopwatch(spent, "shared_forward", callback._forward)
    for proxy in callback.proxies:
        name = type(proxy).__name__
        proxy.statistics = _stopwatch(spent, name, proxy.statistics)
        proxy.run_probe = _stopwatch(spent, f"{name}.run_probe", proxy.run_probe)
    return spent


def _breakdown(spent: dict[str, float]) -> dict[str, float]:
    """Seconds per part: each proxy's passes moved out of ``shared_forward`` into its own."""
    parts = {name: seconds for name, seconds in spent.items() if ".run_probe" not in name}
    for name, seconds in spent.items():
        if ".run_probe" in name:
            parts["shared_forward"] -= seconds
            parts[name.removesuffix(".run_probe")] += seconds
    return parts


def _train_step(net: nn.Module, optimizer: torch.optim.Optimizer, batch: list[Tensor]) -> None:
    optimizer.zero_grad()
    F.cross_entropy(net(batch[0]), batch[1]).backward()
    optimizer.step()


def run(sizes: Sizes) -> list[dict[str, Any]]:
    """Suite time in training samples, in total and per part."""
    probe_size = sizes.pick(512, 64)
    callback = GeneralizationMonitor(normalization="output", probe_size=probe_size)
    trainer, model = _fit(callback, 2 * probe_size)
    spent = _instrument(callback)
    parts: list[dict[str, float]] = []

    def evaluate() -> None:
        spent.clear()
        callback._done_at = None  # _evaluate skips a step it has already evaluated
        callback._evaluate(trainer, model)
        parts.append(_breakdown(spent))

    trainee = seeded(cifar_resnet).train()
    optimizer = sgd(trainee)
    batch = next(iter(_loader(BATCH, 3)))
    _train_step(trainee, optimizer, batch)  # warm-up; the fit warmed the suite up
    timings = time_round_robin(
        {"suite": evaluate, "train_step": lambda: _train_step(trainee, optimizer, batch)},
        sizes,
        warm_up=False,
    )
    sample = timings.median("train_step") / BATCH
    breakdown = {
        f"{name}_in_samples": statistics.median(p[name] for p in parts) / sample
        for name in parts[0]
    }
    return [
        row(
            5,
            "monitor_suite",
            f"GeneralizationMonitor defaults but normalization='output', CIFAR ResNet-8, "
            f"3x32x32, probe_size={probe_size}, ablation layer {callback.proxies[-1].layer!r}",
            metrics={"suite_in_samples": BATCH * timings.ratio("suite", "train_step"), **breakdown},
            targets={"suite_in_samples": ("<=", BUDGET)},
            checks={"suite_logged_every_proxy": _logged_every_proxy(callback)},
            seconds={k: timings.median(k) for k in timings.seconds},
            note=f"cost in training samples: time / (time of one SGD step on {BATCH} / {BATCH}); "
            "layerwise normalization rejects residual nets by design; parts: medians",
        )
    ]


def _logged_every_proxy(callback: GeneralizationMonitor) -> bool:
    expected = {"test_loss", "sensitivity", "jacobian_norm", "normalized_train_loss"}
    return expected | {"ablation_zeta", "ablation_kappa"} <= set(callback.history[-1])
