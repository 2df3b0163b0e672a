"""Training runs of the GPU benchmark (``gpu.py``): the suite's cost, its memory, interference.

A CIFAR-shaped ResNet-18 (torchvision's, with a 3x3 stride-1 stem and no max-pool, or
torchvision's own stem in the reduced run) trains on synthetic 3x32x32 data with random
labels from a private generator, under a real Lightning ``Trainer``.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

# Before torch touches cuBLAS: deterministic algorithms need a fixed workspace.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import suite
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import resnet18

from gapwatch import GeneralizationMonitor


@dataclass(frozen=True)
class Config:
    """Sizes of one run: the issue's on the GPU, tiny ones with ``--reduced``."""

    device: str
    reduced: bool
    samples: int  # training samples per epoch
    batch: int
    val_samples: int
    probe_size: int
    precision: str
    stem: str  # "cifar" (3x3 stride 1, no max-pool) or "imagenet" (torchvision as is)
    plain_epochs: int
    monitored_epochs: int
    interference_steps: int

    @classmethod
    def of(cls, device: str, reduced: bool) -> Config:
        if reduced:
            precision = "bf16-mixed" if device.startswith("cuda") else "32-true"
            return cls(device, True, 32, 16, 16, 16, precision, "imagenet", 2, 1, 2)
        return cls(device, False, 50_000, 256, 1024, 512, "bf16-mixed", "cifar", 3, 2, 6)


def make_net(stem: str) -> nn.Module:
    net = resnet18(num_classes=10)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return net


