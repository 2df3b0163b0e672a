"""DistanceFromInit logs how far the weights moved from those the fit started with."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from gapwatch import DistanceFromInit

from .conftest import fit, read_scalars


class KeepStart(Callback):
    """Copy the weights before the first optimizer step, independently of gapwatch."""

    def on_train_start(self, trainer, pl_module):
        self.start = copy.deepcopy(pl_module.state_dict())


def test_logged_distance_matches_numpy_on_the_start_and_final_weights(tmp_path):
    callback, start = DistanceFromInit(probe_size=64), KeepStart()
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    _, model = fit(tmp_path, [start, callback], max_epochs=2, logger=logger)
    # Every trainable parameter, BatchNorm's weight and bias included; no buffers.
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("bias" in name for name in names)
    now = {k: v.detach().cpu().double().numpy() for k, v in model.state_dict().items()}
    before = {k: v.cpu().double().numpy() for k, v in start.start.items()}
    moved = sum(((now[n] - before[n]) ** 2).sum() for n in names)
    norm = sum((before[n] ** 2).sum() for n in names)
    logged = read_scalars(logger.log_dir)["gapwatch/distance_from_init"]
    assert logged[0] == 0.0
    assert logged[max(logged)] == pytest.approx(np.sqrt(moved / norm), rel=1e-6)
    assert logged[max(logged)] > 0.01


def test_the_reference_is_taken_again_at_each_fit(tmp_path):
    callback = DistanceFromInit(probe_size=64)
    fit(tmp_path, [callback], max_epochs=1)
    first = callback.history[-1]["distance_from_init"]
    fit(tmp_path, [callback], max_epochs=1, seed=1)
    assert callback.history[0]["distance_from_init"] == 0.0
    assert callback.history[-1]["distance_from_init"] == pytest.approx(first, rel=0.5)
