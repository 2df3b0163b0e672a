"""Data parallelism on CPU (gloo): no deadlock, reduced values equal single-process ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from .conftest import read_scalars

SCRIPT = Path(__file__).with_name("ddp_run.py")
# Every random draw is keyed to its probe row, so every value equals the single-process
# one to float tolerance (summation order differs between processes).
NAMES = [
    "test_loss", "test_acc", "train_loss", "train_acc", "gap", "jacobian_norm",
    "normalized_train_loss", "normalized_test_loss", "log_norm_product",
    "ablation_zeta", "ablation_kappa", "transitions",
    "sensitivity", "predicted_test_loss", "predicted_test_loss_bias", "bias_fraction",
    "margin_q10", "distance_from_init",
    "test_loss_se", "test_acc_se", "train_loss_se", "train_acc_se", "gap_se",
    "jacobian_norm_se", "normalized_train_loss_se", "normalized_test_loss_se",
    "transitions_se", "sensitivity_se",
]  # fmt: skip


def _run(strategy: str, devices: int, logdir: Path, heldout: int | None = None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    extra = [] if heldout is None else [str(heldout)]
    subprocess.run(
        [sys.executable, str(SCRIPT), strategy, str(devices), str(logdir), *extra],
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


@pytest.mark.parametrize(("strategy", "devices"), [("ddp_spawn", 2), ("ddp", 3)])
def test_ddp_equals_the_single_process_values(strategy, devices, single, tmp_path):
    parallel = _run(strategy, devices, tmp_path)
    assert len(list(tmp_path.rglob("events.out.tfevents.*"))) == 1, "only rank 0 writes"
    for name in NAMES:
        tag = f"gapwatch/{name}"
        assert parallel[tag][0] == pytest.approx(single[tag][0], rel=1e-5, abs=1e-7), tag
    # Rank 0's histogram holds every process's per-sample norms, not its shard alone.
    count, total = parallel["gapwatch/histograms/jacobian_norm"][0]
    assert count == 200
    assert (count, total) == pytest.approx(single["gapwatch/histograms/jacobian_norm"][0])
    # After step 0 the runs train differently (shards of each batch), but the evaluation
    # at the end of the epoch must have happened on every rank without a hang.
    assert len(parallel["gapwatch/test_loss"]) == 2


def test_a_one_sample_heldout_set_over_three_processes(tmp_path):
    single = _run("auto", 1, tmp_path / "single", heldout=1)
    parallel = _run("ddp", 3, tmp_path / "parallel", heldout=1)
    for name in NAMES:
        tag = f"gapwatch/{name}"
        # One held-out sample has no standard error: NaN on both sides.
        expected = pytest.approx(single[tag][0], rel=1e-5, abs=1e-7, nan_ok=True)
        assert parallel[tag][0] == expected, tag
