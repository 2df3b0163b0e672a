"""Which label-free early-stopping rule works: regret against the best held-out epoch.

Every run trains to its last epoch with ``GeneralizationMonitor`` evaluating at each epoch
end; each rule is then replayed on the logged curve exactly as Lightning's
``EarlyStopping`` (checking at epoch end, ``mode="min"``, stopping once ``wait >=
patience``) would have decided, so one training serves every rule. A rule's regret is
the held-out loss (and error) at its stop minus the best over the run. The reference
rule watches the held-out loss itself (``gapwatch/test_loss``, the probe it is scored
on, so it is optimistic).

``python -m experiments.stopping`` writes ``results/stopping/runs.{md,csv}`` and
``regret.md``.
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything

from gapwatch import GeneralizationMonitor
from gapwatch.demo import DigitsClassifier, DigitsDataModule, Mnist5kDataModule

OUT = Path(__file__).parent / "results" / "stopping"


@dataclass(frozen=True)
class Rule:
    """An ``EarlyStopping(monitor=..., min_delta=..., patience=...)`` to replay."""

    name: str
    monitor: str
    min_delta: float
    patience: int


RULES = [
    Rule("normalized train loss (documented: 1e-5, 5)", "normalized_train_loss", 1e-5, 5),
    Rule("prediction changes (0, 5)", "prediction_changes", 0.0, 5),
    Rule("prediction changes (0, 3)", "prediction_changes", 0.0, 3),
    Rule("held-out loss (reference; 0, 5)", "test_loss", 0.0, 5),
]


class _Classifier(DigitsClassifier):
    def __init__(self, optimizer: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.optimizer = optimizer

    def configure_optimizers(self) -> Any:
        params = self.parameters()
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=1e-3)
        momentum = 0.9 if self.optimizer == "momentum" else 0.0
        return torch.optim.SGD(params, lr=0.01 if momentum else 0.05, momentum=momentum)


def family() -> list[dict[str, Any]]:
    """24 runs: data x architecture x optimizer x label noise, widths alternating."""
    runs = []
    for data in ("digits", "mnist"):
        for arch in ("mlp", "cnn"):
            widths = (64, 256) if arch == "mlp" else (8, 16)
            for i, optimizer in enumerate(("sgd", "momentum", "adam")):
                for j, noise in enumerate((0.0, 0.2)):
                    width = widths[(i + j) % 2]
                    runs.append(
                        {
                            "data": data,
                            "arch": arch,
                            "width": width,
                            "optimizer": optimizer,
                            "noise": noise,
                        }
                    )
    return runs


def train(run: dict[str, Any], epochs: int) -> list[dict[str, float]]:
    """One run to its last epoch; the monitor's history at each epoch end."""
    seed_everything(0, verbose=False)
    size = 8 if run["data"] == "digits" else 28
    module = DigitsDataModule if run["data"] == "digits" else Mnist5kDataModule
    data = module(label_noise=run["noise"], seed=0)
    model = _Classifier(run["optimizer"], arch=run["arch"], width=run["width"], image_size=size)
    monitor = GeneralizationMonitor(
        sensitivity=False, jacobian=False, ablation=False, figures_every_n_evaluations=0
    )
    trainer = Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor],
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    return monitor.history[1:]  # the epoch ends, where EarlyStopping checks


def replay(rule: Rule, curve: list[float]) -> int:
    """The epoch index at which ``EarlyStopping`` would stop (the last if never)."""
    best, wait = float("inf"), 0
    for epoch, value in enumerate(curve):
        if math.isnan(value):  # check_finite stops
            return epoch
        if value + rule.min_delta < best:
            best, wait = value, 0
        else:
            wait += 1
            if wait >= rule.patience:
                return epoch
    return len(curve) - 1


def evaluate(history: list[dict[str, float]]) -> dict[str, Any]:
    """Each rule's stopping epoch and its loss and error regret."""
    loss = [h["test_loss"] for h in history]
    error = [1 - h["test_acc"] for h in history]
    found: dict[str, Any] = {"best_epoch": loss.index(min(loss)) + 1}
    for rule in RULES:
        stop = replay(rule, [h[rule.monitor] for h in history])
        found[rule.name] = {
            "epoch": stop + 1,
            "loss_regret": loss[stop] - min(loss),
            "error_regret": error[stop] - min(error),
        }
    return found


def main(epochs: int = 30) -> None:
    """Train the family, replay every rule, write the per-run table and the regret summary."""
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for run in family():
        result = evaluate(train(run, epochs))
        rows.append({**run, **result})
        print(run, result, flush=True)
    keys = ("data", "arch", "width", "optimizer", "noise", "best_epoch")
    parts = ("epoch", "loss_regret", "error_regret")
    with (OUT / "runs.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow([*keys, *[f"{r.name}: {k}" for r in RULES for k in parts]])
        for row in rows:
            cells = [f"{row[r.name][k]:.4g}" for r in RULES for k in parts]
            writer.writerow([*(row[k] for k in keys), *cells])
    lines = [
        f"{len(rows)} runs, {epochs} epochs each.",
        "",
        "| rule | median stop epoch | loss regret: median | worst | error regret: median "
        "| worst | runs with loss regret > 0.05 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for rule in RULES:
        cells = [row[rule.name] for row in rows]
        loss = [c["loss_regret"] for c in cells]
        error = [c["error_regret"] for c in cells]
        lines.append(
            f"| {rule.name} | {statistics.median(c['epoch'] for c in cells):g} "
            f"| {statistics.median(loss):.3f} | {max(loss):.3f} | {statistics.median(error):.3f} "
            f"| {max(error):.3f} | {sum(v > 0.05 for v in loss)} of {len(rows)} |"
        )
    best = statistics.median(row["best_epoch"] for row in rows)
    lines.append(f"\nMedian best held-out epoch: {best:g}.")
    (OUT / "regret.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(*map(int, sys.argv[1:2]))
