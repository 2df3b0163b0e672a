"""The input-output Jacobian norm of Novak et al., as a callback."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from gapwatch.callbacks._probes import Probes
from gapwatch.callbacks._proxy import Context, Outputs, Proxy, Stats, mean, sum_and_count
from gapwatch.callbacks.base import ProbeCallback
from gapwatch.functional._common import check_choice, check_classifier, check_positive
from gapwatch.functional.jacobian import jacobian_norm

Method = Literal["projection", "exact"]
Output = Literal["softmax", "logits"]


class JacobianProxy(Proxy):
    """Mean Frobenius norm of d output / d input over the held-out probe."""

    def __init__(
        self,
        method: Method = "projection",
        output: Output = "softmax",
        num_projections: int = 3,
    ) -> None:
        check_choice("method", method, ("projection", "exact"))
        check_choice("output", output, ("softmax", "logits"))
        check_positive("num_projections", num_projections, integer=True)
        self.method = method
        self.output = output
        self.num_projections = num_projections
        self.last_norms: torch.Tensor | None = None

    def setup(self, model: nn.Module, probes: Probes, num_outputs: int) -> None:
        """The softmax Jacobian needs class scores."""
        if self.output == "softmax":
            check_classifier(num_outputs, "The softmax Jacobian norm")

    def statistics(
        self, model: nn.Module, probes: Probes, outputs: Outputs, context: Context
    ) -> Stats:
        """Sum and count of the per-sample norms (kept for the histogram)."""
        norms = jacobian_norm(
            model,
            probes.unlabeled.inputs,
            output=self.output,
            method=self.method,
            num_projections=self.num_projections,
            batch_size=context.batch_size,
            generator=context.generator,
            reduction="none",
        )
        self.last_norms = norms.detach().cpu()
        return sum_and_count("jacobian_norm", norms)

    def finalize(self, stats: Stats) -> dict[str, float]:
        """The mean norm."""
        return {"jacobian_norm": mean(stats, "jacobian_norm")}

    def artifacts(self) -> dict[str, object]:
        """The per-sample norms of the latest evaluation, for a histogram."""
        return {} if self.last_norms is None else {"jacobian_norm": self.last_norms}


class JacobianNorm(ProbeCallback):
    """Log the mean input-output Jacobian norm, beside the held-out loss.

    Logged (under ``prefix``): ``jacobian_norm``, plus the held-out and train loss and
    accuracy with their ``gap``.

    Args:
        method: ``"projection"`` (an unbiased estimate of the squared norm, cheap) or
            ``"exact"``.
        output: Differentiate the softmax probabilities (as Novak et al.) or the logits.
        num_projections: Random projections per sample for ``method="projection"``.
        **kwargs: Scheduling and probe options of :class:`~gapwatch.callbacks.ProbeCallback`.
    """

    def __init__(
        self,
        method: Method = "projection",
        output: Output = "softmax",
        num_projections: int = 3,
        **kwargs: Any,
    ) -> None:
        super().__init__([JacobianProxy(method, output, num_projections)], **kwargs)
