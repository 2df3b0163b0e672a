"""Liao-Poggio: the cross-entropy of the network normalized by the product of its layer norms.

A ReLU network is positively homogeneous in each layer's weight, so ``f = rho f~`` with
``rho = rho_1 ... rho_K`` the product of the layer norms and ``f~`` the network whose layers
have unit norm (eq. 1). The loss of ``f~`` on the training set tracks its test loss (eq. 6).
Normalized outputs are tiny and the loss sits just below ``ln K`` (appendix K), so ``rho``
is kept as a sum of logs and losses are reduced in float64.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.func import functional_call

from gapwatch.functional._common import (
    DEFAULT_BATCH_SIZE,
    as_outputs,
    check_batch_size,
    check_choice,
    check_classifier,
    check_float32_model,
    check_inputs,
    check_positive,
    check_targets,
    chunks,
    evaluation,
    model_device,
    model_input,
)
from gapwatch.functional._inputs import Inputs, KeywordInputs

__all__ = ["normalization_factor", "normalized_cross_entropy"]

_MODES = ("layerwise", "output")
_WEIGHTED = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Modules that break f(c W_k) = c f(W_k): saturating or smooth activations, and
# normalizations that divide by a statistic of their input.
_NOT_HOMOGENEOUS = (
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,  # ReLU6 included
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Softplus,
    nn.Softsign,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LogSigmoid,
    nn.Softmax,
    nn.LogSoftmax,
    nn.GLU,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LocalResponseNorm,
)
_OUTPUT_MODE_HINT = (
    "Use mode='output' (Liao-Poggio appendix H), which normalizes by the norm of the "
    "model's output on reference inputs."
)
_warned: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@dataclass(frozen=True)
class _Layer:
    """One factor ``rho_k``: a conv/linear with its BatchNorm folded in, or a lone BatchNorm."""

    weighted: str | None
    batchnorm: str | None

    @staticmethod
    def of(name: str, module: nn.Module) -> _Layer:
        """The layer of a conv/linear without BatchNorm, or of a lone BatchNorm."""
        return _Layer(name, None) if isinstance(module, _WEIGHTED) else _Layer(None, name)


@torch.no_grad()
def normalization_factor(
    model: nn.Module,
    *,
    mode: str = "layerwise",
    p: float = 2,
    reference_inputs: Inputs | None = None,
    log: bool = False,
    batch_size: int | None = DEFAULT_BATCH_SIZE,
) -> Tensor:
    """The factor ``rho`` with ``f = rho f~`` (Liao-Poggio eq. 1).

    ``mode="layerwise"``: ``rho = prod_k ||W_k||_p`` over the model's ``nn.Linear`` and
    ``nn.Conv*`` / ``nn.ConvTranspose*`` layers, each weight flattened. An eval-mode
    BatchNorm is first folded into the conv/linear that feeds it (``W <- diag(s) W`` with
    ``s = gamma / sqrt(running_var + eps)``); a BatchNorm fed by anything else is a layer
    of its own, the diagonal matrix ``diag(s)``. The first layer's bias counts as the
    weight of a constant input dimension (section 2), as in the authors' code:
    ``rho_1 = ||[W_1 b_1]||_p``, with ``b_1`` the bias of the folded map
    (``s (b - running_mean) + beta`` under a BatchNorm). Later biases are not weights of
    any input; the normalized network divides them by ``rho_1 ... rho_k`` instead.
    The layers are found with ``torch.fx``; the model must be a chain (every weighted
    layer on every path from input to output), which rejects residual and parallel
    branches. Models that ``torch.fx`` cannot trace (data-dependent control flow) fall
    back to module registration order: that path assumes, unchecked, that ``forward``
    runs the registered modules once each, in order. A model with
    non-positively-homogeneous modules (Tanh, GELU, LayerNorm, ...) gets a warning once:
    ``rho`` is still the product of the norms, but ``f / rho`` is then not
    the weight-normalized network.

    ``mode="output"`` (appendix H): ``rho`` is the mean over ``reference_inputs`` of the
    L_p norm of the model's output vector, for architectures where the product of layer
    norms does not factor out of ``f`` (ResNets).

    Args:
        model: A network mapping ``[N, ...]`` inputs to ``[N, K]`` outputs.
        mode: ``"layerwise"`` or ``"output"``.
        p: Order of the norm: any positive number or ``math.inf``.
        reference_inputs: ``[M, ...]`` inputs; required (and only used) with
            ``mode="output"``.
        log: Return ``log rho`` instead of ``rho``.
        batch_size: Chunk size of the reference forward pass: ``DEFAULT_BATCH_SIZE`` (128)
            unless given; ``None``: all at once.

    Returns:
        A 0-d float64 tensor on the model's device: ``rho`` (``inf`` only past ``1e308``)
        or, with ``log=True``, ``log rho``.

    Raises:
        ValueError: Unknown ``mode``, ``p <= 0``, missing ``reference_inputs`` in output
            mode, or in layerwise mode a model that is not a chain, has no weighted layers,
            calls a layer twice, or has a BatchNorm without running statistics.
    """
    _check_options(mode, p, batch_size)
    if mode == "output":
        log_rho = _output_log_norm(model, reference_inputs, p, batch_size)
    else:
        _warn_if_not_homogeneous(model)
        log_rho = _log_norms(model, _layers(model), p).sum()
    return log_rho if log else log_rho.exp()


@torch.no_grad()
def normalized_cross_entropy(
    model: nn.Module,
    inputs: Inputs,
    targets: Tensor,
    *,
    mode: str = "layerwise",
    p: float = 2,
    reference_inputs: Inputs | None = None,
    scale: float = 1.0,
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    logits: Tensor | None = None,
    log_rho: Tensor | float | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Mean cross-entropy of ``R f(x) / rho`` (Liao-Poggio eq. 2 for K classes, eq. 6's R).

    For a positively homogeneous network (ReLU, LeakyReLU, max/average pooling), ``f / rho``
    with the layerwise ``rho`` of :func:`normalization_factor` *is* the network whose
    (BatchNorm-folded) weights are divided by their layer norms ``rho_k`` and whose biases
    and BatchNorm shifts are divided by ``rho_1 ... rho_k``, the product of the norms up
    to their layer. Without ``logits``, layerwise mode evaluates exactly that network (on
    a transient copy of the weights), so the loss stays finite even where ``f`` itself
    overflows float32. Otherwise (given ``logits``, output mode, or a model with
    non-homogeneous modules) the loss is computed from ``f`` as
    ``logits * exp(log R - log rho)``, which is ``ln K`` rather than NaN when ``rho``
    overflows, though not when ``f`` does.

    Args:
        model: A classifier mapping ``[N, ...]`` inputs to ``[N, K]`` logits, ``K >= 2``.
        inputs: ``[N, ...]`` inputs, on any device.
        targets: ``[N]`` integer class labels.
        mode: ``"layerwise"`` or ``"output"``, as in :func:`normalization_factor`.
        p: Order of the norm: any positive number or ``math.inf``.
        reference_inputs: ``[M, ...]`` inputs defining ``rho`` in output mode.
        scale: The scale ``R > 0`` of eq. 6; the paper's plots use ``R = 1``.
        batch_size: Chunk size of the forward passes: ``DEFAULT_BATCH_SIZE`` (128) unless
            given; ``None``: all at once.
        logits: The model's ``[N, K]`` eval-mode outputs on ``inputs``, if already
            computed, to skip the forward pass.
        log_rho: ``normalization_factor(model, log=True, ...)`` if already computed (with
            ``logits``, a caller evaluating several probes computes ``rho`` once).
        reduction: ``"mean"`` over the samples, or ``"none"``: each sample's loss.

    Returns:
        A 0-d float32 tensor: the normalized loss, just below ``ln K`` for ``R = 1``;
        with ``reduction="none"`` the ``[N]`` per-sample losses in float64 on the CPU
        (their differences sit in late decimals).

    Raises:
        ValueError: Bad options as in :func:`normalization_factor`, ``scale <= 0``,
            ``K < 2``, targets that do not match the inputs, or ``logits`` not ``[N, K]``.
        TypeError: Non-integer ``targets`` or non-floating ``inputs``.
    """
    _check_options(mode, p, batch_size)
    check_positive("scale", scale)
    check_choice("reduction", reduction, ("mean", "none"))
    check_targets(targets, check_inputs(inputs, floating=False).shape[0])
    check_float32_model(model)
    if logits is not None and (
        not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != inputs.shape[0]
    ):
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"`logits` must be the model's [N, K] outputs on `inputs` (N = {inputs.shape[0]}), "
            f"got {shape}; or leave logits=None to run the forward pass."
        )
    log_factor = torch.tensor(math.log(scale), dtype=torch.float64)
    state: dict[str, Tensor] = {}
    if log_rho is not None and logits is not None:
        log_factor = log_factor - torch.as_tensor(log_rho, dtype=torch.float64).cpu()
    elif mode == "output":
        log_factor = log_factor - _output_log_norm(model, reference_inputs, p, batch_size).cpu()
    else:
        layers = _layers(model)
        log_norms = _log_norms(model, layers, p)
        if _warn_if_not_homogeneous(model) and logits is None:
            state = _normalized_state(model, layers, log_norms)
        else:
            log_factor = log_factor - log_norms.sum().cpu()
    if logits is None:
        parts = _output_chunks(model, inputs, batch_size, state)
    else:
        parts = ((rows, logits[rows]) for rows in chunks(inputs.shape[0], batch_size))
    with evaluation(model):
        losses = [_cross_entropy(part, targets[rows], log_factor) for rows, part in parts]
    if reduction == "none":
        return torch.cat([loss.cpu() for loss in losses] or [torch.zeros(0, dtype=torch.float64)])
    return (torch.stack([loss.sum() for loss in losses]).sum() / inputs.shape[0]).float()


