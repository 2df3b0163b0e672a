"""UnitAblation logs what the functional computes on the same probes and weights."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from gapwatch import GeneralizationMonitor, UnitAblation
from gapwatch.demo import DigitsClassifier, DigitsDataModule
from gapwatch.functional import unit_ablation

from .conftest import fit, make_trainer, read_scalars


def test_unit_ablation_layer_path_and_class_subset(tmp_path):
    callback = UnitAblation(layer="net.5", max_classes=4, probe_size=256)
    trainer, model = fit(tmp_path, [callback], max_epochs=1)
    proxy = callback.proxies[-1]
    result = proxy.last_result
    assert len(result.classes) == 4
    expected = unit_ablation(
        model, "net.5", callback._probes.train.inputs, callback._probes.train.targets,
        num_classes=10, classes=result.classes.tolist(),
    )  # fmt: skip
    assert callback.history[-1]["ablation_zeta"] == pytest.approx(expected.zeta.item())
    assert callback.history[-1]["ablation_kappa"] == pytest.approx(expected.kappa.item())
    # The train probe's pass ran through the split model and kept the layer on the way.
    model.eval()
    probes = callback._probes
    with torch.no_grad():
        train_loss = F.cross_entropy(model(probes.train.inputs), probes.train.targets)
    assert callback.history[-1]["train_loss"] == pytest.approx(train_loss.item(), rel=1e-5)
    # A later evaluation draws a fresh subset of classes.
    callback._done_at = None
    trainer.fit_loop.epoch_loop._batches_that_stepped += 1
    callback._evaluate(trainer, model)
    assert proxy.last_result.classes.tolist() != result.classes.tolist()


def test_unit_ablation_default_layer_is_reported_once(tmp_path, caplog):
    callback = UnitAblation(probe_size=64)
    with caplog.at_level("INFO"):
        fit(tmp_path, [callback], max_epochs=1)
    assert callback.proxies[-1].layer == "net.5"
    assert sum("unit ablation uses layer 'net.5'" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("terminal", [True, False])
def test_unit_ablation_shows_progress_on_a_terminal_when_it_takes_long(
    tmp_path, monkeypatch, capsys, terminal
):
    from gapwatch.callbacks import unit_ablation as module

    monkeypatch.setattr(module, "PROGRESS_DELAY", 0.0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    fit(tmp_path, [UnitAblation(probe_size=64, max_classes=3)], max_epochs=1)
    # A bar redrawn in place is noise in a log file: only a terminal gets one.
    assert ("gapwatch: unit ablation" in capsys.readouterr().err) == terminal


class _SwapHead(Callback):
    """Replaces the classifier with a fresh one when the second epoch starts."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            old = pl_module.net[-1]
            pl_module.net[-1] = torch.nn.Linear(old.in_features, old.out_features)


def test_a_module_replaced_mid_training_is_evaluated_as_it_is_now(tmp_path):
    callback = UnitAblation(probe_size=128, figures_every_n_evaluations=0)
    _, model = fit(tmp_path, [callback, _SwapHead()], max_epochs=2, limit_train_batches=2)
    model.eval()
    probes, final = callback._probes, callback.history[-1]
    with torch.no_grad():
        train_loss = F.cross_entropy(model(probes.train.inputs), probes.train.targets)
    assert final["train_loss"] == pytest.approx(train_loss.item(), rel=1e-5)
    expected = unit_ablation(
        model, "net.5", probes.train.inputs, probes.train.targets, num_classes=10
    )
    assert final["ablation_zeta"] == pytest.approx(expected.zeta.item())
    assert final["ablation_kappa"] == pytest.approx(expected.kappa.item())


