"""Input-output Jacobian norm (Novak et al., 2018, §3 item 1).

The sensitivity of a classifier around a point ``x`` is the Frobenius norm of the Jacobian
``J(x) = d softmax(f(x)) / d x^T`` of its class probabilities, averaged over points. It
needs no labels; Appendix A.3 of the paper ties it to the per-point cross-entropy.

Both methods work in the space of the K logits. The softmax Jacobian factors as
``J = A J_f`` with ``J_f = d f / d x^T`` and ``A = diag(p) - p p^T``, whose row ``k`` is
the gradient of ``p_k`` with respect to the logits, known after the forward pass. Each row
``A_k J_f`` of ``J`` is thus one vector-Jacobian product, and one backward pass of
``sum_i A_k(x_i) f(x_i)`` yields it for every sample of a batch at once, because samples
do not interact in eval mode.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, cast, overload

import torch
from torch import Tensor, nn
from torch.nn.functional import one_hot

from gapwatch.functional._common import (
    DEFAULT_BATCH_SIZE,
    Draws,
    as_outputs,
    check_batch_size,
    check_choice,
    check_classifier,
    check_float32_model,
    check_inputs,
    check_positive,
    chunks,
    draw,
    evaluation,
    gradients_enabled,
    make_generator,
    model_device,
    model_input,
)
from gapwatch.functional._inputs import Inputs
from gapwatch.functional._perturb import check_perturbable, forward_perturbed

Output = Literal["softmax", "logits"]
Method = Literal["projection", "exact"]
Reduction = Literal["mean", "none"]


@overload
def jacobian_norm(
    model: nn.Module,
    inputs: Inputs,
    *,
    output: Output = ...,
    method: Method = ...,
    num_projections: int = ...,
    batch_size: int | None = ...,
    generator: Draws | None = ...,
    reduction: Reduction = ...,
    return_outputs: Literal[False] = ...,
    perturb_at: str | None = ...,
) -> Tensor: ...


@overload
def jacobian_norm(
    model: nn.Module,
    inputs: Inputs,
    *,
    output: Output = ...,
    method: Method = ...,
    num_projections: int = ...,
    batch_size: int | None = ...,
    generator: Draws | None = ...,
    reduction: Reduction = ...,
    return_outputs: Literal[True],
    perturb_at: str | None = ...,
) -> tuple[Tensor, Tensor]: ...


def jacobian_norm(
    model: nn.Module,
    inputs: Inputs,
    *,
    output: Output = "softmax",
    method: Method = "projection",
    num_projections: int = 3,
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    generator: Draws | None = None,
    reduction: Reduction = "mean",
    return_outputs: bool = False,
    perturb_at: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Frobenius norm of the input-output Jacobian, ``E_x ||J(x)||_F`` (Novak §3, item 1).

    ``J(x)`` is ``d softmax(f(x)) / d x^T``, the paper's choice, or with
    ``output="logits"`` ``d f(x) / d x^T``, which also covers regression models (K = 1).

    ``method="exact"`` computes all K rows of every ``J(x)``: one forward pass and K
    backward passes per chunk, the least that autograd can do.

    ``method="projection"`` computes ``m = num_projections`` rows per sample, drawn at
    random, and takes the square root of an unbiased estimate of ``||J(x)||_F^2``. Row
    ``k`` has a weight ``w_k``: ``||A_k||^2`` for the softmax, 1 for the logits. The rows
    are drawn without replacement by systematic sampling with inclusion probabilities
    ``pi_k = min(1, c w_k)``, ``sum_k pi_k = m``, and the estimate is the Horvitz-Thompson
    sum ``sum_{k drawn} ||J_k||^2 / pi_k``. *Unbiased:* the rows are consecutive intervals
    of lengths ``pi_k`` on ``(0, m]`` and the ``m`` points drawn are ``j + 1 - u``,
    ``u ~ U[0, 1)``, each uniform on its ``(j, j + 1]``; so the expected number of points
    in row ``k``'s interval is its length ``pi_k``, and the expected estimate is
    ``sum_k pi_k ||J_k||^2 / pi_k = ||J||_F^2`` (a row with ``w_k = 0`` has ``J_k = 0``).
    As ``pi_k <= 1``, no row is drawn twice and rows with ``pi_k = 1`` always are. The
    estimate is *exact* if ``m`` covers the non-zero rows, or if ``A`` has rank one
    (two-class uncertainty): the rows of ``J`` are then multiples of one vector, so
    ``||J_k||^2 / pi_k`` is the same for every row. For the logits this is ``K / m``
    times the squared norm of ``m`` distinct rows.

    The square root of an unbiased estimate is biased low (Jensen), by about 1/8 of its
    relative variance. On 512 held-out ``digits``, in 100 draws each, the default
    ``m = 3`` came within 1.6% of the exact mean softmax norm for untrained (near-uniform)
    and trained (confident) networks; ``m = 1`` erred by up to 8%, and Gaussian output
    projections ``v^T J`` were 4-20% low.

    Args:
        model: Maps ``[n, ...]`` inputs to ``[n, K]`` logits or a ``[n]`` regression output.
        inputs: Points ``[N, ...]`` (any device; chunks move to the model's).
        output: ``"softmax"`` (needs K >= 2) or ``"logits"``.
        method: ``"projection"`` (``m`` backward passes) or ``"exact"`` (K of them).
        num_projections: Rows ``m`` drawn per sample by ``"projection"``.
        batch_size: Most samples per forward pass: ``DEFAULT_BATCH_SIZE`` (128) unless
            given; ``None`` runs all at once. Memory holds one chunk's graph and one input
            gradient at a time.
        generator: Source of the draws of ``"projection"``: a ``torch.Generator``, a
            :class:`~gapwatch.functional.RowSeeds` (each row's draw from its own stream,
            so a shard of the inputs gets the draws it gets in the whole), or ``None``
            for a fresh one seeded from the OS. The draws do not depend on ``batch_size``.
        reduction: ``"mean"`` over the samples or ``"none"`` for the per-sample norms.
        return_outputs: Also return the model's outputs on ``inputs``, from the forward
            pass the Jacobian needed anyway, so a caller that wants both runs one pass.
        perturb_at: Module path whose output ``h`` is the variable the Jacobian is taken
            against, ``d f / d h`` (Frobenius over all entries of ``h``), instead of the
            inputs; needed for integer inputs (token ids: e.g. the embedding) and keyword
            inputs (``model(**inputs)``). ``None``: the inputs.

    Returns:
        A float32 tensor on the model's device: 0-d for ``"mean"``, ``[N]`` for ``"none"``;
        with ``return_outputs=True``, the pair of it and the detached float32 outputs
        ``[N, K]`` (as :func:`output_sensitivity` accepts for ``clean_outputs``).

    Raises:
        ValueError: If an option is unknown or not positive, or if ``output="softmax"``
            meets a one-output model.
        TypeError: If the inputs are not a floating tensor and ``perturb_at`` is not
            given, or the model's output holds no logits.
    """
    check_perturbable(model, inputs, perturb_at)
    check_inputs(inputs, floating=perturb_at is None)
    check_float32_model(model)
    check_choice("output", output, ("softmax", "logits"))
    check_choice("method", method, ("projection", "exact"))
    check_choice("reduction", reduction, ("mean", "none"))
    check_positive("num_projections", num_projections, integer=True)
    check_batch_size(batch_size)
    device = model_device(model, inputs.device)
    offsets = None
    if method == "projection":
        # Drawn up front, so that the estimate does not depend on the chunking.
        generator = make_generator(generator, device)
        everyone = torch.arange(inputs.shape[0])
        offsets = draw(generator, everyone, (1,), torch.device("cpu"), uniform=True)
    norms, outputs = [], []
    with evaluation(model), gradients_enabled():
        for rows in chunks(inputs.shape[0], batch_size):
            if perturb_at is None:
                # A copy: inputs made under inference mode cannot enter autograd.
                x = inputs[rows].to(device=device, dtype=torch.float32, copy=True)
                x.requires_grad_(True)
                logits = as_outputs(model(x)).float()
            else:
                x, logits = _at_module(model, inputs[rows], device, perturb_at)
            softmax = None
            if output == "softmax":
                check_classifier(logits.shape[1], "`jacobian_norm(output='softmax')`")
                softmax = _scaled_softmax(logits.detach())
            classes = torch.arange(logits.shape[1], device=device).expand_as(logits)
            weights = torch.ones_like(classes, dtype=logits.dtype)
            if offsets is not None:
                offset = offsets[rows].to(device)
                classes, weights = _draw_rows(
                    _row_weights(softmax, logits), num_projections, offset
                )
            # A tensor, not `sum`'s start 0, whenever the model has an output (K >= 1).
            squared = cast(
                Tensor,
                sum(
                    _squared_vjp(logits, x, _row(softmax, logits, column, weight))
                    for column, weight in zip(classes.T, weights.T, strict=True)
                ),
            )
            norm = squared.sqrt() if softmax is None else softmax.scale * squared.sqrt()
            # At a NaN output the Jacobian is undefined, even where ReLU masks pass zeros back.
            norms.append(norm.masked_fill(logits.detach().isnan().any(1), math.nan))
            if return_outputs:
                outputs.append(logits.detach())
    norm = torch.cat(norms)
    if reduction == "mean":
        norm = norm.mean()
    return (norm, torch.cat(outputs)) if return_outputs else norm


