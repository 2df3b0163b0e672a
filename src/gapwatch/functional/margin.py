"""Output margins and their low percentile, the margin measure of Jiang et al. (2020).

The margin of a labelled sample is ``f_y(x) - max_{j != y} f_j(x)`` on the logits: positive
when the sample is classified correctly, larger the more confidently. Jiang et al. (2020,
"Fantastic Generalization Measures", the output-margin measures of their section on margins)
summarize the train set's margin distribution by its 10th percentile ``gamma``, which is
robust to the few samples a network never fits, unlike the minimum.

A margin alone is not comparable across networks: multiplying the logits by ``c`` multiplies
it by ``c``. gapwatch divides it by the *total variation* of the logits on the same samples,
``sqrt(E ||f(x) - E f(x)||^2)``, the normalization Jiang et al. (2019, "Predicting the
Generalization Gap in Deep Networks with Margin Distributions", section 3) introduced
for margins at a layer, here the output layer; it makes the value invariant to a rescaling
of the logits and is computed from the same forward pass. (Fantastic's ``1/gamma^2`` uses
the raw percentile.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: The percentile of the margin distribution that Jiang et al. (2020) report.
QUANTILE = 0.1


def output_margins(logits: Tensor, targets: Tensor) -> Tensor:
    """``f_y(x) - max_{j != y} f_j(x)`` for every row of ``logits`` ``[N, K]`` (K >= 2).

    Args:
        logits: Class scores ``[N, K]``.
        targets: Class indices ``[N]``.

    Returns:
        The margins ``[N]``, float64.

    Raises:
        ValueError: If ``logits`` is not ``[N, K]`` with ``K >= 2`` or ``targets`` is not ``[N]``.
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"output_margins needs class scores [N, K] with K >= 2; got {tuple(logits.shape)}."
        )
    if targets.shape != logits.shape[:1]:
        raise ValueError(
            f"output_margins needs one class index per row: targets {tuple(targets.shape)} "
            f"for logits {tuple(logits.shape)}."
        )
    logits = logits.detach().double()
    targets = targets.long()
    true = logits.gather(1, targets[:, None]).squeeze(1)
    others = logits.scatter(1, targets[:, None], -math.inf)
    return true - others.max(1).values


def total_variation(logits: Tensor) -> Tensor:
    """``sqrt(E ||f(x) - E f(x)||^2)`` over the rows of ``logits``, float64 (0-dim)."""
    logits = logits.detach().double()
    return (logits - logits.mean(0)).square().sum(1).mean().sqrt()


def margin_quantile(
    logits: Tensor,
    targets: Tensor,
    *,
    q: float = QUANTILE,
    normalize: bool = True,
) -> float:
    """The ``q``-quantile of the output margins, divided by the logits' total variation.

    Args:
        logits: Class scores ``[N, K]`` of labelled samples (the train probe).
        targets: Class indices ``[N]``.
        q: Quantile in ``[0, 1]``, linearly interpolated between order statistics (as
            ``numpy.quantile``'s default).
        normalize: Divide by :func:`total_variation` (``False``: the raw margin).

    Returns:
        The normalized (or raw) margin quantile; NaN for no rows or logits all equal.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must lie in [0, 1]; got {q}.")
    margins = output_margins(logits, targets)
    if margins.numel() == 0:
        return math.nan
    value = float(torch.quantile(margins, q))
    if not normalize:
        return value
    scale = float(total_variation(logits))
    return value / scale if scale > 0 else math.nan