def _cross_entropy(logits: Tensor, targets: Tensor, log_factor: Tensor) -> Tensor:
    """Per-sample cross-entropy of ``logits * exp(log_factor)``, on the logits' device.

    In float64: the differences that matter sit in the 4th decimal below ln K (appendix K).
    A zero logit stays zero even when rho is 0 (a zero-initialized head, as torchvision's
    ViT has, makes every output 0): 0 / rho is 0 for every rho, not 0 * inf = NaN.
    """
    check_classifier(logits.shape[1], "normalized_cross_entropy")
    logits = logits.double()
    normalized = torch.where(logits == 0, 0.0, logits * log_factor.to(logits.device).exp())
    return F.cross_entropy(normalized, targets.to(logits.device), reduction="none")


def _check_options(mode: str, p: float, batch_size: int | None) -> None:
    check_choice("mode", mode, _MODES)
    check_positive("p", p, finite=False)
    check_batch_size(batch_size)


def _warn_if_not_homogeneous(model: nn.Module) -> bool:
    """Whether ``model`` is positively homogeneous as far as its modules show; warns once."""
    found = sorted({type(m).__name__ for m in model.modules() if isinstance(m, _NOT_HOMOGENEOUS)})
    if found and model not in _warned:
        _warned.add(model)
        warnings.warn(
            f"{type(model).__name__} contains modules that are not positively homogeneous "
            f"({', '.join(found)}): f / rho is then not the weight-normalized network; the "
            "normalized loss is computed as f / rho.",
            UserWarning,
            stacklevel=4,  # past this helper, the public function and torch.no_grad's wrapper
        )
    return not found


