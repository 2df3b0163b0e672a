"""NormalizedLoss logs what the functional computes on the same probes and weights."""

from __future__ import annotations

import math

import pytest

from gapwatch import NormalizedLoss
from gapwatch.functional import normalization_factor, normalized_cross_entropy

from .conftest import fit


@pytest.mark.parametrize("mode", ["layerwise", "output"])
def test_normalized_loss(tmp_path, mode):
    callback = NormalizedLoss(mode=mode, p=2, probe_size=64)
    _, model = fit(tmp_path, [callback], max_epochs=1)
    probes, final = callback._probes, callback.history[-1]
    reference = probes.train.inputs[:8] if mode == "output" else None
    options = {"mode": mode, "reference_inputs": reference}
    log_rho = normalization_factor(model, log=True, **options).item()
    assert final["log_norm_product"] == pytest.approx(log_rho, rel=1e-6)
    for role, probe in (("train", probes.train), ("test", probes.heldout)):
        loss = normalized_cross_entropy(model, probe.inputs, probe.targets, **options).item()
        assert final[f"normalized_{role}_loss"] == pytest.approx(loss, rel=1e-6)
        assert final[f"normalized_{role}_loss"] < math.log(10)
