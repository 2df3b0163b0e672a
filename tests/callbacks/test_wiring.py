"""Each callback logs what its functional computes on the same probes and final weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from gapwatch import JacobianNorm, NormalizedLoss, OutputSensitivity, Transitions, UnitAblation
from gapwatch.functional import (
    jacobian_norm,
    normalization_factor,
    normalized_cross_entropy,
    output_sensitivity,
    predicted_test_loss,
    transitions,
    unit_ablation,
)
from gapwatch.functional.sensitivity import input_second_moment, softmax_mse

from .conftest import fit


def _final(callback):
    return callback.history[-1]


def test_losses_and_sensitivity(tmp_path):
    callback = OutputSensitivity(sigma=0.2, num_draws=3, probe_size=128)
    _, model = fit(tmp_path, [callback], max_epochs=1)
    model.eval()
    probes, final = callback._probes, _final(callback)
    with torch.no_grad():
        held, train = model(probes.heldout.inputs), model(probes.train.inputs)
    assert final["test_loss"] == pytest.approx(
        F.cross_entropy(held, probes.heldout.targets).item(), rel=1e-5
    )
    train_acc = (train.argmax(1) == probes.train.targets).float().mean().item()
    assert final["train_acc"] == pytest.approx(train_acc)
    generator = torch.Generator().manual_seed(callback.seed)
    s = output_sensitivity(
        model, probes.heldout.inputs, sigma=0.2, num_draws=3, generator=generator
    )
    assert final["sensitivity"] == pytest.approx(s.item(), rel=1e-4)
    x2 = input_second_moment(probes.heldout.inputs)
    bias = softmax_mse(train, probes.train.targets)
    expected = predicted_test_loss(s, num_classes=10, input_second_moment=x2, sigma=0.2, bias=bias)
    assert final["predicted_test_loss_bias"] == pytest.approx(expected.item(), rel=1e-4)
    variance = 0.9 * (s.item() * x2.item() / 0.04)
    assert final["bias_fraction"] == pytest.approx(bias.item() / (bias.item() + variance), rel=1e-4)


def test_jacobian_norm_exact(tmp_path):
    callback = JacobianNorm(method="exact", output="logits", probe_size=64)
    _, model = fit(tmp_path, [callback], max_epochs=1)
    expected = jacobian_norm(
        model, callback._probes.heldout.inputs, method="exact", output="logits"
    )
    assert _final(callback)["jacobian_norm"] == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("mode", ["layerwise", "output"])
def test_normalized_loss(tmp_path, mode):
    callback = NormalizedLoss(mode=mode, p=2, probe_size=64)
    _, model = fit(tmp_path, [callback], max_epochs=1)
    probes, final = callback._probes, _final(callback)
    reference = probes.train.inputs[:8] if mode == "output" else None
    options = {"mode": mode, "reference_inputs": reference}
    log_rho = normalization_factor(model, log=True, **options).item()
    assert final["log_norm_product"] == pytest.approx(log_rho, rel=1e-6)
    for role, probe in (("train", probes.train), ("test", probes.heldout)):
        loss = normalized_cross_entropy(model, probe.inputs, probe.targets, **options).item()
        assert final[f"normalized_{role}_loss"] == pytest.approx(loss, rel=1e-6)
        assert final[f"normalized_{role}_loss"] < math.log(10)


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
    assert _final(callback)["ablation_zeta"] == pytest.approx(expected.zeta.item())
    assert _final(callback)["ablation_kappa"] == pytest.approx(expected.kappa.item())
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


def test_transitions(tmp_path):
    callback = Transitions(num_points=16, max_images=3, probe_size=64)
    _, model = fit(tmp_path, [callback], max_epochs=1)
    expected = transitions(model, callback._probes.heldout.inputs[:3], num_points=16)
    assert _final(callback)["transitions"] == pytest.approx(expected.item())


def test_unit_ablation_shows_progress_when_it_takes_long(tmp_path, monkeypatch, capsys):
    from gapwatch.callbacks import unit_ablation as module

    monkeypatch.setattr(module, "PROGRESS_DELAY", 0.0)
    fit(tmp_path, [UnitAblation(probe_size=64, max_classes=3)], max_epochs=1)
    assert "gapwatch: unit ablation" in capsys.readouterr().err