def _output_log_norm(
    model: nn.Module, reference_inputs: Inputs | None, p: float, batch_size: int | None
) -> Tensor:
    """Log of the mean L_p norm of the model's outputs on the reference inputs (appendix H)."""
    if reference_inputs is None:
        raise ValueError(
            "mode='output' normalizes by the model's output norm on reference inputs: "
            "pass `reference_inputs=` (a few training inputs, the same ones every epoch)."
        )
    check_inputs(reference_inputs, name="reference_inputs", floating=False)
    check_float32_model(model)
    with evaluation(model):
        parts = _output_chunks(model, reference_inputs, batch_size)
        norms = torch.cat([_norm(outputs, p, dim=1) for _, outputs in parts])
    return norms.mean().log()


def _output_chunks(
    model: nn.Module, inputs: Inputs, batch_size: int | None, state: dict[str, Tensor] | None = None
) -> Iterator[tuple[slice, Tensor]]:
    """Float32 outputs ``[n, K]`` chunk by chunk, optionally with parameters/buffers replaced.

    The caller puts the model in eval mode: a generator suspended inside a context manager
    would hold the mode until it is closed.
    """
    device = model_device(model, inputs.device)
    for rows in chunks(inputs.shape[0], batch_size):
        x = model_input(inputs[rows], device)
        args, kwargs = ((), dict(x)) if isinstance(x, KeywordInputs) else ((x,), None)
        outputs = functional_call(model, state or {}, args, kwargs)
        yield rows, as_outputs(outputs).float()


def _layers(model: nn.Module) -> list[_Layer]:
    """The factors of ``rho`` in forward order, checked to form a chain when ``model`` traces."""
    graph = None
    # A bare nn.Linear would trace into F.linear and hide its weight; it is a chain anyway.
    if next(model.children(), None) is not None:
        try:
            graph = torch.fx.symbolic_trace(model).graph
        except Exception:  # tracing runs user code, which can fail in any way
            graph = None
    layers = _registered_layers(model) if graph is None else _traced_layers(model, graph)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear, nn.Conv or BatchNorm layer to normalize. "
            + _OUTPUT_MODE_HINT
        )
    return layers


