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
from gapwatch.functional._norm_layers import _NOT_HOMOGENEOUS, _layers, layerwise_obstacle
from gapwatch.functional._param_norms import _log_norms, _norm, _normalized_state

__all__ = ["layerwise_obstacle", "normalization_factor", "normalized_cross_entropy"]

_MODES = ("layerwise", "output")
_warned: weakref.WeakSet[nn.Module] = weakref.WeakSet()


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
