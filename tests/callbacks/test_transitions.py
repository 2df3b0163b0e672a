"""Transitions logs what the functional computes on the same probes and weights."""

from __future__ import annotations

import pytest

from gapwatch import Transitions
from gapwatch.functional import transitions

from .conftest import fit


def test_transitions(tmp_path):
    callback = Transitions(num_points=16, max_images=3, probe_size=64)
    _, model = fit(tmp_path, [callback], max_epochs=1)
    expected = transitions(model, callback._probes.heldout.inputs[:3], num_points=16)
    assert callback.history[-1]["transitions"] == pytest.approx(expected.item())
