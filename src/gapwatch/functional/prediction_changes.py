"""Which samples changed their predicted class between two evaluations (the "label wave").

Yuan et al. (ICLR 2024, "Early stopping against label noise without validation data")
count, after each epoch, the training samples whose predicted class differs from the
previous epoch's. Early on the count falls as the model fits the clean majority; it rises
again once the model starts memorizing the mislabelled minority, and they stop near its
first minimum. It needs no held-out data and no labels, and costs one comparison of the
logits a monitor already has.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gapwatch.functional._common import check_choice

#: The class of a row whose logits are not all finite: it counts as neither kept nor changed.
UNKNOWN = -1


def predicted_classes(logits: Tensor) -> Tensor:
    """Each row's predicted class: the argmax of ``K >= 2`` scores, ``logit > 0`` of one.

    Args:
        logits: ``[N, K]`` model outputs.

    Returns:
        ``[N]`` int64 classes, ``UNKNOWN`` where a row's logits are not all finite.

    Raises:
        ValueError: If ``logits`` is not ``[N, K]``.
    """
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ValueError(f"`logits` must be [N, K] outputs, got {tuple(logits.shape)}.")
    classes = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)
    return classes.masked_fill(~logits.isfinite().all(1), UNKNOWN)


def prediction_changes(previous: Tensor, current: Tensor, reduction: str = "mean") -> Tensor:
    """The fraction of samples whose predicted class changed from ``previous`` to ``current``.

    Args:
        previous: ``[N]`` classes at the earlier evaluation (``predicted_classes``).
        current: ``[N]`` classes of the same samples now.
        reduction: ``"mean"``: the fraction; ``"none"``: each sample's 1.0 (changed) or
            0.0 (kept), NaN where either class is ``UNKNOWN``.

    Returns:
        A float64 tensor: 0-d for ``"mean"`` (NaN if no sample is known at both), else ``[N]``.

    Raises:
        ValueError: If the two do not have the same ``[N]`` shape, or a bad ``reduction``.
    """
    check_choice("reduction", reduction, ("mean", "none"))
    if previous.ndim != 1 or previous.shape != current.shape:
        raise ValueError(
            "`previous` and `current` must be [N] classes of the same samples, got "
            f"{tuple(previous.shape)} and {tuple(current.shape)}."
        )
    previous, current = previous.to(current.device), current
    changed = (previous != current).double()
    changed = changed.masked_fill((previous == UNKNOWN) | (current == UNKNOWN), torch.nan)
    return changed.nanmean() if reduction == "mean" else changed
