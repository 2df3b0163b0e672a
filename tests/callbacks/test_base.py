"""The shared base: probes, schedule, step alignment, monitoring, checkpoints, batches."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, Dataset

from gapwatch import GeneralizationMonitor, JacobianNorm, OutputSensitivity
from gapwatch.demo import DigitsClassifier, DigitsDataModule

from .conftest import fit, make_trainer, read_scalars, repeated_points


def test_step_zero_and_every_epoch_aligned_with_validation_metrics(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer, _ = fit(tmp_path, [OutputSensitivity(probe_size=128)], logger=logger, max_epochs=3)
    scalars = read_scalars(logger.log_dir)
    steps = sorted(scalars["gapwatch/sensitivity"])
    assert steps[0] == 0
    # After step 0, exactly the steps at which Lightning logged the user's val_loss.
    assert steps[1:] == sorted(scalars["val_loss"])
    assert len(steps) == 1 + trainer.max_epochs
    for name in ("test_loss", "test_acc", "train_loss", "train_acc", "gap"):
        assert sorted(scalars[f"gapwatch/{name}"]) == steps


def test_every_n_epochs_and_every_n_train_steps(tmp_path):
    sparse = OutputSensitivity(every_n_epochs=2, probe_size=64)
    fit(tmp_path, [sparse], max_epochs=4)
    batches = 20  # ceil(1258 / 64) training batches per epoch
    assert [int(h["step"]) for h in sparse.history] == [0, 2 * batches - 1, 4 * batches - 1]

    stepped = OutputSensitivity(every_n_train_steps=7, every_n_epochs=100, probe_size=64)
    fit(tmp_path, [stepped], max_epochs=1, limit_val_batches=0)
    assert [int(h["step"]) for h in stepped.history] == [0, 6, 13]


def test_every_train_step_writes_each_point_once(tmp_path):
    # After the first optimizer step Lightning's logging step is still 0, the step of the
    # evaluation before training: that point must not be written twice.
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    monitor = GeneralizationMonitor(every_n_train_steps=1, probe_size=32, ablation=False)
    fit(tmp_path, [monitor], logger=logger, max_epochs=2, limit_train_batches=5)
    assert [int(h["step"]) for h in monitor.history] == list(range(10))
    assert repeated_points(logger.log_dir) == {}
    assert sorted(read_scalars(logger.log_dir)["gapwatch/sensitivity"]) == list(range(10))


def test_a_reused_callback_starts_each_fit_fresh(tmp_path):
    monitor = OutputSensitivity(probe_size=64)
    fit(tmp_path, [monitor], max_epochs=2)
    first = monitor._probes.train.inputs.clone()
    # Another model on other data: probes, history and step 0 are its own.
    fit(tmp_path, [monitor], max_epochs=1, data=DigitsDataModule(seed=1), seed=1)
    assert [int(h["step"]) for h in monitor.history] == [0, 19]
    assert not torch.equal(monitor._probes.train.inputs, first)
    assert monitor.history[0]["train_acc"] < 0.3  # an untrained model, not the first fit's


def test_probe_size_and_prefix(tmp_path):
    callback = OutputSensitivity(probe_size=5000, prefix="probe.")
    with pytest.warns(UserWarning, match="uses all"):
        trainer, _ = fit(tmp_path, [callback], max_epochs=1)
    assert len(callback._probes.train) == 1258
    assert len(callback._probes.heldout) == 539
    assert "probe.sensitivity" in trainer.callback_metrics


def test_no_heldout_data_warns_and_keeps_train_metrics(tmp_path):
    callback = OutputSensitivity(probe_size=64, heldout="none")
    with pytest.warns(UserWarning, match="no held-out data"):
        fit(tmp_path, [callback], max_epochs=1)
    names = set(callback.history[-1])
    assert {"train_loss", "train_acc", "sensitivity"} <= names
    assert not names & {"test_loss", "test_acc", "gap"}


@pytest.mark.parametrize("check_on_train_epoch_end", [True, False])
def test_early_stopping_on_normalized_loss_stops_early(tmp_path, check_on_train_epoch_end):
    # A min_delta no epoch can beat: the run must stop after `patience` checks.
    stopper = EarlyStopping(
        monitor="gapwatch/normalized_train_loss",
        min_delta=10.0,
        patience=1,
        check_on_train_epoch_end=check_on_train_epoch_end,
    )
    monitor = GeneralizationMonitor(probe_size=64, jacobian=False, ablation=False)
    # EarlyStopping first in the list: the metric must already be there when it checks.
    trainer, _ = fit(tmp_path, [stopper, monitor], max_epochs=10)
    assert trainer.current_epoch == 2
    assert stopper.stopped_epoch == 1


def test_model_checkpoint_monitors_a_proxy(tmp_path):
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="gapwatch/test_loss", filename="{epoch}"
    )
    fit(tmp_path, [OutputSensitivity(probe_size=64), checkpoint], max_epochs=2)
    assert checkpoint.best_model_path.endswith(".ckpt")
    assert checkpoint.best_model_score is not None


def test_resume_continues_without_a_second_step_zero(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = OutputSensitivity(probe_size=64)

    def logger() -> TensorBoardLogger:  # both fits write to the same run
        return TensorBoardLogger(tmp_path, name="run", version=0, default_hp_metric=False)

    fit(tmp_path, [first, checkpoint], max_epochs=1, logger=logger())
    resumed = OutputSensitivity(probe_size=64)
    model = DigitsClassifier(width=8)
    trainer = make_trainer(tmp_path, callbacks=[resumed], max_epochs=2, logger=logger())
    trainer.fit(model, datamodule=DigitsDataModule(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    steps = [int(h["step"]) for h in resumed.history]
    assert steps[:2] == [0, 19]
    assert steps[2:] == [39]
    assert torch.equal(first._probes.train.inputs, resumed._probes.train.inputs)
    assert repeated_points(tmp_path / "run") == {}
    assert sorted(read_scalars(tmp_path / "run")["gapwatch/sensitivity"]) == [0, 19, 39]


def test_csv_logger_and_several_loggers_get_the_scalars(tmp_path):
    csv = CSVLogger(tmp_path, name="csv")
    tensorboard = TensorBoardLogger(tmp_path, name="tb")
    fit(tmp_path, [OutputSensitivity(probe_size=64)], logger=[csv, tensorboard], max_epochs=1)
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "gapwatch/sensitivity" in header
    assert "gapwatch/sensitivity" in read_scalars(tensorboard.log_dir)


class _DictDigits(Dataset):
    def __init__(self, base, keys=("image", "label")):
        self.base, self.keys = base, keys

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return {self.keys[0]: x, self.keys[1]: y}


class _DictModule(DigitsClassifier):
    def training_step(self, batch, batch_idx):
        return super().training_step((batch["image"], batch["label"]), batch_idx)

    def validation_step(self, batch, batch_idx):
        return super().validation_step((batch["image"], batch["label"]), batch_idx)


def _dict_loaders():
    data = DigitsDataModule()
    data.setup()
    return (
        DataLoader(_DictDigits(data.train_set), batch_size=64, shuffle=True),
        DataLoader(_DictDigits(data.val_set), batch_size=256),
    )


def test_dict_batches_with_configured_keys(tmp_path):
    callback = OutputSensitivity(probe_size=64, input_key="image", target_key="label")
    train, val = _dict_loaders()
    make_trainer(tmp_path, callbacks=[callback], max_epochs=1).fit(_DictModule(), train, val)
    assert callback._probes.train.inputs.shape == (64, 1, 8, 8)
    assert "test_acc" in callback.history[-1]


def test_unsupported_batch_names_the_override_before_training(tmp_path):
    callback = OutputSensitivity(probe_size=64)  # default keys "x"/"y" do not match
    train, val = _dict_loaders()
    trainer = make_trainer(tmp_path, callbacks=[callback], max_epochs=1)
    with pytest.raises(TypeError, match="override `split_batch"):
        trainer.fit(_DictModule(), train, val)
    assert trainer.global_step == 0


@pytest.mark.parametrize("inference_mode", [True, False])
def test_gradient_proxy_under_either_inference_mode(tmp_path, inference_mode):
    callback = JacobianNorm(method="exact", probe_size=32)
    fit(tmp_path, [callback], max_epochs=1, inference_mode=inference_mode)
    assert callback.history[-1]["jacobian_norm"] > 0


def test_bf16_mixed_precision_computes_in_float32(tmp_path):
    callback = GeneralizationMonitor(probe_size=64)
    fit(tmp_path, [callback], max_epochs=1, precision="bf16-mixed")
    final = callback.history[-1]
    assert all(torch.isfinite(torch.tensor(v)) for v in final.values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"every_n_train_steps": -1}, "every_n_train_steps"),
        ({"probe_size": 0}, "probe_size"),
        ({"heldout": "train"}, "'val', 'test', 'none'"),
        ({"sigma": 0.0}, "sigma"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OutputSensitivity(**kwargs)


def _unlabelled_split(batch):
    return batch[0], None


def test_label_free_proxies_run_on_unlabelled_batches_and_labelled_ones_refuse(tmp_path):
    class Unlabelled(OutputSensitivity):
        def split_batch(self, batch):
            return _unlabelled_split(batch)

    callback = Unlabelled(probe_size=64)
    fit(tmp_path, [callback], max_epochs=1)
    final = callback.history[-1]
    assert final["sensitivity"] > 0
    assert not {"train_loss", "test_loss", "gap", "predicted_test_loss_bias"} & set(final)

    from gapwatch import UnitAblation

    class UnlabelledAblation(UnitAblation):
        def split_batch(self, batch):
            return _unlabelled_split(batch)

    with pytest.raises(ValueError, match="Unit ablation needs labelled train batches"):
        fit(tmp_path, [UnlabelledAblation(probe_size=64)], max_epochs=1)


def test_two_callbacks_with_one_prefix_are_refused_before_training(tmp_path):
    twins = [OutputSensitivity(probe_size=32), JacobianNorm(probe_size=32)]
    with pytest.raises(ValueError, match=r"same prefix 'gapwatch/'.*one GeneralizationMonitor"):
        fit(tmp_path, twins, max_epochs=1)
    apart = [OutputSensitivity(probe_size=32), JacobianNorm(probe_size=32, prefix="jac/")]
    trainer, _ = fit(tmp_path, apart, max_epochs=1, limit_train_batches=2)
    assert {"gapwatch/sensitivity", "jac/jacobian_norm"} <= set(trainer.callback_metrics)
