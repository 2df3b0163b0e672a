"""Entry point for the DDP tests: ``python ddp_run.py STRATEGY DEVICES LOGDIR``.

A separate script because both launchers re-run it: ``ddp_spawn`` re-imports this module
in its workers and ``ddp`` re-executes the command line for every other rank.
"""

from __future__ import annotations

import sys

from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from gapwatch import GeneralizationMonitor
from gapwatch.demo import DigitsClassifier, DigitsDataModule


def run(strategy: str, devices: int, logdir: str) -> None:
    """One epoch on digits with the full suite, deterministic proxies where they exist."""
    seed_everything(0, verbose=False)
    model = DigitsClassifier(width=8)
    monitor = GeneralizationMonitor(
        transitions=True, max_images=4, jacobian_method="exact", probe_size=200
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=1,
        limit_train_batches=4,
        num_sanity_val_steps=0,
        logger=TensorBoardLogger(logdir, name="", version=""),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=DigitsDataModule())


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]), sys.argv[3])
