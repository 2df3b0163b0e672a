"""Linear-region transitions along a closed loop of image translations (Novak et al. 2018).

Every activation unit is coded by the region its pre-activation lies in; the code of the
whole network changes each time the input crosses a region boundary. Counting those
changes along a one-dimensional loop near the data estimates how finely the network cuts
input space up around it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor, nn

from gapwatch.functional._common import (
    DEFAULT_BATCH_SIZE,
    check_batch_size,
    check_choice,
    check_float32_model,
    check_inputs,
    check_positive,
    chunks,
    evaluation,
    model_device,
)

#: Default sampling density: ``num_points = POINTS_PER_SHIFT * W`` for images of width W.
POINTS_PER_SHIFT = 8

# Smooth activations have no linear regions; like the paper (footnote 2) they are split at 0.
_SPLIT_AT_ZERO = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softsign,
)


def _boundaries(module: nn.Module) -> tuple[float, ...] | None:
    """Sorted pre-activation values between the regions of ``module``'s units (None: no unit)."""
    if isinstance(module, nn.Hardtanh):  # ReLU6 is Hardtanh(0, 6)
        return (float(module.min_val), float(module.max_val))
    if isinstance(module, (nn.Hardsigmoid, nn.Hardswish)):
        return (-3.0, 3.0)
    if isinstance(module, (nn.Hardshrink, nn.Softshrink)):
        return (-float(module.lambd), float(module.lambd))
    if isinstance(module, nn.Threshold):
        return (float(module.threshold),)
    if isinstance(module, _SPLIT_AT_ZERO):
        return (0.0,)
    return None


def _record(
    codes: list[tuple[Tensor, Tensor]],
    bounds: Tensor,
    module: nn.Module,
    args: tuple[Tensor, ...],
) -> None:
    # One bit per (unit, boundary): the region index is the number of set bits, and since
    # the bits are monotone in the pre-activation, the L1 distance between two region
    # indices equals the number of differing bits. A NaN lies in no region: flag its row.
    pre = args[0].flatten(1)
    codes.append(((pre.unsqueeze(-1) > bounds).flatten(1), pre.isnan().any(1)))


def _on_device(values: tuple[float, ...], device: torch.device) -> Tensor:
    # Filled on the device, not copied from the host: a host-to-device copy of pageable
    # memory blocks the host, and the hook would otherwise make one per unit and chunk.
    return torch.stack([torch.full((), value, device=device) for value in values])


@contextmanager
def _coding(
    units: Sequence[tuple[nn.Module, tuple[float, ...]]], device: torch.device
) -> Iterator[list[tuple[Tensor, Tensor]]]:
    """Collect, forward by forward, each unit's ``(region bits, NaN rows)`` into the list."""
    codes: list[tuple[Tensor, Tensor]] = []
    handles = []
    try:
        for module, bounds in units:
            # A pre-hook sees the pre-activation before an inplace activation overwrites it.
            hook = partial(_record, codes, _on_device(bounds, device))
            handles.append(module.register_forward_pre_hook(hook))
        yield codes
    finally:
        for handle in handles:
            handle.remove()


def _loop_points(images: Tensor, which: Tensor, step: Tensor, num_points: int) -> Tensor:
    """Point ``step`` of the closed loop of ``images[which]`` (rows of ``which`` and ``step``).

    Point i sits at path parameter ``u = i W / k`` on the polygon through the horizontal
    translations ``roll(x, s)``, ``s = 0, ..., W - 1``, back to ``x``: a fraction
    ``u - floor(u)`` of the way from shift ``floor(u)`` to shift ``floor(u) + 1``.
    """
    width = images.shape[-1]
    # Integer arithmetic, so that every integer shift on the grid is hit exactly.
    shift, rest = step * width // num_points, step * width % num_points
    # roll(x, s)[..., w] == x[..., (w - s) % W]
    columns = (torch.arange(width, device=images.device) - shift[:, None]) % width
    source = images[which]
    start = source.gather(-1, columns[:, None, None, :].expand_as(source))
    end = source.gather(-1, ((columns - 1) % width)[:, None, None, :].expand_as(source))
    fraction = (rest / num_points).to(source.dtype)[:, None, None, None]
    return torch.lerp(start, end, fraction)