class Classifier(suite.Classifier):
    """The suite benchmark's classifier on ``make_net(stem)``, with CIFAR's usual SGD."""

    def __init__(self, stem: str) -> None:
        super().__init__(make_net(stem))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def loader(config: Config, num: int, seed: int, *, shuffle: bool) -> DataLoader:
    """Synthetic CIFAR-shaped data with random labels from a private generator."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(num, 3, 32, 32, generator=generator)
    labels = torch.randint(10, (num,), generator=generator)
    cuda = config.device.startswith("cuda")
    workers = 4 if cuda else 0  # collation off the training thread on the GPU machine
    return DataLoader(
        TensorDataset(images, labels),
        config.batch,
        shuffle=shuffle,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=cuda,
    )


def trainer(config: Config, callbacks: list[Callback], **options: Any) -> Trainer:
    device = torch.device(config.device)
    return Trainer(
        accelerator=device.type,
        devices=[device.index or 0] if device.type == "cuda" else 1,
        precision=config.precision,  # type: ignore[arg-type]
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **options,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock(Callback):
    """Training-epoch times (synchronized) and one training step's peak memory."""

    def __init__(self, device: torch.device, peak_batch: int) -> None:
        self.device, self.peak_batch = device, peak_batch
        self.train_seconds: list[float] = []
        self.step_peak: dict[str, int] = {}
        self._start = 0.0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        sync(self.device)
        self._start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.peak_batch and self.device.type == "cuda" and not self.step_peak:
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step_peak["before_bytes"] = torch.cuda.memory_allocated(self.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        cuda = self.device.type == "cuda"
        if cuda and batch_idx == self.peak_batch and "peak_bytes" not in self.step_peak:
            sync(self.device)
            self.step_peak["peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
        if batch_idx + 1 == trainer.num_training_batches:
            sync(self.device)  # after the suite, which evaluates in this hook too
            self.train_seconds.append(time.perf_counter() - self._start)


def instrument(monitor: GeneralizationMonitor, device: torch.device) -> list[dict[str, Any]]:
    """Time (and measure the memory of) every evaluation of ``monitor`` into the list."""
    records: list[dict[str, Any]] = []
    evaluate = monitor._evaluate
    cuda = device.type == "cuda"

    def timed(trainer: Trainer, pl_module: LightningModule) -> None:
        done = len(monitor.history)
        sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            events[0].record()
        start = time.perf_counter()
        evaluate(trainer, pl_module)
        if cuda:
            events[1].record()
        sync(device)
        seconds = time.perf_counter() - start
        if len(monitor.history) == done:
            return  # this step was evaluated already: nothing ran
        record: dict[str, Any] = {"step": trainer.global_step, "seconds": seconds}
        if cuda:
            record["gpu_seconds"] = events[0].elapsed_time(events[1]) / 1000
            record["peak_bytes"] = torch.cuda.max_memory_allocated(device)
            record["peak_above_before_bytes"] = record["peak_bytes"] - before
        records.append(record)

    monitor._evaluate = timed  # type: ignore[method-assign]
    return records


def timing_and_memory(config: Config) -> dict[str, Any]:
    device = torch.device(config.device)
    train = loader(config, config.samples, 1, shuffle=True)
    val = loader(config, config.val_samples, 2, shuffle=False)
    peak_batch = min(10, len(train) - 1)

    seed_everything(0, verbose=False)
    plain_clock = Clock(device, peak_batch)
    trainer(config, [plain_clock], max_epochs=config.plain_epochs).fit(
        Classifier(config.stem), train, val
    )

    seed_everything(0, verbose=False)
    monitor = GeneralizationMonitor(probe_size=config.probe_size)  # 512, the default, in full
    evaluations = instrument(monitor, device)
    clock = Clock(device, peak_batch)
    trainer(config, [monitor, clock], max_epochs=config.monitored_epochs).fit(
        Classifier(config.stem), train, val
    )

    epochs = plain_clock.train_seconds[1:] or plain_clock.train_seconds
    epoch = statistics.median(epochs)
    warm = evaluations[1:] or evaluations  # step 0 pays the suite's first-call warm-ups
    per_evaluation = statistics.median(e["seconds"] for e in warm)
    timing = {
        "plain_train_epoch_seconds": plain_clock.train_seconds,
        "monitored_train_epoch_seconds": clock.train_seconds,
        "evaluations": evaluations,
        "evaluation_seconds_median": per_evaluation,
        "suite_fraction_of_epoch": per_evaluation / epoch,
        "target_fraction": 0.02,
        "within_target": per_evaluation / epoch <= 0.02,
        "logged": sorted(monitor.history[-1]) if monitor.history else [],
        "ablation_layer": _member(monitor, "AblationProxy").layer,
        "normalization": _member(monitor, "NormalizedLossProxy").resolved_mode,
    }
    memory: dict[str, Any] = {"available": device.type == "cuda"}
    if device.type == "cuda":
        memory |= {
            "suite_peak_above_before_bytes": max(e["peak_above_before_bytes"] for e in warm),
            "suite_peak_bytes": max(e["peak_bytes"] for e in warm),
            "train_step_peak_bytes": plain_clock.step_peak.get("peak_bytes"),
            "train_step_peak_above_before_bytes": plain_clock.step_peak.get("peak_bytes", 0)
            - plain_clock.step_peak.get("before_bytes", 0),
        }
    else:
        memory["reason"] = "CUDA allocator statistics only; run with --device cuda"
    return {"timing": timing, "memory": memory}


def _member(monitor: GeneralizationMonitor, kind: str) -> Any:
    return next(p for p in monitor.proxies if type(p).__name__ == kind)


def interference(config: Config) -> dict[str, Any]:
    """Bitwise identical training with and without the suite, in deterministic mode."""
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        return _train_twice(config)
    finally:
        # Lightning's deterministic=True stays switched on after the fit.
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


def _train_twice(config: Config) -> dict[str, Any]:
    states = []
    # The suite evaluates at step 0 and after every second step: between optimizer steps.
    monitor = GeneralizationMonitor(probe_size=config.probe_size, every_n_train_steps=2)
    for with_suite in (False, True):
        seed_everything(0, workers=True, verbose=False)
        model = Classifier(config.stem)
        callbacks: list[Callback] = [monitor] if with_suite else []
        data = loader(config, config.batch * config.interference_steps, 3, shuffle=True)
        val = loader(config, config.val_samples, 4, shuffle=False)
        run = trainer(config, callbacks, max_steps=config.interference_steps, deterministic=True)
        run.fit(model, data, val)
        states.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    differing = [k for k in states[0] if not torch.equal(states[0][k], states[1][k])]
    return {
        "steps": config.interference_steps,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "evaluations_with_suite": len(monitor.history),
        "tensors_compared": len(states[0]),
        "differing": differing,
        "bitwise_identical": not differing and len(monitor.history) >= 2,
    }