def _at_module(
    model: nn.Module, inputs: Inputs, device: torch.device, path: str
) -> tuple[Tensor, Tensor]:
    """The output ``h`` of the module at ``path``, made a leaf, and the logits from it."""
    leaves: list[Tensor] = []

    def as_leaf(h: Tensor) -> Tensor:
        leaves.append(h.detach().requires_grad_(True))
        return leaves[-1]

    logits = as_outputs(forward_perturbed(model, model_input(inputs, device), path, as_leaf))
    return leaves[0], logits.float()


def _squared_vjp(logits: Tensor, x: Tensor, vector: Tensor) -> Tensor:
    """``||v_i^T J_f(x_i)||^2`` for every sample ``i``, from one backward pass."""
    (grad,) = torch.autograd.grad(logits, x, vector, retain_graph=True)
    return grad.square().flatten(1).sum(dim=1)


class _ScaledSoftmax(NamedTuple):
    """The softmax's own Jacobian ``A = diag(p) - p p^T`` as ``scale * A'``.

    For a confident prediction every entry of ``A`` is of order ``scale = 1 - p_top``,
    which can be 1e-20 and less: computed as written, ``1 - p_top`` would be rounding
    noise, and the squared gradients would underflow in float32. Since the norm at such
    a point is many orders of magnitude below that at an uncertain one (Novak §4.4),
    the rows ``A'_k = ratio_k (e_k - p)`` of order 1 are used, with diagonal entries
    ``ratio_k * complement_k`` and both factors free of cancellation.
    """

    p: Tensor  # [n, K]
    top: Tensor  # [n, K] True at the most probable class
    complement: Tensor  # [n, K] 1 - p, accurate at the top class too
    ratio: Tensor  # [n, K] p / scale
    scale: Tensor  # [n] 1 - p_top, the sum of the other probabilities


