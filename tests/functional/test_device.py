"""What a CPU run cannot show: on CUDA the proxies keep the GPU busy and memory bounded.

Run with ``pytest --device cuda``; on the CPU these tests are skipped (the CPU-side
versions of the memory bound are in ``test_memory.py``).

* A host synchronization (``.item()``, a boolean-mask index, a copy from pageable host
  memory) in the loop over chunks makes the CPU wait for the GPU once per chunk, so the
  GPU idles while the next chunk is launched. ``torch.cuda.set_sync_debug_mode("error")``
  turns every such wait into an exception.
* Peak memory is read from the CUDA caching allocator, which the CPU profiler of
  ``test_memory.py`` cannot see.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from gapwatch.functional import jacobian_norm, output_sensitivity, transitions
from gapwatch.functional._draws import RowSeeds, draw, make_generator
from tests import conftest
from tests.functional.test_memory import PER_SAMPLE, PROXIES, K, _probe

requires_cuda = pytest.mark.skipif(
    conftest.DEVICE.type != "cuda", reason="CUDA-only: run with pytest --device cuda"
)

SyncFree = Callable[[nn.Module, Tensor, torch.Generator], Tensor]

#: Proxies whose whole call, given inputs and a generator on the GPU, never waits on it.
SYNC_FREE: dict[str, SyncFree] = {
    "output_sensitivity": lambda m, x, g: output_sensitivity(
        m, x, num_draws=2, batch_size=16, generator=g
    ),
    "output_sensitivity_after_softmax": lambda m, x, g: output_sensitivity(
        m, x, after_softmax=True, batch_size=16, generator=g
    ),
    "jacobian_projection": lambda m, x, g: jacobian_norm(m, x, batch_size=16, generator=g),
    "jacobian_exact": lambda m, x, g: jacobian_norm(m, x, method="exact", batch_size=16),
    "transitions": lambda m, x, g: transitions(m, x[:4], batch_size=50),
}


def test_draws_arrive_on_the_device_from_the_generators_own_stream(device):
    fresh = make_generator(None, device)
    assert fresh.device.type == device.type
    rows = torch.arange(5)
    cpu_stream = draw(torch.Generator().manual_seed(0), rows, (3,), device)
    assert cpu_stream.device == device
    # A CPU generator gives the same numbers whatever device the model is on.
    expected = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cpu_stream.cpu(), expected)
    assert draw(fresh, torch.arange(2), (), device).device == device
    # Row-keyed draws: row i's numbers from its own seed, on any device.
    keyed = draw(RowSeeds(torch.tensor([7, 9])), torch.tensor([1, 0]), (3,), device)
    own = torch.randn(3, generator=torch.Generator().manual_seed(9 * 2**16))
    assert torch.equal(keyed[0].cpu(), own)


@requires_cuda
@pytest.mark.parametrize("name", SYNC_FREE)
def test_no_host_synchronization_in_the_loop_over_chunks(name, cnn, digits, device):
    run = SYNC_FREE[name]
    x = digits[0][:64]
    run(cnn, x, torch.Generator(device=device).manual_seed(0))  # cuDNN/cuBLAS set-up
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        value = run(cnn, x, torch.Generator(device=device).manual_seed(0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert value.device == device
    assert torch.isfinite(value).all()


def _gpu_peak(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes the CUDA caching allocator handed out above its level before ``fn()``."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def _gpu_growth(proxy: Callable[[nn.Module, Tensor, Tensor], object], device, small, large):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, K))
    model.to(device)
    peaks = []
    for num_samples in (small, large):
        inputs, targets = (t.to(device) for t in _probe(num_samples))
        peaks.append(_gpu_peak(lambda: proxy(model, inputs, targets), device))  # noqa: B023
    return peaks[1] - peaks[0]


@requires_cuda
def test_the_gpu_measure_sees_an_unchunked_forward_pass(device):
    with torch.no_grad():
        growth = _gpu_growth(lambda m, x, y: m(x), device, 64, 512)
    assert growth >= (512 - 64) * K * 4


@requires_cuda
@pytest.mark.parametrize("name", PROXIES)
def test_peak_gpu_memory_grows_with_batch_size_not_probe_size(name, device):
    growth = _gpu_growth(PROXIES[name], device, 64, 512)
    assert growth <= (512 - 64) * PER_SAMPLE, f"{growth / (512 - 64):.0f} bytes per sample"
