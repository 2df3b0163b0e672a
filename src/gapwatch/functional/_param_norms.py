"""Liao-Poggio's layer norms ``rho_k`` and the weights of the normalized network (eq. 1).

``rho_k`` is the L_p norm of layer ``k``'s (BatchNorm-folded) weight, taken channel by
channel in float64 and kept as a log; the first layer's bias counts as the weight of a
constant input (section 2). :func:`_normalized_state` divides each layer's weight by
``rho_k`` and its additive terms by ``rho_1 ... rho_k``, so that the model computes
``f~ = f / rho`` directly, for the normalized cross-entropy (eq. 2).
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn

from gapwatch.functional._norm_layers import _BATCHNORM, _OUTPUT_MODE_HINT, _Layer


def _log_norms(model: nn.Module, layers: list[_Layer], p: float) -> Tensor:
    """``log rho_k`` of each layer, float64 ``[K]``: the norm of the per-channel norms.

    Channel by channel because that is what BatchNorm scales, and because one float32
    reduction over a whole large layer is inexact (1% off on VGG-11's 1e8-entry layer).
    The first layer's channels also hold its additive term (section 2: the input layer's
    bias is the weight of a constant input dimension), so ``rho_1 = ||[W_1 b_1]||_p``.
    """
    modules = dict(model.named_modules())
    norms = []
    for index, layer in enumerate(layers):
        if layer.batchnorm is None:
            channels = _channel_norms(modules[layer.weighted], p)
        else:
            channels = _batchnorm_scale(modules[layer.batchnorm], layer.batchnorm)
            if layer.weighted is not None:
                channels = channels * _channel_norms(modules[layer.weighted], p)
        offset = _offset(modules, layer) if index == 0 else None
        if offset is not None:
            channels = _norm(torch.stack([channels, offset]), p, dim=0)
        norms.append(_norm(channels, p, dim=0))
    return torch.stack(norms).log()


def _offset(modules: dict[str, nn.Module], layer: _Layer) -> Tensor | None:
    """The additive term of a layer's (BatchNorm-folded) affine map per channel, float64.

    ``b`` for a conv/linear, ``s (b - running_mean) + beta`` with a BatchNorm folded in
    (``s`` as in :func:`_batchnorm_scale`, ``b = 0`` without a bias), and
    ``beta - s running_mean`` for a lone BatchNorm; ``None`` for a layer without bias.
    """
    bias = None if layer.weighted is None else modules[layer.weighted].bias
    offset = None if bias is None else cast(Tensor, bias).detach().double()
    if layer.batchnorm is None:
        return offset
    batchnorm = modules[layer.batchnorm]
    scale = _batchnorm_scale(batchnorm, layer.batchnorm)
    mean = cast(Tensor, batchnorm.running_mean).double()
    offset = scale * (-mean if offset is None else offset - mean)
    shift = batchnorm.bias
    return offset if shift is None else offset + cast(Tensor, shift).detach().double()


def _channel_norms(module: nn.Module, p: float) -> Tensor:
    """L_p norm of each output channel's weights, float64 ``[C_out]``."""
    weight = cast(Tensor, module.weight).detach()
    if getattr(module, "transposed", False):
        # ConvTranspose stores [C_in, C_out / groups, *kernel]; group g owns output channels
        # g * C_out / groups + j.
        weight = weight.unflatten(0, (module.groups, -1))
        return _norm(weight, p, dim=(1, *range(3, weight.ndim))).flatten()
    return _norm(weight, p, dim=tuple(range(1, weight.ndim)))


def _batchnorm_scale(batchnorm: nn.Module, name: str) -> Tensor:
    """The eval-mode per-channel factor ``gamma / sqrt(running_var + eps)``, float64."""
    assert isinstance(batchnorm, _BATCHNORM)  # for the type checker
    if batchnorm.running_var is None:
        raise ValueError(
            f"BatchNorm `{name}` keeps no running statistics (track_running_stats=False), so "
            f"it is not a fixed affine map and has no norm. " + _OUTPUT_MODE_HINT
        )
    scale = (batchnorm.running_var.double() + batchnorm.eps).rsqrt()
    return scale if batchnorm.weight is None else scale * batchnorm.weight.detach().double()


def _norm(x: Tensor, p: float, dim: int | tuple[int, ...]) -> Tensor:
    """L_p norm along ``dim`` in float64, exact for entries of any size.

    ``torch.linalg.vector_norm`` raises float32 entries to the power p in float32, so weights
    of ``1e30`` overflow to inf and ``1e-30`` flush to zero: divide by the largest first.
    """
    peak = torch.maximum(x.amax(dim=dim, keepdim=True), x.amin(dim=dim, keepdim=True).neg())
    if p == math.inf:
        return peak.squeeze(dim).double()
    unit = torch.linalg.vector_norm(x / peak.clamp_min(torch.finfo(x.dtype).tiny), ord=p, dim=dim)
    return peak.squeeze(dim).double() * unit.double()


def _normalized_state(
    model: nn.Module, layers: list[_Layer], log_norms: Tensor
) -> dict[str, Tensor]:
    """Parameters and buffers that make ``model`` compute ``f / rho`` if it is homogeneous.

    Layer ``k`` receives its input divided by ``P_{k-1} = rho_1 ... rho_{k-1}`` and must
    return its output divided by ``P_k``: its weight is divided by ``rho_k`` and its
    additive terms (bias, BatchNorm shift and running mean) by ``P_k``. A lone BatchNorm
    divides its scale by ``rho_k`` and its running mean, which meets the input, by
    ``P_{k-1}``.
    """
    modules = dict(model.named_modules())
    state: dict[str, Tensor] = {}

    def divide(name: str, attribute: str, log_divisor: Tensor) -> None:
        tensor = getattr(modules[name], attribute)
        if tensor is not None:
            state[_key(name, attribute)] = tensor.detach() * (-log_divisor).exp().to(tensor.dtype)

    for layer, log_rho, log_product in zip(layers, log_norms, log_norms.cumsum(0), strict=True):
        weighted, batchnorm = layer.weighted, layer.batchnorm
        if weighted is not None:
            divide(weighted, "weight", log_rho)
            divide(weighted, "bias", log_product)
        if batchnorm is None:
            continue
        divide(batchnorm, "bias", log_product)
        divide(batchnorm, "running_mean", log_product if weighted else log_product - log_rho)
        if weighted is None and modules[batchnorm].weight is not None:
            divide(batchnorm, "weight", log_rho)
        elif weighted is None:  # no gamma to divide: multiply sqrt(var + eps) by rho instead
            variance, eps = modules[batchnorm].running_var, modules[batchnorm].eps
            grown = (variance.double() + eps) * (2 * log_rho).exp() - eps
            state[_key(batchnorm, "running_var")] = grown.to(variance.dtype)
    return state


def _key(module_name: str, attribute: str) -> str:
    """The ``functional_call`` key of a module's parameter or buffer (the root has no prefix)."""
    return f"{module_name}.{attribute}" if module_name else attribute