def _scaled_softmax(logits: Tensor) -> _ScaledSoftmax:
    p = logits.softmax(dim=1)
    top = one_hot(p.argmax(dim=1), p.shape[1]).bool()
    rest = p.masked_fill(top, 0).sum(dim=1, keepdim=True)
    # Only the top class can be near one, so only its complement needs the sum.
    complement = torch.where(top, rest, 1 - p)
    scale = rest.clamp(min=torch.finfo(p.dtype).tiny)  # 0 if the softmax saturated
    return _ScaledSoftmax(p, top, complement, p / scale, scale.squeeze(1))


def _row(
    softmax: _ScaledSoftmax | None, logits: Tensor, classes: Tensor, weights: Tensor
) -> Tensor:
    """``[n, K]``: row ``classes[i]`` of ``A'`` (or of the identity) times ``weights[i]``."""
    chosen = one_hot(classes, logits.shape[1]).bool()
    if softmax is None:
        return weights.unsqueeze(1) * chosen.to(logits.dtype)
    classes = classes.unsqueeze(1)
    diagonal = softmax.complement.gather(1, classes)
    coefficient = weights.unsqueeze(1) * softmax.ratio.gather(1, classes)
    return coefficient * torch.where(chosen, diagonal, -softmax.p)


def _row_weights(softmax: _ScaledSoftmax | None, logits: Tensor) -> Tensor:
    """``[n, K]``: ``||A'_k||^2``, in proportion to ``||A_k||^2`` (ones for the logits)."""
    if softmax is None:
        return torch.ones_like(logits)
    p, top, complement, ratio, _ = softmax
    squared = p.square()
    # ||A'_k||^2 = ratio_k^2 ((1 - p_k)^2 + sum_{j != k} p_j^2); the top row's ratio can
    # overflow when squared, so its weight is written as p_top^2 (1 + sum_{j != top} ratio_j^2).
    top_row = squared * (1 + ratio.masked_fill(top, 0).square().sum(dim=1, keepdim=True))
    others = squared.sum(dim=1, keepdim=True) - squared  # no cancellation off the top
    return torch.where(top, top_row, ratio.square() * (complement.square() + others))


