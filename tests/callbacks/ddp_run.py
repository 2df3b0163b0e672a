"""Entry point for the DDP tests: ``python ddp_run.py STRATEGY DEVICES LOGDIR [HELDOUT]``.

``HELDOUT`` limits the validation set to that many samples (a 1-sample held-out set
leaves most processes an empty shard).

A separate script because both launchers re-run it: ``ddp_spawn`` re-imports this module
in its workers and ``ddp`` re-executes the command line for every other rank.
"""

from __future__ import annotations

import sys

from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import Subset

from gapwatch import GeneralizationMonitor
from gapwatch.demo import DigitsClassifier, DigitsDataModule


class _SmallValidation(DigitsDataModule):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.val_set = Subset(self.val_set, range(self.size))  # type: ignore[assignment]


def run(strategy: str, devices: int, logdir: str, heldout: int | None = None) -> None:
    """One epoch on digits with the full suite: 200 probes, uneven over 3 processes."""
    seed_everything(0, verbose=False)
    model = DigitsClassifier(width=8)
    monitor = GeneralizationMonitor(transitions=True, max_images=5, probe_size=200)
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
    data = DigitsDataModule() if heldout is None else _SmallValidation(heldout)
    trainer.fit(model, datamodule=data)


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]), sys.argv[3], *map(int, sys.argv[4:5]))
