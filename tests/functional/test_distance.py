"""Relative distance from a weight snapshot against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gapwatch.functional.distance import distance_from_init, snapshot


def test_distance_matches_numpy_and_skips_frozen_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    model[2].bias.requires_grad_(False)
    reference = snapshot(model)
    assert "2.bias" not in reference
    assert "1.running_mean" not in reference
    start = {k: v.detach().double().numpy().copy() for k, v in model.named_parameters()}
    assert distance_from_init(model, reference) == 0.0
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    now = {k: v.detach().double().numpy() for k, v in model.named_parameters()}
    names = [k for k, v in model.named_parameters() if v.requires_grad]
    moved = sum(((now[n] - start[n]) ** 2).sum() for n in names)
    norm = sum((start[n] ** 2).sum() for n in names)
    assert distance_from_init(model, reference) == pytest.approx(np.sqrt(moved / norm))
    # The snapshot is a copy: changing the model does not change it.
    assert torch.equal(reference["0.weight"].double(), torch.from_numpy(start["0.weight"]))


def test_a_changed_model_is_named():
    reference = snapshot(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="changed shape"):
        distance_from_init(nn.Linear(5, 3), reference)
