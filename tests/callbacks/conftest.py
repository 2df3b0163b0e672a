"""Helpers for callback tests: a quiet trainer and TensorBoard event files read back.

The trainer runs on the test device (``pytest --device cuda``: Lightning's ``"cuda"``
accelerator on that device); a test that passes ``accelerator=`` (DDP on gloo) keeps it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gapwatch.demo import DigitsClassifier, DigitsDataModule
from tests import conftest as shared


def device_options() -> dict[str, Any]:
    """``accelerator`` and ``devices`` that put a Trainer on the test device."""
    device = shared.DEVICE
    if device.type == "cuda":
        return {"accelerator": "cuda", "devices": [device.index or 0]}
    return {"accelerator": "cpu", "devices": 1}


def back_on_device(model: LightningModule) -> LightningModule:
    """``model`` on the test device again, beside the callbacks' probes.

    Lightning moves the model to the CPU at the end of ``fit``; the probes a callback drew
    stay where training ran, and a test's own reference pass needs both in one place.
    """
    return model.to(shared.DEVICE)


def make_trainer(tmp_path: Path, **overrides: Any) -> Trainer:
    """A deterministic, quiet trainer on the test device; tests override what they check."""
    options: dict[str, Any] = {
        "default_root_dir": tmp_path,
        **device_options(),
        "max_epochs": 2,
        "deterministic": True,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    options.update(overrides)
    callbacks = options.get("callbacks") or []
    options["enable_checkpointing"] = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    return Trainer(**options)


def fit(
    tmp_path: Path,
    callbacks: list,
    *,
    seed: int = 0,
    data: Any = None,
    arch: str = "cnn",
    **trainer_options: Any,
):
    """Train a fresh, seeded digits model and return ``(trainer, model)``."""
    seed_everything(seed, workers=True, verbose=False)
    model = DigitsClassifier(arch=arch, width=8)
    trainer = make_trainer(tmp_path, callbacks=callbacks, **trainer_options)
    trainer.fit(model, datamodule=data if data is not None else DigitsDataModule(seed=seed))
    return trainer, back_on_device(model)


def read_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the event files below ``log_dir``: ``{tag: {step: value}}``."""
    scalars: dict[str, dict[int, float]] = {}
    files = sorted(Path(log_dir).rglob("events.out.tfevents.*"))
    assert files, f"no event file below {log_dir}"
    for file in files:
        accumulator = EventAccumulator(str(file), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars(tag):
                scalars.setdefault(tag, {})[event.step] = event.value
    return scalars


def repeated_points(log_dir: Path) -> dict[tuple[str, int], int]:
    """``(tag, step)`` pairs written more than once in the event files below ``log_dir``."""
    counts: Counter[tuple[str, int]] = Counter()
    for file in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(file), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            counts.update((tag, event.step) for event in accumulator.Scalars(tag))
    return {point: n for point, n in counts.items() if n > 1}


@pytest.fixture
def scalars():
    return read_scalars