def _draw_rows(weights: Tensor, size: int, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Systematic sampling of ``size`` rows per sample with ``pi_k = min(1, c w_k)``.

    Args:
        weights: ``[n, K]`` non-negative row weights.
        size: Rows ``m`` to draw (at most K are).
        offsets: ``[n, 1]`` uniform draws on ``[0, 1)``.

    Returns:
        ``classes`` ``[n, m]`` and ``pi_k^(-1/2)`` of each drawn row, so that the squared
        norm of a row of ``J`` times it is its Horvitz-Thompson term; 0 for points past
        the last interval (fewer non-zero rows than ``m``).
    """
    num_classes = weights.shape[1]
    size = min(size, num_classes)
    ranked, order = weights.sort(dim=1, descending=True)
    ends = _inclusion_probabilities(ranked, size).cumsum(dim=1)
    points = torch.arange(1, size + 1, device=weights.device) - offsets  # in (j, j + 1]
    drawn = torch.searchsorted(ends, points)  # the interval (end_{k-1}, end_k] of each
    inside = drawn < num_classes
    drawn = drawn.clamp(max=num_classes - 1)
    # The realized interval lengths, so that rounding in the cumsum cannot add a bias.
    lengths = ends.diff(dim=1, prepend=torch.zeros_like(ends[:, :1])).gather(1, drawn)
    return order.gather(1, drawn), torch.where(inside, lengths.rsqrt(), 0.0)


def _inclusion_probabilities(ranked: Tensor, size: int) -> Tensor:
    """``pi_k = min(1, c w_k)`` with ``sum_k pi_k = size``, for weights sorted descending.

    Row ``t`` is certain iff its share ``(size - t) w_t / sum_{s >= t} w_s`` of the budget
    left by the ``t`` larger rows exceeds 1. Once that fails it fails for every later row,
    so the certain rows are a prefix, shorter than ``size``; the others split the rest of
    the budget in proportion to their weights (and get 0 if all their weights are 0).
    """
    tail = ranked.flip(1).cumsum(dim=1).flip(1)
    budget = size - torch.arange(ranked.shape[1], device=ranked.device)
    certain = budget * ranked > tail
    num_certain = certain.sum(dim=1, keepdim=True)
    share = (size - num_certain) / tail.gather(1, num_certain)
    return torch.where(certain, 1.0, (share * ranked).nan_to_num(0.0))
