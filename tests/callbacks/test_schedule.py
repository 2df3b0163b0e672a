"""Monitors of a gapwatch metric only ever read fresh values, whatever the schedules."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from gapwatch import NormalizedLoss, OutputSensitivity
from gapwatch.demo import DigitsClassifier, DigitsDataModule

from .conftest import fit, make_trainer, read_scalars, repeated_points

MONITOR = "gapwatch/normalized_train_loss"


class _Reads(Callback):
    """Records what an EarlyStopping-like reader finds where EarlyStopping reads.

    ``(step of gapwatch's latest evaluation, global step)`` at every check: a check that
    finds an evaluation of an earlier check's step has seen a stale value.
    """

    def __init__(self, gapwatch, on_train_epoch_end: bool) -> None:
        self.gapwatch, self.on_epoch_end, self.seen = gapwatch, on_train_epoch_end, []

    def _read(self, trainer) -> None:
        if not trainer.sanity_checking:
            self.seen.append(self.gapwatch._done_at)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self.on_epoch_end:
            self._read(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.on_epoch_end:
            self._read(trainer)


@pytest.mark.parametrize(
    ("options", "on_epoch_end", "checks"),
    [
        ({"val_check_interval": 0.5}, False, 4),  # validation twice an epoch
        ({"check_val_every_n_epoch": 2}, False, 1),  # every other epoch
        ({}, True, 2),  # EarlyStopping at each epoch end; gapwatch asked for every 2nd
    ],
    ids=["val_check_interval", "check_val_every_n_epoch", "every_n_epochs"],
)
def test_early_stopping_never_reads_a_stale_value(tmp_path, options, on_epoch_end, checks):
    gapwatch = NormalizedLoss(probe_size=64, every_n_epochs=2)
    stopper = EarlyStopping(monitor=MONITOR, min_delta=-1.0, patience=100)  # never stops
    reads = _Reads(gapwatch, on_epoch_end)
    # The readers first: they must find the value whatever the callback order.
    fit(tmp_path, [stopper, reads, gapwatch], max_epochs=2, **options)
    assert stopper._check_on_train_epoch_end is on_epoch_end
    assert len(reads.seen) == checks
    assert len(set(reads.seen)) == checks, f"a check saw a stale value: {reads.seen}"
    assert stopper.wait_count == 0  # every value improved on the last by more than -1


def test_model_checkpoint_every_n_train_steps_reads_fresh_values(tmp_path):
    gapwatch = OutputSensitivity(probe_size=32)
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="gapwatch/test_loss", every_n_train_steps=7
    )
    fit(tmp_path, [gapwatch, checkpoint], max_epochs=1)
    steps = [int(h["step"]) for h in gapwatch.history]
    # Evaluated after optimizer steps 7 and 14 (logged one behind) and at the epoch end.
    assert steps == [0, 6, 13, 19]


class _NoValLoader(DigitsDataModule):
    """A module with `validation_step` whose data has no validation loader."""

    val_dataloader = LightningDataModule.val_dataloader


def test_validation_step_without_a_val_loader_trains_as_without_gapwatch(tmp_path):
    gapwatch = OutputSensitivity(probe_size=32)
    with pytest.warns(UserWarning, match="no held-out data"):
        trainer, _ = fit(tmp_path, [gapwatch], max_epochs=1, data=_NoValLoader())
    assert trainer.global_step == 20
    assert "test_loss" not in gapwatch.history[-1]


class _TestInSetup(LightningDataModule):
    """Lightning's documented pattern: the test set exists only after ``setup("test")``."""

    def setup(self, stage: str) -> None:
        digits = DigitsDataModule()
        digits.setup()
        if stage == "fit":
            self.train_set, self.val_set = digits.train_set, digits.val_set
        if stage == "test":
            x, y = digits.val_set.tensors
            self.test_set = TensorDataset(x[:100], y[:100])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=64, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256)


def test_heldout_test_with_the_setup_stage_pattern(tmp_path):
    gapwatch = OutputSensitivity(probe_size=512, heldout="test")
    trainer = make_trainer(tmp_path, callbacks=[gapwatch], max_epochs=1)
    data = _TestInSetup()
    trainer.fit(DigitsClassifier(width=8), datamodule=data)
    assert len(gapwatch._probes.heldout) == 100
    # All 100 test rows, in the probe's own order.
    torch.testing.assert_close(
        gapwatch._probes.heldout.inputs.sum(0), data.test_set.tensors[0].sum(0)
    )


def test_log_steps_adds_log_spaced_early_points_once_each(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    monitor = OutputSensitivity(probe_size=64, log_steps=6)
    trainer, _ = fit(tmp_path, [monitor], max_epochs=2, logger=logger)
    per_epoch = trainer.num_training_batches
    # 1, 2, ..., 32 (the cap: 2**5), and the epoch ends, on the axis of logged steps.
    early = [1, 2, 4, 8, 16, 32]
    ends = [per_epoch - 1, 2 * per_epoch - 1]
    expected = sorted({0, *[s for s in early if s < 2 * per_epoch], *ends})
    assert 2 * per_epoch - 1 > 32, "the fit must reach the cap for this test"
    assert [int(h["step"]) for h in monitor.history] == expected
    scalars = read_scalars(logger.log_dir)
    for tag in ("gapwatch/test_loss", "gapwatch/bias_fraction", "gapwatch/sensitivity_se"):
        assert sorted(scalars[tag]) == expected, tag
    assert repeated_points(logger.log_dir) == {}
    # The early points see the model move: the held-out loss falls between them.
    losses = [h["test_loss"] for h in monitor.history]
    assert losses[0] > losses[3] > losses[-1]


@pytest.mark.parametrize("log_steps", [-1, True, 2.0])
def test_log_steps_must_be_a_non_negative_integer(log_steps):
    with pytest.raises(ValueError, match=r"log_steps.*non-negative integer"):
        OutputSensitivity(log_steps=log_steps)