def transitions(
    model: nn.Module,
    inputs: Tensor,
    *,
    num_points: int | None = None,
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    reduction: str = "mean",
) -> Tensor:
    """Number of linear-region transitions along a closed loop of translations (Novak eq. 1).

    For each image ``x`` of width ``W``, the trajectory ``T(x)`` is the closed polygon through
    its horizontal translations with wrap-around, ``roll(x, s, dims=-1)`` for
    ``s = 0, ..., W - 1`` and back to ``x``: a loop that stays close to the
    translation-augmented data (Novak §3 and App. A.1, Fig. App.9). Its ``W`` segments have
    equal length (rolling is an isometry), so ``k = num_points`` points equidistant in the
    path parameter are equidistant along the loop. With ``c(z)`` the concatenated region
    index of every activation unit at input ``z``,

    ``t(x) = sum_{i=0}^{k-1} ||c(z_i) - c(z_{(i+1) mod k})||_1``.

    Region indices count the boundaries below the pre-activation: ReLU, LeakyReLU and PReLU
    have 2 regions split at 0; ReLU6, Hardtanh, Hardsigmoid, Hardswish, Hardshrink and
    Softshrink have 3, so a jump over both boundaries counts 2; smooth activations (Tanh,
    Sigmoid, GELU, ...) are split at 0 as in the paper's footnote 2. Only activation
    *modules* are coded, through forward pre-hooks: functional calls (``F.relu``) and
    max-pooling's choice of argmax are invisible. The count is exact once ``k`` is dense
    enough that no unit crosses a boundary twice between neighbouring points (App. A.1.2).
    A loop that meets a NaN pre-activation (weights gone NaN) counts NaN: a NaN is in no
    region.

    The points are streamed in chunks of ``batch_size`` rows (images x points); only the
    code of the previous point is kept, and each loop is closed by evaluating its start
    point once more, so memory does not grow with ``k``. Nothing is random.

    Args:
        model: The network, with its nonlinearities as modules (``nn.ReLU``, ...).
        inputs: Images ``[N, C, H, W]``, on any device.
        num_points: Points ``k`` on each loop, at least ``W``. Default ``8 W``
            (``POINTS_PER_SHIFT`` per pixel shift, so every integer translation is on it).
        batch_size: Rows (images x points) per forward pass: ``DEFAULT_BATCH_SIZE`` (128)
            unless given; ``None`` runs all ``N (k + 1)`` at once.
        reduction: ``"mean"`` over images, or ``"none"`` for one count per image.

    Returns:
        float32 tensor on the model's device: the mean count (0-d) or the counts ``[N]``.

    Raises:
        TypeError: If ``inputs`` is not a floating-point tensor.
        ValueError: If ``inputs`` are not images ``[N, C, H, W]``, ``num_points`` is not an
            integer >= ``W``, ``batch_size`` is not a positive integer, ``reduction`` is
            unknown, or the model has no supported activation module.
    """
    check_inputs(inputs)
    check_float32_model(model)
    if inputs.ndim != 4:
        raise ValueError(
            "`transitions` needs image inputs [N, C, H, W]: its trajectory is built from "
            f"horizontal translations of each image. Got shape {tuple(inputs.shape)}; reshape "
            "flat inputs to images (e.g. `x.view(-1, 1, 8, 8)`) and let the model flatten them."
        )
    width = inputs.shape[-1]
    num_points = POINTS_PER_SHIFT * width if num_points is None else num_points
    check_positive("num_points", num_points, integer=True)
    if num_points < width:
        raise ValueError(
            f"`num_points` must be at least the image width {width}, so that the loop is "
            f"sampled at least once per pixel shift; got {num_points}."
        )
    check_batch_size(batch_size)
    check_choice("reduction", reduction, ("mean", "none"))
    units = [(m, b) for m in model.modules() if (b := _boundaries(m)) is not None]
    if not units:
        raise ValueError(
            "`transitions` found no activation module (nn.ReLU, nn.ReLU6, nn.Tanh, ...) in "
            "the model: it codes linear regions through module hooks, so nonlinearities "
            "called functionally (F.relu) are invisible. Use activation modules instead."
        )

    device = model_device(model, inputs.device)
    stride = num_points + 1  # rows per image: the k loop points, then the start again
    counts = torch.zeros(inputs.shape[0], dtype=torch.long, device=device)
    nan_rows = torch.zeros(inputs.shape[0], dtype=torch.long, device=device)
    previous: Tensor | None = None
    with evaluation(model), torch.no_grad(), _coding(units, device) as codes:
        for rows in chunks(inputs.shape[0] * stride, batch_size):
            row = torch.arange(rows.start, rows.stop, device=device)
            image, step = row // stride, row % stride
            first = rows.start // stride
            images = inputs[first : (rows.stop - 1) // stride + 1].to(device, torch.float32)
            model(_loop_points(images, image - first, step, num_points))
            code = torch.cat([bits for bits, _ in codes], dim=1)
            # Counted with index_add_, not set through a boolean mask: a mask index waits
            # for the GPU to learn how many rows it selects, once per chunk.
            nan_rows.index_add_(0, image, torch.stack([nan for _, nan in codes]).any(0).long())
            codes.clear()
            # Row i is compared with row i - 1, carried over from the last chunk if need be;
            # the first row of each image has no predecessor on its own loop.
            before = torch.cat([code[:1] if previous is None else previous, code[:-1]])
            changes = (code ^ before).sum(dim=1).masked_fill_(step == 0, 0)
            counts.index_add_(0, image, changes)
            previous = code[-1:]
    counts = counts.float().masked_fill(nan_rows > 0, math.nan)
    return counts.mean() if reduction == "mean" else counts
