"""Case 6: peak memory of the exact Jacobian grows with ``batch_size``, not with the probes.

How it is measured. tracemalloc cannot see torch's CPU allocations (they bypass Python's
allocator), so the peak is read from the kernel: the resident-set high-water mark of a
process that runs one setting. The runner starts a fresh interpreter (this file as a
script) that only imports, and forks one process per setting from it, so that no setting
inherits the heap of the runner or of another setting. In each:

- glibc is told to serve every block of 16 KiB or more with its own ``mmap``
  (``mallopt(M_MMAP_THRESHOLD)``), so that freed tensors leave the resident set at once
  and the peak follows live tensor memory, not heap fragmentation (without this, one
  setting's peak varied by several MiB from run to run);
- the model and probes are built and one warm-up call is made;
- freed memory is returned (``gc.collect``, ``malloc_trim``), the high-water mark reset
  (``5`` written to ``/proc/self/clear_refs``) and ``VmRSS`` read;
- after the call, ``VmHWM - VmRSS`` is the peak the call needed on top of what was there,
  every page torch touched, from ``malloc`` or ``mmap``.

Linux only. The processes run side by side; each reads its own peak.
"""

from __future__ import annotations

import ctypes
import gc
import json
import multiprocessing
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from common import Sizes, random_images, row, seeded
from torch import nn

from gapwatch.functional import jacobian_norm

IMAGE = (3, 64, 64)
_LIBC = ctypes.CDLL("libc.so.6")
_M_MMAP_THRESHOLD = -3  # mallopt parameter, from glibc's malloc.h


def pooled_mlp(outputs: int) -> nn.Module:
    """Average-pooled 64x64 images into a ReLU MLP with ``outputs`` outputs.

    On the CPU a convolution's backward pass costs 0.2-2 ms per sample here, and the
    exact method runs K = 1000 of them per sample; pooling keeps the grid of settings to
    a minute or two while every backward pass still writes a full 3x64x64 gradient.
    """
    return nn.Sequential(
        nn.AvgPool2d(4),
        nn.Flatten(),
        nn.Linear(IMAGE[0] * (IMAGE[1] // 4) * (IMAGE[2] // 4), 256),
        nn.ReLU(),
        nn.Linear(256, outputs),
    )


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE).group(1))


def _reset_peak() -> int:
    """Release freed memory, reset the high-water mark, and return the current RSS (KiB)."""
    gc.collect()
    _LIBC.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def measure(num_probes: int, batch_size: int, outputs: int, threads: int) -> dict[str, float]:
    """Peak extra MiB of one exact Jacobian-norm call, and the mean norm it returned."""
    torch.set_num_threads(threads)
    _LIBC.mallopt(_M_MMAP_THRESHOLD, 16 * 1024)
    model = seeded(lambda: pooled_mlp(outputs))
    inputs = random_images(num_probes, IMAGE)
    jacobian_norm(model, inputs[:2], method="exact")  # first-call allocations, kernels
    before = _reset_peak()
    norm = jacobian_norm(model, inputs, method="exact", batch_size=batch_size)
    peak = _status_kib("VmHWM")
    return {"peak_mib": (peak - before) / 1024, "mean_norm": float(norm)}


def _in_fresh_processes(settings: list[tuple[int, ...]]) -> list[dict[str, float]]:
    """``measure`` for each setting, each in a process of its own (see the module doc)."""
    command = [sys.executable, __file__, json.dumps(settings)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def _forked(settings: list[tuple[int, ...]]) -> list[dict[str, float]]:
    """``measure`` for each setting in a process forked from this one, side by side."""
    context = multiprocessing.get_context("fork")
    with context.Pool(len(settings), maxtasksperchild=1) as pool:
        return pool.starmap(measure, settings)


def run(sizes: Sizes) -> list[dict[str, Any]]:
    """The peak for every (probes, batch_size) pair, and its growth along both axes."""
    outputs = sizes.pick(1000, 100)
    probe_counts, batch_sizes = sizes.pick(((64, 256), (16, 64)), ((8, 32), (4, 8)))
    grid = [(n, b) for n in probe_counts for b in batch_sizes]
    threads = torch.get_num_threads()
    results = _in_fresh_processes([(n, b, outputs, threads) for n, b in grid])
    peaks = {key: result["peak_mib"] for key, result in zip(grid, results, strict=True)}
    norms = {key: result["mean_norm"] for key, result in zip(grid, results, strict=True)}
    few, many = probe_counts
    small, large = batch_sizes
    added_probes_mib = (many - few) * torch.Size(IMAGE).numel() * 4 / 2**20
    table = {f"peak_mib_probes{n}_batch{b}": mib for (n, b), mib in peaks.items()}
    same = {
        f"same_norm_for_every_batch_size_probes{n}": all(
            abs(norms[n, b] - norms[n, small]) <= 1e-5 * abs(norms[n, small]) for b in batch_sizes
        )
        for n in probe_counts
    }
    return [
        row(
            6,
            "jacobian_exact_memory",
            f"exact, K={outputs}, {'x'.join(map(str, IMAGE))} inputs, pooled MLP",
            metrics={
                **table,
                "growth_with_probes": max(peaks[many, b] - peaks[few, b] for b in batch_sizes)
                / added_probes_mib,
                "growth_with_batch_size": min(
                    peaks[n, large] / peaks[n, small] for n in probe_counts
                ),
            },
            targets={"growth_with_probes": ("<=", 0.1), "growth_with_batch_size": (">=", 1.5)},
            checks=same,
            seconds={},
            note=f"peaks: MiB above the pre-call RSS, a fresh process each; growth_with_probes: "
            f"peak({many} probes) - peak({few}) (worst batch size) over the "
            f"{added_probes_mib:g} MiB the added probes occupy; growth_with_batch_size: "
            f"peak(batch {large}) / peak(batch {small}) (least)",
        )
    ]


if __name__ == "__main__":
    # The fresh interpreter of `_in_fresh_processes`: settings in, peaks out, as JSON.
    print(json.dumps(_forked(json.loads(sys.argv[1]))))
