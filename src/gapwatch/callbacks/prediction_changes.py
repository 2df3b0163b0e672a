"""The fraction of train-probe samples whose predicted class changed, as a callback."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from gapwatch.callbacks._loss import binary_labels
from gapwatch.callbacks._probes import Probe, Probes
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
        self._probe_id: str | None = None  # of the probe `_previous` was counted on

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
        probe_id = _probe_id(probes.train)
        if self._previous is not None and (
            self._previous.numel() != self._size
            or (self._probe_id is not None and self._probe_id != probe_id)
        ):
            # A checkpoint of another probe (another seed or probe_size, other data): its
            # classes belong to other rows.
            rank_zero_info(
                "gapwatch: the checkpoint's predicted classes are of another train probe; "
                "prediction changes are counted afresh from the next evaluation."
            )
            self._previous = None
        self._probe_id = probe_id

    def reset(self) -> None:
        """Forget the previous fit's predictions."""
        self._previous, self._probe_id = None, None

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
            # Not logged, not NaN: at a fit's first evaluation and after a checkpoint of
            # another probe alike, a NaN would read as divergence and stop EarlyStopping.
            return {}
        changed = prediction_changes(previous, current, reduction="none")
        summed = sum_and_count(NAME, changed[~changed.isnan()])
        return with_se({NAME: mean(summed, NAME)}, summed)

    def state_dict(self) -> dict[str, Any]:
        """The latest evaluation's classes, so that a resumed fit continues the count."""
        return {"previous": self._previous, "probe_id": self._probe_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``."""
        previous = state.get("previous")
        self._previous = None if previous is None else torch.as_tensor(previous).long()
        self._probe_id = state.get("probe_id")  # None in checkpoints older than it


def _probe_id(probe: Probe) -> str:
    """A digest of the probe's input bytes, in row order: equal only for the same rows."""
    inputs = probe.inputs
    parts = [inputs[key] for key in sorted(inputs)] if isinstance(inputs, Mapping) else [inputs]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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
