"""The loss every callback logs: the right one for the model's outputs and labels."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch import seed_everything
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from gapwatch import GeneralizationMonitor, OutputSensitivity, UnitAblation
from gapwatch.demo import DigitsClassifier, DigitsDataModule
from tests.conftest import own_warnings

from .conftest import make_trainer


class _Relabelled(DigitsDataModule):
    """Digits whose labels pass through ``relabel`` in both splits."""

    def __init__(self, relabel) -> None:
        super().__init__()
        self.relabel = relabel

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        for name in ("train_set", "val_set"):
            x, y = getattr(self, name).tensors
            setattr(self, name, TensorDataset(x, self.relabel(y)))


class _Ignoring(DigitsClassifier):
    """Trains with cross-entropy's default ``ignore_index=-100``."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))


def _fit(tmp_path, callbacks, model, data):
    seed_everything(0, verbose=False)
    make_trainer(tmp_path, callbacks=callbacks, max_epochs=1, limit_train_batches=3).fit(
        model, datamodule=data
    )


def _expected(model: nn.Module, inputs: Tensor, loss) -> float:
    model.eval()
    with torch.no_grad():
        return float(loss(model(inputs)))


def test_labels_minus_100_are_skipped_as_cross_entropy_skips_them(tmp_path):
    def hide_sevens(y: Tensor) -> Tensor:
        return y.masked_fill(y == 7, -100)

    monitor = UnitAblation(probe_size=256)  # its class counts would fail on -100
    model = _Ignoring(width=8)
    _fit(tmp_path, [monitor], model, _Relabelled(hide_sevens))
    probe = monitor._probes.heldout
    assert not (probe.targets == -100).any()
    data = _Relabelled(hide_sevens)
    data.setup()
    x, y = data.val_set.tensors
    # The same held-out rows with their -100 labels, through F.cross_entropy's own skipping.
    rows = torch.cat([torch.nonzero((x == row).flatten(1).all(1)) for row in probe.inputs])
    rows = rows.flatten()
    expected = _expected(model, x[rows], lambda out: F.cross_entropy(out, y[rows]))
    assert monitor.history[-1]["test_loss"] == pytest.approx(expected, rel=1e-5)


def test_labels_outside_the_classes_fail_at_setup(tmp_path):
    trainer = make_trainer(tmp_path, callbacks=[OutputSensitivity(probe_size=64)], max_epochs=1)
    with pytest.raises(ValueError, match=r"class indices in \[0, 10\).*range from 1 to 10"):
        trainer.fit(DigitsClassifier(width=8), datamodule=_Relabelled(lambda y: y + 1))
    assert trainer.global_step == 0


class _Probabilities(DigitsClassifier):
    """A classifier whose forward ends in a softmax."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).softmax(1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.nll_loss(self(x).log(), y)

    def validation_step(self, batch, batch_idx):
        pass


def test_probability_outputs_are_detected_with_one_warning(tmp_path):
    monitor = OutputSensitivity(probe_size=128)
    model = _Probabilities(width=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, [monitor], model, DigitsDataModule())
    [warning] = [w for w in own_warnings(caught) if "probabilities" in w]
    assert "model_attr" in warning
    probe = monitor._probes.heldout
    expected = _expected(model, probe.inputs, lambda p: F.nll_loss(p.log(), probe.targets))
    assert monitor.history[-1]["test_loss"] == pytest.approx(expected, rel=1e-5)


class _Binary(DigitsClassifier):
    """Is the digit odd? One logit, binary cross-entropy."""

    def __init__(self) -> None:
        super().__init__(width=8)
        self.net[-1] = nn.Linear(self.net[-1].in_features, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.binary_cross_entropy_with_logits(self(x).squeeze(1), y.reshape(-1).float())

    def validation_step(self, batch, batch_idx):
        pass


@pytest.mark.parametrize(
    "labels",
    [
        lambda y: y % 2,
        lambda y: (y % 2).float(),  # as BCEWithLogitsLoss takes them
        lambda y: (y % 2).float().unsqueeze(1),
        lambda y: (y % 2).bool(),
    ],
    ids=["int64", "float32", "float32 [N, 1]", "bool"],
)
def test_a_one_logit_binary_classifier_gets_binary_cross_entropy_and_accuracy(
    tmp_path, labels, caplog
):
    monitor = GeneralizationMonitor(probe_size=128, ablation=False, normalization="output")
    model = _Binary()
    with caplog.at_level("INFO"):
        _fit(tmp_path, [monitor], model, _Relabelled(labels))
    assert "a binary classifier" in caplog.text
    assert "skipping prediction_changes" not in caplog.text
    final = monitor.history[-1]
    assert "prediction_changes" in final
    probe = monitor._probes.heldout
    y = probe.targets.float()
    loss = _expected(model, probe.inputs, lambda z: F.binary_cross_entropy_with_logits(z[:, 0], y))
    accuracy = _expected(model, probe.inputs, lambda z: ((z[:, 0] > 0).float() == y).float().mean())
    assert final["test_loss"] == pytest.approx(loss, rel=1e-5)
    assert final["test_acc"] == pytest.approx(accuracy)
    assert final["gap"] == pytest.approx(final["train_acc"] - final["test_acc"])


class _Masked(DigitsClassifier):
    """A model that needs a second argument."""

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return super().forward(x * mask)


def test_a_model_that_takes_two_arguments_fails_at_setup_naming_the_override(tmp_path):
    trainer = make_trainer(tmp_path, callbacks=[OutputSensitivity(probe_size=32)], max_epochs=1)
    with pytest.raises(TypeError, match=r"one argument.*override the callback's `get_model`"):
        trainer.fit(_Masked(width=8), datamodule=DigitsDataModule())
    assert trainer.global_step == 0
