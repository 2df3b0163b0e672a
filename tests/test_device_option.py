"""``pytest --device`` and ``GAPWATCH_TEST_DEVICE`` choose the device of the device-aware tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import conftest

ROOT = Path(__file__).resolve().parents[1]
# A test file that is quick to collect; the option is checked before any test runs.
TARGET = "tests/functional/test_common.py"


def _pytest(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, TARGET],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("via", ["option", "environment"])
def test_cuda_without_cuda_stops_the_run_with_a_clear_message(via):
    # CUDA_VISIBLE_DEVICES="" hides every GPU, so this holds on a GPU machine as well.
    hidden = {"CUDA_VISIBLE_DEVICES": ""}
    if via == "option":
        done = _pytest("--device", "cuda", **hidden)
    else:
        done = _pytest(**hidden, GAPWATCH_TEST_DEVICE="cuda")
    assert done.returncode == 4, done.stdout + done.stderr  # pytest's usage error
    assert "torch.cuda.is_available() is False" in done.stderr
    assert "use --device cpu" in done.stderr
    assert " passed" not in done.stdout


def test_an_unknown_device_is_refused():
    done = _pytest("--device", "tpu")
    assert done.returncode == 4
    assert "'tpu' is not a torch device" in done.stderr


def test_cpu_is_the_default_and_the_header_names_the_device():
    done = _pytest(GAPWATCH_TEST_DEVICE="")
    assert done.returncode == 0, done.stdout + done.stderr
    # -q drops the header; the device shows in the default verbosity.
    verbose = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--co", "--device", "cpu",
         TARGET],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "gapwatch test device: cpu" in verbose.stdout


def test_the_fixtures_live_on_the_chosen_device(request, device, digits, mlp, cnn):
    # The module that helpers import is the conftest pytest configured, not a second copy.
    assert conftest in request.config.pluginmanager.get_plugins()
    assert device == conftest.DEVICE
    assert digits[0].device == device
    assert digits[1].device == device
    assert next(mlp.parameters()).device == device
    assert next(cnn.parameters()).device == device
    assert all(b.device == device for b in cnn.buffers())
    assert conftest.resolve_device("cpu") == torch.device("cpu")
