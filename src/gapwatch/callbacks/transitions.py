"""Novak et al.'s count of linear-region transitions, as a callback."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gapwatch.callbacks._probes import Probes
from gapwatch.callbacks._proxy import (
    Context,
    Outputs,
    Proxy,
    Stats,
    mean,
    require_float_inputs,
    sum_and_count,
)
from gapwatch.callbacks._uncertainty import with_se
from gapwatch.callbacks.base import ProbeCallback
from gapwatch.functional._common import check_positive
from gapwatch.functional.transitions import transitions


class TransitionsProxy(Proxy):
    """Mean transitions along the horizontal-translation loop of each held-out image.

    The count runs ``num_points`` forward passes per image, so only the first
    ``max_images`` images of the probe are used.
    """

    def __init__(self, num_points: int | None = None, max_images: int = 64) -> None:
        if num_points is not None:
            check_positive("num_points", num_points, integer=True)
        check_positive("max_images", max_images, integer=True)
        self.num_points = num_points
        self.max_images = max_images

    def setup(self, model: nn.Module, probes: Probes, num_outputs: int) -> None:
        """Fail now, not mid-training, on non-image inputs or a model without activations."""
        require_float_inputs(probes, "Transitions", "`transitions=False` in the suite")
        self._count(model, probes.unlabeled.inputs[:1], None)

    def statistics(
        self, model: nn.Module, probes: Probes, outputs: Outputs, context: Context
    ) -> Stats:
        """Sum and count of per-image transitions."""
        # The whole probe's first `max_images` images, of which this process holds every
        # world_size-th: its rows among them come first in its shard.
        probe = probes.unlabeled
        mine = int((probe.row_ids < self.max_images).sum())
        if not mine:
            return sum_and_count("transitions", torch.zeros(0))
        images = probe.inputs[:mine]
        return sum_and_count("transitions", self._count(model, images, context.batch_size))

    def finalize(self, stats: Stats) -> dict[str, float]:
        """The mean count and its standard error."""
        return with_se({"transitions": mean(stats, "transitions")}, stats)

    def _count(self, model: nn.Module, images: Tensor, batch_size: int | None) -> Tensor:
        options: dict[str, Any] = {"batch_size": batch_size, "reduction": "none"}
        if self.num_points is not None:
            options["num_points"] = self.num_points
        return transitions(model, images, **options)


class Transitions(ProbeCallback):
    """Log the mean number of linear-region transitions, beside the held-out loss.

    Logged (under ``prefix``): ``transitions``, plus the held-out and train loss and
    accuracy with their ``gap``. Costly (``num_points`` passes per image): keep
    ``max_images`` small or evaluate rarely.

    Args:
        num_points: Points on each closed translation loop (default: the function's).
        max_images: Held-out images whose loops are counted.
        **kwargs: Scheduling and probe options of :class:`~gapwatch.callbacks.ProbeCallback`.
    """

    def __init__(self, num_points: int | None = None, max_images: int = 64, **kwargs: Any):
        super().__init__([TransitionsProxy(num_points, max_images)], **kwargs)