class _BatchSizeReused(torch.nn.Module):
    """Reads the batch size before the layer and reuses it after: fx cannot batch it."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.head = torch.nn.Linear(4 * 64, 10)

    def forward(self, x):
        n = x.shape[0]
        return self.head(torch.relu(self.conv(x)).reshape(n, -1))


def test_a_model_the_traced_split_cannot_batch_is_ablated_by_hooks(tmp_path):
    seed_everything(0, verbose=False)
    model = DigitsClassifier(width=8)
    model.net = _BatchSizeReused()
    callback = UnitAblation(layer="net.conv", probe_size=64, figures_every_n_evaluations=0)
    make_trainer(tmp_path, callbacks=[callback], max_epochs=1, limit_train_batches=2).fit(
        model, datamodule=DigitsDataModule()
    )
    probes, final = callback._probes, callback.history[-1]
    expected = unit_ablation(
        model, "net.conv", probes.train.inputs, probes.train.targets, num_classes=10
    )
    assert callback.proxies[-1].split.method == "hook"
    assert final["ablation_zeta"] == pytest.approx(expected.zeta.item())
    assert final["ablation_kappa"] == pytest.approx(expected.kappa.item())


def _hparams(log_dir) -> dict:
    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    return dict(plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams)


@pytest.mark.parametrize("suite", [False, True])
def test_kappa_authors_logs_the_signed_mean_of_e_r_minus_e(tmp_path, suite):
    options = {"layer": "net.5", "max_classes": 4, "kappa": "authors", "probe_size": 128}
    if suite:
        callback = GeneralizationMonitor(
            sensitivity=False, jacobian=False, normalized_loss=False, **options
        )
    else:
        callback = UnitAblation(**options)
    logger = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
    fit(tmp_path, [callback], logger=logger, max_epochs=1)
    proxy = callback.proxies[-1]
    assert proxy.kappa == "authors"
    result, final = proxy.last_result, callback.history[-1]
    # The authors' kappa, written out: per class the mean of E_r - E over all M + 1 levels.
    e, e_r = result.curves.double(), result.curves_reversed.double()
    per_class = [(e_r[c] - e[c]).sum().item() / e.shape[1] for c in range(e.shape[0])]
    expected = sum(per_class) / len(per_class)
    assert final["ablation_kappa"] == pytest.approx(expected, abs=1e-6)
    logged = read_scalars(logger.log_dir)["gapwatch/ablation_kappa"]
    assert logged[int(final["step"])] == pytest.approx(expected, abs=1e-6)
    # ... which is not eq. 5 as printed (sum of |E_r - E| over M) on these curves.
    printed = [(e_r[c] - e[c]).abs().sum().item() / (e.shape[1] - 1) for c in range(e.shape[0])]
    assert abs(sum(printed) / len(printed) - expected) > 1e-3
    assert _hparams(logger.log_dir)["gapwatch/ablation.kappa"].string_value == "authors"


def test_kappa_defaults_to_eq_5_and_a_bad_choice_names_the_options():
    assert UnitAblation().proxies[-1].kappa == "paper"
    assert GeneralizationMonitor().proxies[-1].kappa == "paper"
    message = r"Unknown kappa 'signed'; use one of 'paper', 'authors'"
    for make in (UnitAblation, GeneralizationMonitor):
        with pytest.raises(ValueError, match=message):
            make(kappa="signed")


def test_ablation_memory_is_bounded_by_batch_size_not_probe_size(digits):
    from gapwatch.callbacks._probes import Probe, Probes
    from gapwatch.callbacks._proxy import Context, Outputs
    from gapwatch.callbacks.unit_ablation import AblationProxy
    from gapwatch.demo import DigitsClassifier
    from tests.functional.test_memory import torch_cpu_peak

    x, y = (t.cpu() for t in digits)
    x, y = x.repeat(3, 1, 1, 1), y.repeat(3)  # 5391 real digits, each three times
    model = DigitsClassifier(width=8).eval()

    def peak(size: int) -> tuple[int, int]:
        proxy = AblationProxy(layer="net.5", max_classes=10)
        probes = Probes(heldout=None, train=Probe(x[:size], y[:size]))
        proxy.setup(model, probes, 10)
        context = Context(torch.Generator(), batch_size=128)
        outputs = Outputs(None, torch.zeros(size, 10))
        with torch.no_grad():
            held = torch_cpu_peak(lambda: proxy.statistics(model, probes, outputs, context))
        activation = model.net[:6](x[:1]).numel() * 4  # bytes of one sample's activation
        return held, activation

    small, per_sample = peak(512)
    large, _ = peak(4096)
    # Keeping the layer's activation of every probe row would add 3584 rows of it.
    assert large - small < 0.1 * (4096 - 512) * per_sample, (small, large, per_sample)
