"""The rows of the softmax Jacobian that the Jacobian norm differentiates, and how to draw them.

:func:`~gapwatch.functional.jacobian.jacobian_norm` (Novak et al., 2018, §3 item 1) takes
the rows ``A_k J_f`` of ``J = d softmax(f(x)) / d x^T``, with ``A = diag(p) - p p^T``. This
module holds ``A`` in a scaled form free of cancellation for confident predictions
(:class:`_ScaledSoftmax`, Novak §4.4 for why such points matter), the rows and their
squared norms as weights, and the systematic sampling of ``m`` rows per sample with
inclusion probabilities ``pi_k = min(1, c w_k)`` that makes the Horvitz-Thompson sum
``sum_{k drawn} ||J_k||^2 / pi_k`` an unbiased estimate of ``||J||_F^2``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.functional import one_hot


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