def _registered_layers(model: nn.Module) -> list[_Layer]:
    """Fallback for untraceable models: a BatchNorm folds into the leaf registered before it."""
    layers: list[_Layer] = []
    after_weighted = False
    for name, module in model.named_modules():
        if next(module.children(), None) is not None:
            continue
        if isinstance(module, _BATCHNORM) and after_weighted:
            layers[-1] = _Layer(layers[-1].weighted, name)
        elif isinstance(module, (*_WEIGHTED, *_BATCHNORM)):
            layers.append(_Layer.of(name, module))
        after_weighted = isinstance(module, _WEIGHTED)
    return layers


def _traced_layers(model: nn.Module, graph: torch.fx.Graph) -> list[_Layer]:
    """Layers from the traced graph; raises unless every one lies on every input-output path.

    Each node carries the layers found on every path from the input to it and those found
    on some path; a residual or parallel branch makes the two differ at the output.
    """
    modules = dict(model.named_modules())
    layers: dict[str, _Layer] = {}
    called: set[str] = set()
    on_every: dict[torch.fx.Node, frozenset[str]] = {}
    on_some: dict[torch.fx.Node, frozenset[str]] = {}
    every: frozenset[str]
    some: frozenset[str]
    for node in graph.nodes:
        parents = [arg for arg in node.all_input_nodes if arg in on_every]
        if node.op == "placeholder":
            every = some = frozenset()
        elif not parents or _is_metadata(node):
            continue  # does not depend on the input signal, like a bias
        else:
            every = frozenset.intersection(*(on_every[arg] for arg in parents))
            some = frozenset.union(*(on_some[arg] for arg in parents))
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, (*_WEIGHTED, *_BATCHNORM)):
            if node.target in called:
                raise ValueError(
                    f"{type(model).__name__} calls `{node.target}` more than once (shared "
                    "weights), so its norm does not factor out of f once. " + _OUTPUT_MODE_HINT
                )
            called.add(node.target)
            source = node.args[0]
            if isinstance(module, _BATCHNORM) and _folds_into(source, modules):
                layers[source.target] = _Layer(source.target, node.target)
            else:
                layers[node.target] = _Layer.of(node.target, module)
                every, some = every | {node.target}, some | {node.target}
        on_every[node], on_some[node] = every, some
    output = next(node for node in reversed(graph.nodes) if node.op == "output")
    bypassed = [name for name in layers if name not in on_every.get(output, frozenset())]
    if bypassed:
        raise ValueError(
            f"{type(model).__name__} is not a chain of layers: some path from the input to the "
            f"output bypasses `{bypassed[0]}` (a residual or parallel branch, or an unused "
            "layer), so the product of layer norms does not factor out of f (eq. 1). "
            + _OUTPUT_MODE_HINT
        )
    return list(layers.values())


def _is_metadata(node: torch.fx.Node) -> bool:
    """``x.shape``, ``x.size()``, ``x.dim()``: they carry no signal, so they join no path."""
    return (node.op == "call_method" and node.target in ("size", "dim")) or (
        node.op == "call_function" and node.target is getattr
    )


def _folds_into(source: object, modules: dict[str, nn.Module]) -> bool:
    """Whether a BatchNorm fed by ``source`` folds into it: a conv/linear with no other user."""
    return (
        isinstance(source, torch.fx.Node)
        and source.op == "call_module"
        and isinstance(modules[cast(str, source.target)], _WEIGHTED)
        and len(source.users) == 1
    )


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


# Layers whose weights scale f but are not factors of rho, or that break homogeneity.
_NOT_FACTORED = (nn.Embedding, nn.EmbeddingBag, nn.RNNBase, nn.MultiheadAttention)


def layerwise_obstacle(model: nn.Module) -> str | None:
    """Why ``mode="layerwise"`` would not give the normalized network for ``model``.

    The product of layer norms normalizes f exactly (eq. 1) only for a chain of linear,
    convolutional and BatchNorm layers with positively homogeneous activations between
    them. Residual or parallel branches, shared weights, embeddings (whose weight scales
    f but is no factor of rho), recurrent or attention layers and saturating activations
    each break that; ``mode="output"`` (appendix H) applies to any of them.

    Args:
        model: The classifier.

    Returns:
        A sentence naming the obstacle, or ``None`` where layerwise normalization is exact
        as far as the model's modules and traced graph show.
    """
    # Modules first: they are the obstacle a user can act on, while the traced graph of a
    # model that returns hidden states beside its logits "bypasses" the output layer too.
    found = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if isinstance(m, _NOT_HOMOGENEOUS + _NOT_FACTORED)
        }
    )
    if found:
        return (
            f"{type(model).__name__} contains {', '.join(found)}, which the product of layer "
            "norms does not factor out of f."
        )
    try:
        _layers(model)
    except ValueError as error:
        return str(error).removesuffix(_OUTPUT_MODE_HINT).strip()
    return None
