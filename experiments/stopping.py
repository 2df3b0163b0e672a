"""Which label-free early-stopping rule works: regret against the best held-out epoch.

Every run trains to its last epoch with ``GeneralizationMonitor`` evaluating at each epoch
end; each rule is then replayed on the logged curve as Lightning's ``EarlyStopping``
would have decided (:func:`gapwatch.report_stopping.stop_index`), so one training serves
every rule. The held-out samples are split in two: a validation half, on which the
module logs ``val_loss`` (the reference rule: early stopping with held-out data, as users
do it), and a test half, the monitor's held-out probe (``heldout="test"``), on which
every rule's regret is measured: the loss (and error) at its stop minus the best epoch's.

The family (24 runs): digits and the 5,000 MNIST images, an MLP and a CNN, SGD, SGD with
momentum and Adam, label noise 0 and 0.2, two widths alternating.

``python -m experiments.stopping [epochs]`` writes ``results/stopping/runs.csv`` (every
run's stops) and ``regret.md`` (the summary table).
"""

from __future__ import annotations

import csv
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader, Subset

from gapwatch import GeneralizationMonitor
from gapwatch.demo import DigitsClassifier, DigitsDataModule, Mnist5kDataModule
from gapwatch.report_stopping import LABEL_FREE_RULES, REGRETS, Rule, regrets, summary

OUT = Path(__file__).parent / "results" / "stopping"
RUN_KEYS = ("data", "arch", "width", "optimizer", "noise")

#: Candidates beyond the audited ones: other patiences, the plain train loss (a naive
#: label-free baseline) and the validation loss (the reference, it needs held-out data).
RULES = (
    *LABEL_FREE_RULES,
    Rule("prediction_changes", 0.0, 3),
    Rule("prediction_changes", 0.0, 10),
    Rule("prediction_changes", 0.005, 5),  # about one standard error late in training
    Rule("normalized_train_loss", 1e-5, 10),
    Rule("normalized_train_loss", 0.0, 5),
    Rule("normalized_train_loss", 1e-4, 5),
    Rule("train_loss", 0.0, 5),
    Rule("val_loss", 0.0, 5),
)


class _Classifier(DigitsClassifier):
    """The demo's classifier with the optimizer the run asks for."""

    def __init__(self, optimizer: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.optimizer = optimizer

    def configure_optimizers(self) -> Any:
        params = self.parameters()
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=1e-3)
        momentum = 0.9 if self.optimizer == "momentum" else 0.0
        return torch.optim.SGD(params, lr=0.01 if momentum else 0.05, momentum=momentum)


def _halves(base: type[DigitsDataModule]) -> type[DigitsDataModule]:
    """``base`` with its held-out samples split: validation first half, test second."""

    class Halves(base):  # type: ignore[misc, valid-type]
        def setup(self, stage: str | None = None) -> None:
            super().setup(stage)
            held_out = self.val_set
            middle = len(held_out) // 2
            self.val_set = Subset(held_out, range(middle))
            self.test_set = Subset(held_out, range(middle, len(held_out)))

        def test_dataloader(self) -> DataLoader:
            return DataLoader(self.test_set, batch_size=256)

    return Halves


class _ValidationCurve(Callback):
    """The module's ``val_loss`` at each validation end."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.values.append(float(trainer.callback_metrics["val_loss"]))


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


def train(run: dict[str, Any], epochs: int) -> dict[str, list[float]]:
    """One run to its last epoch: every metric at each epoch end, where monitors check."""
    seed_everything(0, verbose=False)
    base = DigitsDataModule if run["data"] == "digits" else Mnist5kDataModule
    data = _halves(base)(label_noise=run["noise"], seed=0)
    model = _Classifier(
        run["optimizer"], arch=run["arch"], width=run["width"], image_size=base.image_size
    )
    monitor = GeneralizationMonitor(
        heldout="test",
        probe_size=1024,  # the whole test half; a train probe of 1024
        sensitivity=False,
        jacobian=False,
        ablation=False,
        figures_every_n_evaluations=0,
    )
    validation = _ValidationCurve()
    trainer = Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[monitor, validation],
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    history = monitor.history[1:]  # step 0 is before training; no monitor reads it
    if len(history) != epochs or len(validation.values) != epochs:
        raise RuntimeError(f"expected {epochs} epoch-end values, got {len(history)}")
    curves = {name: [h.get(name, float("nan")) for h in history] for name in history[-1]}
    curves["val_loss"] = validation.values
    return curves


def main(epochs: int = 30) -> None:
    """Train the family, replay every rule, write the per-run table and the regret summary."""
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    rows, started = [], time.perf_counter()
    for run in family():
        curves = train(run, epochs)
        best = curves["test_loss"].index(min(curves["test_loss"])) + 1
        for found in regrets(curves, RULES):
            rows.append({**run, "best_epoch": best, **found})
        print(run, f"best epoch {best}", f"{time.perf_counter() - started:.0f} s", flush=True)
    with (OUT / "runs.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (OUT / "regret.md").write_text(table(rows, epochs))
    print(table(rows, epochs))


def table(rows: list[dict[str, Any]], epochs: int) -> str:
    """The regret summary as markdown, worst case beside the median."""
    runs = len({tuple(row[k] for k in RUN_KEYS) for row in rows})
    lines = [
        f"{runs} runs, {epochs} epochs each; regret on the test half of the held-out samples, "
        "at the stop and at the best checkpoint (the rule's monitor at its least up to the "
        "stop, as a `ModelCheckpoint` on it keeps).",
        "",
        "| rule | stopped | median stop epoch | loss regret at the stop: median | worst "
        "| error regret: median | worst | loss regret, best checkpoint: median | worst "
        "| error regret: median | worst |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary(rows):
        cells = [f"{row[f'{stat}_{kind}']:.3f}" for kind in REGRETS for stat in ("median", "worst")]
        lines.append(
            f"| {row['rule']} | {row['stopped']} of {row['runs']} | {row['median_check']:g} | "
            + " | ".join(cells)
            + " |"
        )
    best = sorted(row["best_epoch"] for row in rows if row["rule"] == rows[0]["rule"])
    median = statistics.median(best)
    lines.append(f"\nBest held-out epoch: median {median:g}, range {best[0]}-{best[-1]}.")
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main(*map(int, sys.argv[1:2]))
