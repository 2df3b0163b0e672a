"""The benchmark runner works end to end; its timings are reported, never asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.mark.slow
def test_quick_run_reports_every_case_and_gapwatch_agrees_with_the_baselines(tmp_path):
    out = tmp_path / "bench.jsonl"
    done = subprocess.run(
        # One thread: the test suite's workers already occupy the cores.
        [sys.executable, str(RUNNER), "--quick", "--threads", "1", "--out", str(out)],
        cwd=tmp_path,  # the runner must not depend on the working directory
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    lines = out.read_text().splitlines()
    printed = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert printed == lines
    assert "| case | setting | metric | measured | target | pass |" in done.stdout

    header, *rows = map(json.loads, lines)
    machine = header["machine"]
    assert machine["quick"] is True
    assert machine["repeats"] == 1
    assert machine["torch_threads"] == 1
    assert machine["cpu"]
    assert machine["torch"]

    assert sorted({row["case"] for row in rows}) == [1, 2, 3, 4, 5, 6, 7]
    for row in rows:
        assert row["targets"], row["name"]
        assert set(row["pass"]) == set(row["targets"]) <= set(row["metrics"])
        assert all(isinstance(ok, bool) for ok in row["pass"].values())
        # Finite, not necessarily positive: a memory growth is a difference of two peaks.
        assert all(math.isfinite(v) for v in row["metrics"].values()), row
        # The identical-results checks: gapwatch computed what the baselines computed.
        assert row["checks"], row["name"]
        assert all(row["checks"].values()), (row["name"], row["checks"])

    # Every functional proxy is measured at its defaults, the CIFAR-shaped exact case too.
    for row in rows:
        if row["case"] in (2, 3, 4, 7):
            assert row["setting"].endswith("defaults"), row["setting"]
    exact = [row for row in rows if row["case"] == 3]
    assert any("3x32x32" in row["setting"] for row in exact)
    # The first evaluation (setup + step 0) beside a regular one, for both networks.
    suites = [row for row in rows if row["case"] == 5]
    assert [("digits" in r["setting"], "ResNet" in r["setting"]) for r in suites] == [
        (True, False),
        (False, True),
    ]
    for row in suites:
        metrics = row["metrics"]
        assert {"suite_in_samples", "first_in_samples", "first_vs_regular"} <= set(metrics)
        assert "first_vs_regular" in row["targets"]
        setup = ["draw_probes", "AblationProxy.setup", "split_model", "step0_evaluation"]
        assert all(metrics[f"first.{part}_in_samples"] > 0 for part in setup), metrics
        # The parts are the total's: what they leave over is a small remainder.
        assert metrics["first.other_in_samples"] < 0.2 * metrics["first_in_samples"]

GPU_SCRIPT = RUNNER.parent / "gpu.py"


@pytest.mark.slow
def test_gpu_script_runs_reduced_on_the_cpu_and_writes_every_section(tmp_path):
    out = tmp_path / "results" / "gpu.json"
    # This tree's gapwatch, whatever the interpreter has installed.
    source = str(RUNNER.parents[1] / "src")
    path = os.pathsep.join([source, *filter(None, [os.environ.get("PYTHONPATH")])])
    done = subprocess.run(
        [sys.executable, str(GPU_SCRIPT), "--device", "cpu", "--reduced", "--out", str(out)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())

    config = results["config"]
    assert config["device"] == "cpu"
    assert config["reduced"] is True
    assert results["environment"]["torch"]

    timing = results["timing"]
    assert len(timing["plain_train_epoch_seconds"]) == config["plain_epochs"]
    assert len(timing["monitored_train_epoch_seconds"]) == config["monitored_epochs"]
    evaluations = timing["evaluations"]
    # Step 0, then the end of every monitored epoch.
    steps = [e["step"] for e in evaluations]
    assert steps[0] == 0
    assert steps == sorted(set(steps))
    assert len(evaluations) == 1 + config["monitored_epochs"]
    seconds = [e["seconds"] for e in evaluations]
    assert all(math.isfinite(s) and s > 0 for s in seconds)
    epoch = timing["plain_train_epoch_seconds"][1]
    assert timing["suite_fraction_of_epoch"] == pytest.approx(
        timing["evaluation_seconds_median"] / epoch
    )
    assert timing["within_target"] == (timing["suite_fraction_of_epoch"] <= 0.02)
    expected = {"test_loss", "gap", "sensitivity", "jacobian_norm", "normalized_train_loss"}
    assert expected | {"ablation_zeta", "ablation_kappa"} <= set(timing["logged"])
    assert timing["ablation_layer"] == "net.layer4"
    assert timing["normalization"] == "output"  # "auto" on a residual network

    assert results["memory"]["available"] is False  # CUDA allocator statistics only
    interference = results["interference"]
    assert interference["bitwise_identical"] is True
    assert interference["differing"] == []
    assert interference["evaluations_with_suite"] >= 2
    assert interference["tensors_compared"] > 100  # every ResNet-18 weight and buffer
    assert results["early_phase"]["value"] is None
    assert "schedule" in results["early_phase"]["reason"]
    assert results["tests"]["ran"] is False
    assert 0 < results["seconds"] < 600
