"""The prepared GPU run of issue 16: CUDA tests, the suite's cost and memory, non-interference.

Usage::

    bash benchmarks/gpu.sh                                   # on the GPU: all of it, <= 8 min
    python benchmarks/gpu.py --device cpu --reduced --out X  # the CPU smoke test, < 1 min

Sections, each recorded in one JSON file (default ``benchmarks/results/gpu.json``) even
if another fails:

* ``interference``: training twice for a few steps with ``cudnn.deterministic=True`` and
  Lightning's ``deterministic=True``, once with the suite evaluating every other step, must
  end in bitwise identical weights and buffers.
* ``timing`` and ``memory``: a CIFAR-shaped ResNet-18 (torchvision's, with a 3x3 stride-1
  stem and no max-pool) trains on synthetic 3x32x32 data in batches of 256 with
  ``precision="bf16-mixed"``, 50,000 samples per epoch, once plain and once with
  ``GeneralizationMonitor()``, the default suite (its ``normalization="auto"`` takes the
  output norm for a residual network). Each evaluation is timed with a
  ``torch.cuda.synchronize()`` on both sides (what the training job waits for) and with
  CUDA events (GPU time), and set against the plain run's training epoch (first epoch
  excluded: cuDNN and allocator warm-up). Peak memory is ``torch.cuda.max_memory_allocated``
  after a reset, above what was allocated before, for one evaluation and one training step.
* ``tests``: ``pytest --device cuda`` over the device-aware tests (CUDA only).

``--reduced`` shrinks everything (torchvision's own stem, 32 samples, batch 16, 32-bit
on the CPU) so that the script itself is tested on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

# Before torch touches cuBLAS: deterministic algorithms need a fixed workspace.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch
from gpu_training import Config, interference, timing_and_memory

ROOT = Path(__file__).resolve().parents[1]
BUDGET_SECONDS = 480  # the 8 minutes; the tests get what the measurements left


def tests(config: Config, timeout: float) -> dict[str, Any]:
    """``pytest --device cuda`` over the device-aware tests, with a JUnit report read back."""
    report = Path(tempfile.mkdtemp()) / "gpu-tests.xml"
    workers = ["-n", "8"] if importlib.util.find_spec("xdist") else []
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--device",
               config.device, *workers, f"--junitxml={report}", "tests/functional",
               "tests/callbacks", "tests/test_device_option.py"]  # fmt: skip
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as expired:
        tail = (expired.stdout or b"")[-4000:]
        return {"command": " ".join(command[1:]), "timed_out": True, "timeout_s": timeout,
                "tail": tail.decode() if isinstance(tail, bytes) else tail}  # fmt: skip
    if not report.exists():  # pytest stopped before collecting (a usage error)
        return {"command": " ".join(command[1:]), "returncode": done.returncode,
                "tail": (done.stdout + done.stderr)[-3000:]}  # fmt: skip
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {"command": " ".join(command[1:]), "returncode": done.returncode,
            "seconds": time.perf_counter() - start, **counts, "failed": failed,
            "tail": done.stdout[-3000:]}  # fmt: skip


def environment(config: Config) -> dict[str, Any]:
    device = torch.device(config.device)
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": version("lightning"),
        "torchvision": version("torchvision"),
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info |= {
            "gpu": properties.name,
            "gpu_memory_bytes": properties.total_memory,
            "cudnn": torch.backends.cudnn.version(),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        }
    return info


def section(
    results: dict[str, Any], name: str, run: Callable[[], dict[str, Any]], out: Path
) -> None:
    """Run one section into ``results`` and save them; a failure is recorded, not raised.

    Saving after every section leaves the finished ones on disk if the run is cut short.
    """
    start = time.perf_counter()
    try:
        results[name] = run()
    except Exception as error:  # one failing section must not lose the others
        results[name] = {"error": repr(error), "traceback": traceback.format_exc()[-4000:]}
    print(f"gpu.py: {name} done in {time.perf_counter() - start:.1f} s", flush=True)
    save(results, out)


def save(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default="cuda", help="'cuda' (default), 'cuda:N' or 'cpu'")
    parser.add_argument("--reduced", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gpu.json")
    parser.add_argument("--skip-tests", action="store_true", help="measure only")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False; use --device cpu")
    config = Config.of(args.device, args.reduced)
    begin = time.perf_counter()
    results: dict[str, Any] = {"config": asdict(config), "environment": environment(config)}
    # Timing first: the deterministic mode of the interference check would slow it down.
    section(results, "measurements", lambda: timing_and_memory(config), args.out)
    if "error" not in results["measurements"]:
        results |= results.pop("measurements")  # its "timing" and "memory"
    section(results, "interference", lambda: interference(config), args.out)
    results["early_phase"] = {
        "value": None,
        "reason": "gapwatch has no early-phase schedule yet (issue 16, item 2b); "
        "time it here, beside `timing`, once it exists",
    }
    if args.skip_tests or not args.device.startswith("cuda"):
        results["tests"] = {"ran": False, "reason": "CUDA only; on the CPU run `make test`"}
    else:
        left = BUDGET_SECONDS - (time.perf_counter() - begin) - 15
        section(results, "tests", lambda: tests(config, max(left, 60)), args.out)
    results["seconds"] = time.perf_counter() - begin
    save(results, args.out)
    problems = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    if results["interference"].get("bitwise_identical") is False:
        problems.append("interference: training changed with the suite")
    if results["tests"].get("returncode", 0) != 0 or results["tests"].get("timed_out"):
        problems.append("tests: failed or timed out")
    print(f"gpu.py: wrote {args.out} in {results['seconds']:.0f} s; problems: {problems}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
