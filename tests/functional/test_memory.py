"""Peak memory of every proxy grows with ``batch_size``, not with the probe size.

With K = 1000 outputs, one float32 row of outputs is 4 kB: anything that keeps ``[N, K]``
alive (logits, softmax, a float64 copy) adds at least that much per probe sample. Per-sample
state that a proxy legitimately keeps (a norm, a count, the ablated layer's activation) is
far below it. The test runs each proxy on two probe sizes with the same ``batch_size`` and
bounds the growth of the peak by a quarter of a row per extra sample.

``tracemalloc`` cannot see torch's CPU allocations; the profiler's allocation events can.
Each event (in the profiler's event tree, which torch's own memory profiler reads) carries
the signed size of one allocation or release, so their running sum in time order is the
memory torch holds, and its maximum is the peak of the call.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from gapwatch.functional import (
    jacobian_norm,
    normalized_cross_entropy,
    output_sensitivity,
    transitions,
    unit_ablation,
)

K = 1000
BATCH = 16
#: Bytes an extra probe sample may add to the peak: a quarter of one float32 row of K outputs.
PER_SAMPLE = K


def torch_cpu_peak(fn: Callable[[], object]) -> int:
    """Peak bytes that torch's CPU allocator held above its level at the start of ``fn()``."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        pending.extend(node.children)
        size = getattr(node.typed[1], "alloc_size", None)  # set on allocation events only
        if size is not None:
            events.append((node.start_time_ns, size))
    held = peak = 0
    for _, size in sorted(events):
        held += size
        peak = max(peak, held)
    return peak


def _seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


Proxy = Callable[[nn.Module, Tensor, Tensor], object]

PROXIES: dict[str, Proxy] = {
    "output_sensitivity": lambda m, x, y: output_sensitivity(
        m, x, num_draws=2, batch_size=BATCH, generator=_seeded()
    ),
    "output_sensitivity_after_softmax": lambda m, x, y: output_sensitivity(
        m, x, after_softmax=True, batch_size=BATCH, generator=_seeded()
    ),
    "jacobian_projection": lambda m, x, y: jacobian_norm(
        m, x, batch_size=BATCH, generator=_seeded()
    ),
    "normalized_cross_entropy": lambda m, x, y: normalized_cross_entropy(m, x, y, batch_size=BATCH),
    "normalized_cross_entropy_output": lambda m, x, y: normalized_cross_entropy(
        m, x, y, mode="output", reference_inputs=x, batch_size=BATCH
    ),
    "unit_ablation": lambda m, x, y: unit_ablation(
        m, "2", x, y, num_classes=K, classes=[0, 1, 2, 3], batch_size=BATCH
    ),
    # Each image is a loop of 8 W + 1 = 65 rows: fewer images keep the work comparable.
    "transitions": lambda m, x, y: transitions(m, x[: len(x) // 8], batch_size=BATCH),
}


@pytest.fixture(scope="module")
def wide() -> nn.Module:
    """A small ReLU MLP for ``[N, 1, 8, 8]`` inputs with K = 1000 outputs."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, K))


def _probe(num_samples: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(num_samples)
    inputs = torch.randn(num_samples, 1, 8, 8, generator=generator)
    return inputs, torch.randint(0, 4, (num_samples,), generator=generator)


def _growth(proxy: Proxy, model: nn.Module, small: int, large: int) -> int:
    """Extra peak bytes of ``proxy`` on ``large`` rather than ``small`` probe samples."""
    peaks = []
    for num_samples in (small, large):
        inputs, targets = _probe(num_samples)
        peaks.append(torch_cpu_peak(lambda: proxy(model, inputs, targets)))  # noqa: B023
    return peaks[1] - peaks[0]


def test_the_measure_sees_an_unchunked_forward_pass(wide):
    with torch.no_grad():
        growth = _growth(lambda m, x, y: m(x), wide, 64, 512)
    assert growth >= (512 - 64) * K * 4  # the [N, K] float32 outputs


@pytest.mark.parametrize("name", PROXIES)
def test_peak_memory_grows_with_batch_size_not_probe_size(name, wide):
    growth = _growth(PROXIES[name], wide, 64, 512)
    assert growth <= (512 - 64) * PER_SAMPLE, f"{growth / (512 - 64):.0f} bytes per sample"


def test_exact_jacobian_memory_does_not_grow_with_probe_size(wide):
    # K backward passes per chunk: one chunk against two keeps it quick.
    exact = lambda m, x, y: jacobian_norm(m, x, method="exact", batch_size=4)  # noqa: E731
    assert _growth(exact, wide, 4, 8) <= 4 * PER_SAMPLE
