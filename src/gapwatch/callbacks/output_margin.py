"""The 10th percentile of the train probe's normalized output margin, as a callback.

Computed from the shared forward pass's train logits: no extra pass through the model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from gapwatch.callbacks._probes import Probes
from gapwatch.callbacks._proxy import (
    Context,
    Outputs,
    Proxy,
    Stats,
    require_classes,
    require_train_targets,
)
from gapwatch.callbacks.base import ProbeCallback
from gapwatch.functional.margin import QUANTILE, output_margins


class MarginProxy(Proxy):
    """``margin_q10``: the train margins' ``quantile`` divided by the logits' total variation.

    See :mod:`gapwatch.functional.margin` for the definition and its normalization. A
    quantile is not a sum, so the statistics carry every margin: each process writes its
    rows' margins at their places in a vector as long as the whole train probe (zeros
    elsewhere), and the sum over processes is the whole probe's margins, exactly. That is
    ``probe_size`` numbers per evaluation, the size of the probe's targets.
    """

    def __init__(self, quantile: float = QUANTILE) -> None:
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile must lie in [0, 1]; got {quantile}.")
        self.quantile = quantile
        self._size = 0

    def setup(self, model: nn.Module, probes: Probes, num_outputs: int) -> None:
        """Refuse regression models and unlabelled train batches; note the probe's size."""
        require_classes(num_outputs, "The output margin")
        require_train_targets(probes, "The output margin")
        self._size = len(probes.train)

    def statistics(
        self, model: nn.Module, probes: Probes, outputs: Outputs, context: Context
    ) -> Stats:
        """This shard's margins at their rows, and the sums behind the total variation."""
        logits, targets = outputs.train_logits, probes.train.targets
        assert targets is not None  # `setup` checked
        rows = probes.train.row_ids.to(logits.device)
        margins = torch.zeros(self._size, dtype=torch.float64, device=logits.device)
        margins[rows] = output_margins(logits, targets)
        logits = logits.detach().double()
        return {
            "margins": margins,
            "logit_sum": logits.sum(0),
            "logit_square_sum": logits.square().sum(),
            "count": logits.new_tensor(logits.shape[0]),
        }

    def finalize(self, stats: Stats) -> dict[str, float]:
        """The quantile over the whole probe, over the whole probe's total variation."""
        count = float(stats["count"])
        if count == 0:
            return {"margin_q10": math.nan}
        mean = stats["logit_sum"] / count
        # E||z - E z||^2 = E||z||^2 - ||E z||^2; clamped against rounding below zero.
        variance = max(float(stats["logit_square_sum"]) / count - float(mean.square().sum()), 0.0)
        value = float(torch.quantile(stats["margins"].cpu(), self.quantile))
        return {"margin_q10": value / math.sqrt(variance) if variance > 0 else math.nan}


class OutputMargin(ProbeCallback):
    """Log ``margin_q10``, the normalized 10th-percentile train margin, beside the held-out loss.

    Logged (under ``prefix``): ``margin_q10``, plus the held-out and train loss and
    accuracy with their ``gap``. Larger margins go with smaller gaps (Jiang et al. 2020).

    Args:
        quantile: Which quantile of the margin distribution (0.1: the 10th percentile); the
            name stays ``margin_q10``.
        **kwargs: Scheduling and probe options of :class:`~gapwatch.callbacks.ProbeCallback`.
    """

    def __init__(self, quantile: float = QUANTILE, **kwargs: Any) -> None:
        super().__init__([MarginProxy(quantile)], **kwargs)
