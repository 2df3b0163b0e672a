"""Data parallelism on CPU (gloo): no deadlock, reduced values equal single-process ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from .conftest import read_scalars

SCRIPT = Path(__file__).with_name("ddp_run.py")
# Deterministic proxies must agree to float tolerance; the sensitivity's noise rows are
# drawn per shard, so it agrees in distribution only (its standard error on 200 probes
# is about sqrt(2 / 200) = 10%).
EXACT = [
    "test_loss", "test_acc", "train_loss", "train_acc", "gap", "jacobian_norm",
    "normalized_train_loss", "normalized_test_loss", "log_norm_product",
    "ablation_zeta", "ablation_kappa", "transitions",
]  # fmt: skip
NOISY = ["sensitivity", "predicted_test_loss", "predicted_test_loss_bias", "bias_fraction"]


def _run(strategy: str, devices: int, logdir: Path) -> dict[str, dict[int, Any]]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run(
        [sys.executable, str(SCRIPT), strategy, str(devices), str(logdir)],
        check=True,
        timeout=600,
        env=env,
        capture_output=True,
    )
    return read_scalars(logdir) | _histograms(logdir)


def _histograms(logdir: Path) -> dict[str, dict[int, tuple[float, float]]]:
    """``{tag: {step: (count, sum)}}`` of every histogram in the run."""
    (file,) = logdir.rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(file), size_guidance={"histograms": 0})
    accumulator.Reload()
    return {
        tag: {e.step: (e.histogram_value.num, e.histogram_value.sum) for e in events}
        for tag in accumulator.Tags()["histograms"]
        if (events := accumulator.Histograms(tag))
    }


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run("auto", 1, tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp"])
def test_ddp_reduces_to_the_single_process_values(strategy, single, tmp_path):
    parallel = _run(strategy, 2, tmp_path)
    assert len(list(tmp_path.rglob("events.out.tfevents.*"))) == 1, "only rank 0 writes"
    for name in EXACT:
        tag = f"gapwatch/{name}"
        assert parallel[tag][0] == pytest.approx(single[tag][0], rel=1e-5, abs=1e-6), tag
    for name in NOISY:
        tag = f"gapwatch/{name}"
        assert parallel[tag][0] == pytest.approx(single[tag][0], rel=0.3), tag
    # Rank 0's histogram holds every process's per-sample norms, not its shard alone.
    count, total = parallel["gapwatch/histograms/jacobian_norm"][0]
    assert count == 200
    assert (count, total) == pytest.approx(single["gapwatch/histograms/jacobian_norm"][0])
    # After step 0 the runs train differently (two shards of each batch), but the
    # evaluation at the end of the epoch must have happened on both ranks without a hang.
    assert len(parallel["gapwatch/test_loss"]) == 2
