"""Case 5: the GeneralizationMonitor's evaluations against the cost of training samples.

Two settings: the demo's digits CNN on real digits (1x8x8, every default) and a CIFAR-style
ResNet-8 on CIFAR-shaped noise (defaults but ``normalization="output"``, which residual
networks need). The unit of cost is the time to train on one sample: plain SGD steps on
batches of 128 with the same network and no Lightning overhead (which would flatter the
ratio).

*First evaluation*: what the suite adds before the first optimizer step, timed inside
real one-step ``Trainer.fit`` runs (a fresh callback and model each): drawing the probes,
setting every proxy up and evaluating at step 0 (``on_train_start``), with its parts
(``setup_cost.py``). Its median over the fits is compared with a *regular evaluation*:
``callback._evaluate`` called directly after the last fit, round-robin with the training
steps. The regular evaluation's breakdown comes from the same calls: the shared forward
pass and each proxy's ``statistics`` are wrapped in a stopwatch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from common import (
    Sizes,
    cifar_resnet,
    digits_split,
    random_images,
    row,
    seeded,
    time_round_robin,
)
from lightning.pytorch import LightningModule, Trainer
from setup_cost import stopwatch, timed_first_evaluation
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gapwatch import GeneralizationMonitor
from gapwatch.callbacks.unit_ablation import AblationProxy
from gapwatch.demo import digits_cnn

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


FIRST_TARGET = 1.5  # the first evaluation (setup + step 0) against a regular one


@dataclass(frozen=True)
class Setting:
    """One network and its data: what a suite is measured on."""

    label: str
    build: Callable[[], nn.Module]
    train: TensorDataset
    heldout: TensorDataset
    options: dict[str, Any] = field(default_factory=dict)
    suite_budget: float | None = None  # training samples, where the issue sets one


def settings(probe_size: int) -> list[Setting]:
    """The digits CNN on real digits and a CIFAR ResNet-8 on CIFAR-shaped noise."""
    train_x, train_y, heldout_x, heldout_y = digits_split(probe_size)
    return [
        Setting(
            "GeneralizationMonitor defaults, digits CNN, 1x8x8",
            digits_cnn,
            TensorDataset(train_x, train_y),
            TensorDataset(heldout_x, heldout_y),
        ),
        Setting(
            "GeneralizationMonitor defaults but normalization='output', CIFAR ResNet-8, 3x32x32",
            cifar_resnet,
            _noise(2 * probe_size, 1),
            _noise(probe_size, 2),
            {"normalization": "output"},
            BUDGET,
        ),
    ]


def _noise(num: int, seed: int) -> TensorDataset:
    """Random CIFAR-shaped images with random labels."""
    labels = torch.randint(10, (num,), generator=torch.Generator().manual_seed(seed))
    return TensorDataset(random_images(num, (3, 32, 32), seed), labels)


def _fit(callback: GeneralizationMonitor, setting: Setting) -> tuple[Trainer, Classifier]:
    """One real training step with the callback attached (probes, setup, two evaluations)."""
    model = Classifier(seeded(setting.build).train())
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
    loaders = (DataLoader(data, BATCH) for data in (setting.train, setting.heldout))
    trainer.fit(model, *loaders)
    return trainer, model


def _instrument(callback: GeneralizationMonitor) -> dict[str, float]:
    """Time the shared forward passes and every proxy of ``callback`` into the returned dict.

    A proxy that runs a probe's shared pass itself (``run_probe``) is charged for it:
    ``shared_forward`` is what the plain passes cost.
    """
    spent: dict[str, float] = {}
    callback._forward = stopwatch(spent, "shared_forward", callback._forward)
    for proxy in callback.proxies:
        name = type(proxy).__name__
        proxy.statistics = stopwatch(spent, name, proxy.statistics)
        proxy.run_probe = stopwatch(spent, f"{name}.run_probe", proxy.run_probe)
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
    """Suite time in training samples, first and regular evaluations, in total and per part."""
    probe_size = sizes.pick(512, 64)
    return [_measure(setting, probe_size, sizes) for setting in settings(probe_size)]


def _measure(setting: Setting, probe_size: int, sizes: Sizes) -> dict[str, Any]:
    firsts: list[dict[str, float]] = []
    first_ratios = []
    for _ in range(sizes.pick(3, 1)):
        callback = GeneralizationMonitor(probe_size=probe_size, **setting.options)
        with timed_first_evaluation(callback) as spent:
            trainer, model = _fit(callback, setting)
        firsts.append(spent)
        # Against regular evaluations right after it: a burst of outside load between the
        # fits and the round-robin below would otherwise land on one side of the ratio.
        regular_seconds = [_time_evaluation(callback, trainer, model) for _ in range(2)]
        first_ratios.append(spent["first_evaluation"] / statistics.median(regular_seconds))
    spent = _instrument(callback)
    parts: list[dict[str, float]] = []

    def evaluate() -> None:
        spent.clear()
        # _evaluate skips a step it has already evaluated (by global step and by logged step)
        callback._done_at = callback.last_step = None
        callback._evaluate(trainer, model)
        parts.append(_breakdown(spent))

    trainee = seeded(setting.build).train()
    optimizer = sgd(trainee)
    batch = next(iter(DataLoader(setting.train, BATCH, shuffle=False)))
    _train_step(trainee, optimizer, batch)  # warm-up; the fits warmed the suite up
    timings = time_round_robin(
        {"suite": evaluate, "train_step": lambda: _train_step(trainee, optimizer, batch)},
        sizes,
        warm_up=False,
    )
    sample = timings.median("train_step") / BATCH
    regular = {
        f"{name}_in_samples": statistics.median(p[name] for p in parts) / sample
        for name in parts[0]
    }
    first = {
        f"first.{name}_in_samples": statistics.median(f.get(name, 0.0) for f in firsts) / sample
        for name in firsts[0]
    }
    first_seconds = [f["first_evaluation"] for f in firsts]
    targets = {"first_vs_regular": ("<=", FIRST_TARGET)}
    if setting.suite_budget is not None:
        targets["suite_in_samples"] = ("<=", setting.suite_budget)
    return row(
        5,
        "monitor_suite",
        f"{setting.label}, probe_size={probe_size}, ablation layer {_ablated(callback)!r}",
        metrics={
            "suite_in_samples": BATCH * timings.ratio("suite", "train_step"),
            "first_in_samples": statistics.median(first_seconds) / sample,
            "first_vs_regular": statistics.median(first_ratios),
            **regular,
            **first,
        },
        targets=targets,
        checks={"suite_logged_every_proxy": _logged_every_proxy(callback)},
        seconds={
            **{k: timings.median(k) for k in timings.seconds},
            **{f"first_evaluation_fit{i}": s for i, s in enumerate(first_seconds)},
        },
        note=f"cost in training samples: time / (time of one SGD step on {BATCH} / {BATCH}); "
        f"first evaluation (setup + step 0): median of {len(firsts)} fits, each part a "
        "median (default_layer and split_model are inside AblationProxy.setup); "
        "first_vs_regular: median over the fits of the first evaluation over the median "
        "of 2 regular ones run right after it; "
        "layerwise normalization rejects residual nets by design; parts: medians",
    )


def _ablated(callback: GeneralizationMonitor) -> str | None:
    return next(p.layer for p in callback.proxies if isinstance(p, AblationProxy))


def _time_evaluation(callback: GeneralizationMonitor, trainer: Trainer, model: Classifier) -> float:
    """Seconds of one regular evaluation of ``callback`` (at the fit's last step)."""
    # _evaluate skips a step it has already evaluated (by global step and by logged step)
    callback._done_at = callback.last_step = None
    start = time.perf_counter()
    callback._evaluate(trainer, model)
    return time.perf_counter() - start


def _logged_every_proxy(callback: GeneralizationMonitor) -> bool:
    expected = {"test_loss", "sensitivity", "jacobian_norm", "normalized_train_loss"}
    return expected | {"ablation_zeta", "ablation_kappa"} <= set(callback.history[-1])
