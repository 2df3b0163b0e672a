"""What every experiment shares: one training run with gapwatch attached, and the outputs.

Experiments train families of networks through the same code path users run (a
Lightning ``Trainer`` with gapwatch callbacks) and read the proxies from the callback's
``history``.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

from gapwatch import ProbeCallback

OUT = Path(__file__).resolve().parent / "results"


def train(
    model: LightningModule,
    data: LightningDataModule,
    callbacks: Sequence[Callback],
    *,
    max_epochs: int,
    **trainer_options: Any,
) -> list[dict[str, float]]:
    """Fit ``model`` on CPU, quietly, and return the history of the first gapwatch callback.

    Returns:
        One dict per evaluation: ``{"step": ..., "<metric>": ...}``, names without prefix.
    """
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": max_epochs,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    options.update(trainer_options)
    Trainer(callbacks=list(callbacks), **options).fit(model, datamodule=data)
    watcher = next(c for c in callbacks if isinstance(c, ProbeCallback))
    return watcher.history


def write_table(path: Path, rows: Sequence[dict[str, Any]]) -> str:
    """Write ``rows`` as CSV next to a markdown table; return the markdown."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.with_suffix(".csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_cell(row.get(column, "")) for column in columns]
        lines.append("| " + " | ".join(cells) + " |")
    markdown = "\n".join(lines) + "\n"
    path.with_suffix(".md").write_text(markdown)
    return markdown


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def save_figure(figure: plt.Figure, path: Path) -> Path:
    """Save ``figure`` as PNG and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path.with_suffix(".png"), dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path.with_suffix(".png")


def main(run: Callable[..., dict[str, Any]], doc: str | None) -> None:
    """Command-line entry of an experiment: ``python -m experiments.<name> [--reduced]``."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--reduced", action="store_true", help="the quick version")
    args = parser.parse_args()
    # The networks are too small for intra-op threads to pay; on busy cores they cost.
    torch.set_num_threads(1)
    result = run(reduced=args.reduced)
    print(result["table"], result["claims"], sep="\n")
    print(f"Figure and tables: {result['figure'].parent}")
