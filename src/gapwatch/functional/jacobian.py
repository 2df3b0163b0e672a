"""Input-output Jacobian norm (Novak et al., 2018, §3 item 1).

The sensitivity of a classifier around a point ``x`` is the Frobenius norm of the Jacobian
``J(x) = d softmax(f(x)) / d x^T`` of its class probabilities, averaged over points. It
needs no labels; Appendix A.3 of the paper ties it to the per-point cross-entropy.

Both methods work in the space of the K logits. The softmax Jacobian factors as
``J = A J_f`` with ``J_f = d f / d x^T`` and ``A = diag(p) - p p^T``, whose row ``k`` is
the gradient of ``p_k`` with respect to the logits, known after the forward pass. Each row
``A_k J_f`` of ``J`` is thus one vector-Jacobian product, and one backward pass of
``sum_i A_k(x_i) f(x_i)`` yields it for every sample of a batch at once, because samples
do not interact in eval mode. The rows of ``A`` and their random draw for ``"projection"``
live in :mod:`gapwatch.functional._softmax_rows`.
"""

from __future__ import annotations

import math
from typing import Literal, cast, overload

import torch
from torch import Tensor, nn

from gapwatch.functional._common import (
    DEFAULT_BATCH_SIZE,
    as_outputs,
    check_batch_size,
    check_choice,
    check_classifier,
    check_float32_model,
    check_inputs,
    check_positive,
    chunks,
    evaluation,
    gradients_enabled,
    model_device,
    model_input,
)
from gapwatch.functional._draws import Draws, draw, make_generator
from gapwatch.functional._inputs import Inputs
from gapwatch.functional._perturb import check_perturbable, forward_perturbed
from gapwatch.functional._softmax_rows import _draw_rows, _row, _row_weights, _scaled_softmax

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
