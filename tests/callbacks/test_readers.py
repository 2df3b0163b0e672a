"""A monitor that checks before a stream's probe is full fails there, naming the fixes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch.utils.data import DataLoader, IterableDataset

from gapwatch import OutputSensitivity, PredictionChanges
from gapwatch.demo import DigitsClassifier, DigitsDataModule

from .conftest import fit, make_trainer


class _Stream(IterableDataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y, strict=True))


class _StreamedDigits(DigitsDataModule):
    """Digits as a stream of ``size`` train samples an epoch, in batches of 64."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def train_dataloader(self) -> DataLoader:
        x, y = self.train_set.tensors
        return DataLoader(_Stream(x[: self.size], y[: self.size]), batch_size=64)


def _stream_fit(tmp_path, callbacks, size: int, max_epochs: int = 3):
    return fit(tmp_path, callbacks, data=_StreamedDigits(size), max_epochs=max_epochs)


@pytest.mark.parametrize(
    ("size", "arrived"),
    [(300, "only 300 have arrived"), (512, "all 512 were in at step 7")],
    ids=["probe-not-full", "filled-at-the-check"],
)
def test_a_strict_stop_before_a_streams_first_value_names_the_fix(tmp_path, size, arrived):
    # The recommended preset on a stream whose first epoch holds at most probe_size samples:
    # at the first check the probe is not full, or its first evaluation is the check itself
    # and prediction changes need an earlier one. Lightning's own error lists other keys.
    callbacks = [EarlyStopping("gapwatch/prediction_changes"), PredictionChanges(heldout="none")]
    with pytest.raises(RuntimeError) as raised:
        _stream_fit(tmp_path, callbacks, size)
    message = str(raised.value)
    assert "EarlyStopping(gapwatch/prediction_changes)" in message
    assert arrived in message
    assert "EarlyStopping(strict=False)" in message
    assert "probe_size" in message
    assert "train_stream='reread'" in message


def test_a_model_checkpoint_after_validation_gets_the_same_message(tmp_path):
    callbacks = [ModelCheckpoint(monitor="gapwatch/output_sensitivity"), OutputSensitivity()]
    with pytest.raises(RuntimeError, match=r"ModelCheckpoint\(gapwatch/output_sensitivity\)"):
        _stream_fit(tmp_path, callbacks, 300)


def test_checks_before_a_streams_first_value_are_skipped_when_not_strict(tmp_path):
    gapwatch = PredictionChanges(heldout="none")
    stopper = EarlyStopping("gapwatch/prediction_changes", strict=False, patience=100)
    trainer, _ = _stream_fit(tmp_path, [stopper, gapwatch], 300, max_epochs=4)
    assert trainer.current_epoch == 4  # trained to the end, nothing raised
    # Epochs of 5 batches: the 512th sample comes with the 9th batch (step 8); the changes
    # start at the end of epoch 1, and the stopper has counted from there on.
    assert [int(h["step"]) for h in gapwatch.history] == [8, 9, 14, 19]
    assert "prediction_changes" not in gapwatch.history[0]
    changes = [h["prediction_changes"] for h in gapwatch.history[1:]]
    assert float(stopper.best_score) == pytest.approx(min(changes))


def test_a_probe_that_fills_before_the_first_check_needs_no_option(tmp_path):
    gapwatch = PredictionChanges(heldout="none", probe_size=256)
    stopper = EarlyStopping("gapwatch/prediction_changes", patience=100)
    trainer, _ = _stream_fit(tmp_path, [stopper, gapwatch], 512)
    assert trainer.current_epoch == 3
    assert [int(h["step"]) for h in gapwatch.history] == [3, 7, 15, 23]


class _StreamOnly(_StreamedDigits):
    val_dataloader = None  # type: ignore[assignment]


def test_a_model_checkpoint_that_only_warns_is_left_to_warn(tmp_path):
    # Without validation Lightning's ModelCheckpoint warns of a missing monitor and goes on.
    gapwatch = PredictionChanges(heldout="none")
    keeper = ModelCheckpoint(monitor="gapwatch/prediction_changes", dirpath=tmp_path / "ckpt")
    trainer = make_trainer(tmp_path, callbacks=[keeper, gapwatch], max_epochs=3)
    with pytest.warns(UserWarning, match="could not find the monitored key"):
        trainer.fit(DigitsClassifier(width=8), datamodule=_StreamOnly(300))
    assert trainer.current_epoch == 3
    # Epoch 0 ended before the probe was full; the checkpoint compared the later epochs.
    assert Path(keeper.best_model_path).is_file()
    changes = [h["prediction_changes"] for h in gapwatch.history if "prediction_changes" in h]
    assert float(keeper.best_model_score) == pytest.approx(min(changes))


class _SizedStream(_Stream):
    def __len__(self) -> int:
        return len(self.x)


class _SizedStreamedDigits(_StreamedDigits):
    def train_dataloader(self) -> DataLoader:
        x, y = self.train_set.tensors
        return DataLoader(_SizedStream(x[: self.size], y[: self.size]), batch_size=64)


def test_a_sized_stream_too_short_for_the_probe_fails_before_training(tmp_path):
    class Untrained(DigitsClassifier):
        def training_step(self, batch, batch_idx):
            raise AssertionError("gapwatch should have refused before the first step")

    callbacks = [EarlyStopping("gapwatch/prediction_changes"), PredictionChanges(heldout="none")]
    trainer = make_trainer(tmp_path, callbacks=callbacks, max_epochs=3)
    with pytest.raises(RuntimeError, match=r"at most 320 \(5 batches of 64\)"):
        trainer.fit(Untrained(width=8), datamodule=_SizedStreamedDigits(300))


@pytest.mark.parametrize(
    "options", [{"limit_train_batches": 1}, {"fast_dev_run": True}], ids=["one-batch", "dev"]
)
def test_map_style_data_with_one_batch_epochs_is_never_refused(tmp_path, options):
    # Step 0 gives map-style data its first evaluation; in a one-batch epoch the next comes
    # at the epoch's end, after the last batch, where a refusal would be a false alarm.
    gapwatch = PredictionChanges(heldout="none", probe_size=128)
    stopper = EarlyStopping("gapwatch/prediction_changes", patience=5)
    trainer, _ = fit(tmp_path, [gapwatch, stopper], max_epochs=3, **options)
    assert "prediction_changes" in gapwatch.history[-1]
    assert trainer.global_step == (1 if options.get("fast_dev_run") else 3)


def test_a_strict_check_on_a_held_out_metric_without_held_out_data_fails_at_setup(tmp_path):
    stopper = EarlyStopping("gapwatch/test_loss")
    trainer = make_trainer(
        tmp_path, callbacks=[stopper, OutputSensitivity()], max_epochs=2, limit_val_batches=0
    )
    with pytest.raises(RuntimeError, match=r"EarlyStopping\(gapwatch/test_loss\) monitors a held"):
        trainer.fit(DigitsClassifier(width=8), datamodule=DigitsDataModule())
    assert trainer.global_step == 0


def test_a_checkpoint_on_a_held_out_metric_without_validation_is_left_to_warn(tmp_path):
    keeper = ModelCheckpoint(monitor="gapwatch/test_loss", dirpath=tmp_path / "ckpt")
    trainer = make_trainer(
        tmp_path, callbacks=[keeper, OutputSensitivity()], max_epochs=2, limit_val_batches=0
    )
    with pytest.warns(UserWarning, match="could not find the monitored key"):
        trainer.fit(DigitsClassifier(width=8), datamodule=DigitsDataModule())
    assert trainer.current_epoch == 2
