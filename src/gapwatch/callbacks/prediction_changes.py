"""The fraction of train-probe samples whose predicted class changed, as a callback."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from gapwatch.callbacks._loss import binary_labels
from gapwatch.callbacks._probes import Probes
from gapwatch.callbacks._proxy import (
    Context,
    NotApplicableError,
    Outputs,
    Proxy,
    Stats,
    mean,
    sum_and_count,
)
from gapwatch.callbacks._uncertainty import with_se
from gapwatch.callbacks.base import ProbeCallback
from gapwatch.functional.prediction_changes import (
    UNKNOWN,
    predicted_classes,
    prediction_changes,
)

NAME = "prediction_changes"


class PredictionChangesProxy(Proxy):
    """Yuan et al.'s label wave on the train probe, from the shared clean logits.

    Each process places its shard's classes at their rows of the whole probe (one float
    per row, zero elsewhere), so the summed statistic is every row's class on every
    process: the value is the single-process one and each process keeps the whole vector,
    which the checkpoint carries (``state_dict``) so that a resumed fit compares against
    the last evaluation before it stopped. The first evaluation has nothing to compare
    with and logs NaN.
    """

    undefined_at_first = (NAME, NAME + "_se")

    def __init__(self) -> None:
        self._size = 0
        self._previous: Tensor | None = None

    def setup(self, model: nn.Module, probes: Probes, num_outputs: int) -> None:
        """A class per sample needs K >= 2 scores, or one logit with 0/1 labels."""
        targets = probes.train.targets
        if num_outputs < 2 and (targets is None or not binary_labels(targets)):
            raise NotApplicableError(
                "Prediction changes need a predicted class per sample: K >= 2 outputs, or one "
                "logit with 0/1 labels; this model has one output and its train labels are not "
                "0/1. Turn it off (`prediction_changes=False` in the suite)."
            )
        self._size = len(probes.train)
        if self._previous is not None and self._previous.numel() != self._size:
            self._previous = None  # a checkpoint of another probe: start afresh

    def reset(self) -> None:
        """Forget the previous fit's predictions."""
        self._previous = None

    def statistics(
        self, model: nn.Module, probes: Probes, outputs: Outputs, context: Context
    ) -> Stats:
        """This shard's classes plus one at their rows of the whole probe, zero elsewhere."""
        placed = torch.zeros(self._size, dtype=torch.float64)
        classes = predicted_classes(outputs.train_logits).cpu()
        placed[probes.train.row_ids] = (classes - UNKNOWN).double()
        return {"classes": placed}

    def finalize(self, stats: Stats) -> dict[str, float]:
        """The fraction of rows known at both evaluations whose class changed, with its error."""
        current = stats["classes"].round().long() + UNKNOWN
        previous, self._previous = self._previous, current
        if previous is None:
            return dict.fromkeys(self.undefined_at_first, math.nan)
        changed = prediction_changes(previous, current, reduction="none")
        summed = sum_and_count(NAME, changed[~changed.isnan()])
        return with_se({NAME: mean(summed, NAME)}, summed)

    def state_dict(self) -> dict[str, Any]:
        """The latest evaluation's classes, so that a resumed fit continues the count."""
        return {"previous": self._previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``."""
        previous = state.get("previous")
        self._previous = None if previous is None else torch.as_tensor(previous).long()


class PredictionChanges(ProbeCallback):
    """Log the fraction of train-probe samples whose predicted class changed since last time.

    Logged (under ``prefix``): ``prediction_changes`` and its standard error, plus the
    held-out and train loss and accuracy with their ``gap``. Yuan et al. (ICLR 2024) stop
    near its first minimum; it needs no held-out data. With ``every_n_epochs=1`` it is
    their per-epoch count (on the probe rather than the whole training set).

    Args:
        **kwargs: Scheduling and probe options of :class:`~gapwatch.callbacks.ProbeCallback`.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__([PredictionChangesProxy()], **kwargs)
