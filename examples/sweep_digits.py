"""Sweep CNN width and label noise on digits with the gapwatch suite, then compare runs.

python examples/sweep_digits.py --epochs 8
gapwatch report gapwatch_sweep

Each run logs to its own TensorBoard directory, ``LOGDIR/w{width}_noise{noise}/version_*``;
``gapwatch report`` then asks which proxy, measured on the train data alone, ranks the
runs by held-out loss and by generalization gap.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from gapwatch import GeneralizationMonitor
from gapwatch.demo import DigitsClassifier, DigitsDataModule


def sweep(
    logdir: str | Path,
    *,
    widths: Sequence[int] = (8, 16, 32),
    noises: Sequence[float] = (0.0, 0.2, 0.4),
    epochs: int = 8,
    probe_size: int = 256,
    figures_every_n_evaluations: int = 4,
    seed: int = 0,
    **trainer_options: Any,
) -> list[Path]:
    """Train one digits CNN per (width, label noise) pair with a ``GeneralizationMonitor``.

    Every run starts from the same seed, so runs differ only in width and noise.

    Args:
        logdir: Root of the TensorBoard logs.
        widths: CNN widths (channels of the first convolution).
        noises: Shares of corrupted training labels.
        epochs: Training epochs per run.
        probe_size: Samples in each gapwatch probe set.
        figures_every_n_evaluations: Draw each run's TensorBoard figures this seldom; they
            are the slow part of an evaluation, and a sweep is read through its report.
        seed: Seed of the weights, the data split, the label noise and the shuffle order.
        **trainer_options: Passed on to every ``Trainer`` (e.g. ``limit_train_batches``).

    Returns:
        The log directory of each run.
    """
    runs = []
    for width in widths:
        for noise in noises:
            seed_everything(seed, verbose=False)
            logger = TensorBoardLogger(logdir, name=f"w{width}_noise{noise}")
            trainer = Trainer(
                max_epochs=epochs,
                logger=logger,
                callbacks=[
                    GeneralizationMonitor(
                        probe_size=probe_size,
                        figures_every_n_evaluations=figures_every_n_evaluations,
                    )
                ],
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                **{"log_every_n_steps": 10, **trainer_options},
            )
            trainer.fit(
                DigitsClassifier(arch="cnn", width=width),
                datamodule=DigitsDataModule(label_noise=noise, seed=seed),
            )
            runs.append(Path(logger.log_dir))
    return runs


def main(argv: list[str] | None = None) -> None:
    """Run the sweep from the command line and print the report command."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", type=Path, default=Path("gapwatch_sweep"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2, 0.4])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    runs = sweep(
        args.logdir, widths=args.widths, noises=args.noise, epochs=args.epochs, seed=args.seed
    )
    print(f"\n{len(runs)} runs logged below {args.logdir}. Compare them with:\n")
    print(f"    gapwatch report {args.logdir}\n")


if __name__ == "__main__":
    main()
