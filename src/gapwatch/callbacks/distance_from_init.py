"""Relative distance of the weights from those at the start of the fit, as a callback."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gapwatch.callbacks._probes import Probes
from gapwatch.callbacks._proxy import Context, Outputs, Proxy, Stats
from gapwatch.callbacks.base import ProbeCallback
from gapwatch.functional.distance import snapshot, squared_distances


class DistanceProxy(Proxy):
    """``distance_from_init``: ``||W - W0||_F / ||W0||_F`` over the trainable parameters.

    ``W0`` is taken when the proxies are set up: at the start of each fit, before the first
    optimizer step (with ``train_stream="batches"``, once the train probe is complete). A
    resumed fit measures from the weights it resumed with.

    Memory: one copy of the trainable parameters, on the model's device, kept for the
    fit. Under data parallelism every process holds the same (replicated) weights, so only
    rank 0 contributes its sums; a sharded model (FSDP) is not supported.
    """

    def __init__(self) -> None:
        self._reference: dict[str, Tensor] = {}

    def setup(self, model: nn.Module, probes: Probes, num_outputs: int) -> None:
        """Copy the weights the fit starts from."""
        self._reference = snapshot(model)

    def statistics(
        self, model: nn.Module, probes: Probes, outputs: Outputs, context: Context
    ) -> Stats:
        """The squared distance and the reference's squared norm (zeros off rank 0)."""
        moved, start = squared_distances(model, self._reference)
        if context.rank != 0:
            moved, start = torch.zeros_like(moved), torch.zeros_like(start)
        return {"moved_square": moved, "start_square": start}

    def finalize(self, stats: Stats) -> dict[str, float]:
        """The relative distance; NaN when the starting weights are all zero."""
        start = float(stats["start_square"])
        value = (float(stats["moved_square"]) / start) ** 0.5 if start > 0 else float("nan")
        return {"distance_from_init": value}


class DistanceFromInit(ProbeCallback):
    """Log ``distance_from_init`` beside the held-out loss.

    Logged (under ``prefix``): ``distance_from_init``, plus the held-out and train loss
    and accuracy with their ``gap``. Keeps one copy of the trainable parameters.

    Args:
        **kwargs: Scheduling and probe options of :class:`~gapwatch.callbacks.ProbeCallback`.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__([DistanceProxy()], **kwargs)
