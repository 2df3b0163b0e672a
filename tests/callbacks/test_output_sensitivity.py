"""OutputSensitivity logs what the functional computes on the same probes and weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from gapwatch import OutputSensitivity
from gapwatch.callbacks._proxy import Context
from gapwatch.functional import output_sensitivity, predicted_test_loss
from gapwatch.functional.predicted_loss import input_second_moment, softmax_mse

from .conftest import fit


def test_losses_and_sensitivity(tmp_path, device):
    callback = OutputSensitivity(sigma=0.2, num_draws=3, probe_size=128)
    _, model = fit(tmp_path, [callback], max_epochs=1)
    model.eval()
    probes, final = callback._probes, callback.history[-1]
    with torch.no_grad():
        held, train = model(probes.heldout.inputs), model(probes.train.inputs)
    assert final["test_loss"] == pytest.approx(
        F.cross_entropy(held, probes.heldout.targets).item(), rel=1e-5
    )
    train_acc = (train.argmax(1) == probes.train.targets).float().mean().item()
    assert final["train_acc"] == pytest.approx(train_acc)
    draws = Context(torch.Generator(), 1, seed=callback.seed).draws(probes.heldout)
    s = output_sensitivity(model, probes.heldout.inputs, sigma=0.2, num_draws=3, generator=draws)
    assert final["sensitivity"] == pytest.approx(s.item(), rel=1e-4)
    x2 = input_second_moment(probes.heldout.inputs)
    bias = softmax_mse(train, probes.train.targets)
    expected = predicted_test_loss(s, num_classes=10, input_second_moment=x2, sigma=0.2, bias=bias)
    assert final["predicted_test_loss_bias"] == pytest.approx(expected.item(), rel=1e-4)
    variance = 0.9 * (s.item() * x2.item() / 0.04)
    assert final["bias_fraction"] == pytest.approx(bias.item() / (bias.item() + variance), rel=1e-4)
