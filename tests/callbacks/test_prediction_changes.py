"""The label wave: predicted classes that changed on the train probe, in real fits."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from gapwatch import GeneralizationMonitor, PredictionChanges
from gapwatch.callbacks._probes import Probe, Probes
from gapwatch.callbacks._proxy import Context, Outputs
from gapwatch.callbacks.prediction_changes import PredictionChangesProxy, _probe_id
from gapwatch.demo import DigitsClassifier, DigitsDataModule
from gapwatch.functional._common import evaluation
from gapwatch.functional._inputs import KeywordInputs
from tests.conftest import own_warnings

from .conftest import fit, make_trainer


class _Recorder(Callback):
    """The train probe's predicted classes wherever the monitor evaluates, computed here."""

    def __init__(self, monitor) -> None:
        self.monitor = monitor
        self.classes: list[torch.Tensor] = []

    def _record(self, pl_module) -> None:
        inputs = self.monitor._probes.train.inputs
        with evaluation(pl_module), torch.no_grad():
            self.classes.append(pl_module(inputs).argmax(1).cpu())

    def on_train_start(self, trainer, pl_module) -> None:
        self._record(pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._record(pl_module)


def _expected(before: torch.Tensor, after: torch.Tensor) -> tuple[float, float]:
    changed = (before != after).double()
    return float(changed.mean()), float(changed.std(correction=1) / math.sqrt(changed.numel()))


def test_on_by_default_and_equal_to_the_changes_recomputed_between_evaluations(tmp_path):
    monitor = GeneralizationMonitor(probe_size=128, jacobian=False, ablation=False)
    recorder = _Recorder(monitor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, [monitor, recorder], max_epochs=4, limit_train_batches=4)
    assert own_warnings(caught) == []
    history = monitor.history
    assert len(history) == len(recorder.classes) == 5
    # Undefined at the first evaluation: not logged there (a NaN would stop EarlyStopping).
    assert "prediction_changes" not in history[0]
    assert "prediction_changes_se" not in history[0]
    values = []
    for k in range(1, 5):
        value, error = _expected(recorder.classes[k - 1], recorder.classes[k])
        assert history[k]["prediction_changes"] == pytest.approx(value), k
        assert history[k]["prediction_changes_se"] == pytest.approx(error), k
        values.append(value)
    assert max(values) > 0  # the model learns: some predictions moved
    assert "corr/prediction_changes" in history[-1]


def test_a_resumed_fit_compares_with_the_last_evaluation_before_the_checkpoint(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = PredictionChanges(probe_size=96)
    first_recorder = _Recorder(first)
    fit(tmp_path, [first, first_recorder, checkpoint], max_epochs=1, limit_train_batches=4)
    resumed = PredictionChanges(probe_size=96)
    recorder = _Recorder(resumed)
    seed_everything(0, verbose=False)
    trainer = make_trainer(
        tmp_path, callbacks=[resumed, recorder], max_epochs=2, limit_train_batches=4
    )
    trainer.fit(
        DigitsClassifier(width=8),
        datamodule=DigitsDataModule(),
        ckpt_path=tmp_path / "ckpt" / "last.ckpt",
    )
    assert torch.equal(first._probes.train.inputs, resumed._probes.train.inputs)
    assert [int(h["step"]) for h in resumed.history] == [0, 3, 7]
    value, error = _expected(first_recorder.classes[-1], recorder.classes[-1])
    assert resumed.history[-1]["prediction_changes"] == pytest.approx(value)
    assert resumed.history[-1]["prediction_changes_se"] == pytest.approx(error)


@pytest.mark.parametrize("world_size", [2, 3])
def test_shards_summed_give_the_single_process_value(world_size):
    generator = torch.Generator().manual_seed(0)
    probe = Probe(torch.randn(10, 4, generator=generator), torch.arange(10) % 3, None, None)
    logits = [torch.randn(10, 3, generator=generator) for _ in range(3)]
    logits[2][4] = math.nan  # a row that diverged counts nowhere
    context = Context(generator=generator, batch_size=4)

    def values(shards: int) -> list[dict[str, float]]:
        proxy = PredictionChangesProxy()
        proxy.setup(torch.nn.Identity(), Probes(None, probe), 3)
        found = []
        for out in logits:
            stats = [
                proxy.statistics(
                    torch.nn.Identity(),
                    Probes(None, probe.shard(r, shards)),
                    Outputs(None, out[r::shards]),
                    context,
                )
                for r in range(shards)
            ]
            found.append(proxy.finalize({"classes": sum(s["classes"] for s in stats)}))
        return found

    single, parallel = values(1), values(world_size)
    assert single[0] == {}  # nothing to compare with: not logged (a NaN would stop training)
    for one, many in zip(single[1:], parallel[1:], strict=True):
        assert one == pytest.approx(many)
    classes = [out.argmax(1) for out in logits]
    expected = float((classes[1] != classes[2])[torch.arange(10) != 4].double().mean())
    assert single[2]["prediction_changes"] == pytest.approx(expected)


def test_a_fit_resumed_on_another_probe_counts_afresh(tmp_path, caplog):
    # Another seed draws other rows: the checkpoint's classes belong to those it replaced.
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(
        tmp_path,
        [PredictionChanges(probe_size=96), checkpoint],
        max_epochs=1,
        limit_train_batches=4,
    )
    resumed = PredictionChanges(probe_size=96, seed=1)
    trainer = make_trainer(tmp_path, callbacks=[resumed], max_epochs=3, limit_train_batches=4)
    with caplog.at_level("INFO"):
        trainer.fit(
            DigitsClassifier(width=8),
            datamodule=DigitsDataModule(),
            ckpt_path=tmp_path / "ckpt" / "last.ckpt",
        )
    assert "of another train probe" in caplog.text
    assert [int(h["step"]) for h in resumed.history] == [0, 3, 7, 11]
    assert "prediction_changes" not in resumed.history[2]  # the first on the new probe
    assert "prediction_changes" in resumed.history[3]


def test_the_probe_fingerprint_tells_rows_apart_and_nothing_else():
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    x[0, 0] = math.nan  # a float sum would make this probe differ from itself
    assert _probe_id(Probe(x, None)) == _probe_id(Probe(x.clone(), None))
    assert _probe_id(Probe(x, None)) != _probe_id(Probe(x.flip(0), None))
    ids = torch.arange(12).reshape(4, 3)
    tokens = KeywordInputs({"input_ids": ids, "attention_mask": torch.ones(4, 3, dtype=torch.bool)})
    shuffled = KeywordInputs({"attention_mask": tokens["attention_mask"], "input_ids": ids})
    assert _probe_id(Probe(tokens, None)) == _probe_id(Probe(shuffled, None))
    assert _probe_id(Probe(tokens, None)) != _probe_id(
        Probe(tokens[torch.tensor([1, 0, 2, 3])], None)
    )
