"""The input-output Jacobian norm of Novak et al., as a callback."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from gapwatch.callbacks._perturbation import resolve_perturb_at
from gapwatch.callbacks._probes import Probes, Role
from gapwatch.callbacks._proxy import (
    Context,
    Outputs,
    Proxy,
    Stats,
    mean,
    sum_and_count,
)
from gapwatch.callbacks._uncertainty import with_se
from gapwatch.callbacks.base import ProbeCallback
from gapwatch.functional._common import check_choice, check_positive
from gapwatch.functional.jacobian import Method, Output, jacobian_norm


class JacobianProxy(Proxy):
    """Mean Frobenius norm of d output / d input over the held-out probe.

    The backward passes need the graph of a forward pass over the probe, which yields its
    logits too; so this proxy runs the probe's shared forward pass itself.
    """

    def __init__(
        self,
        method: Method = "projection",
        output: Output = "softmax",
        num_projections: int = 3,
        *,
        option: str = "output",
        logits_for_regression: bool = False,
        perturb_at: str | None = None,
    ) -> None:
        check_choice("method", method, ("projection", "exact"))
        check_choice(option, output, ("softmax", "logits"))
        check_positive("num_projections", num_projections, integer=True)
        self.method = method
        self.output = output
        self.num_projections = num_projections
        self._option = option  # the name of `output` in the user's callback, for messages
        self._logits_for_regression = logits_for_regression
        self.perturb_at = perturb_at
        self._at: str | None = None  # what is differentiated in this fit: None is the inputs
        self.last_norms: torch.Tensor | None = None
        self._pending: Tensor | None = None  # norms from `run_probe`, for `statistics`

    def setup(self, model: nn.Module, probes: Probes, num_outputs: int) -> None:
        """Where the Jacobian is taken; the softmax Jacobian needs class scores."""
        self._at = resolve_perturb_at(model, probes, self.perturb_at, "the Jacobian norm")
        if self.output == "softmax" and num_outputs < 2 and self._logits_for_regression:
            rank_zero_info("gapwatch: the model has one output; the Jacobian norm is of it.")
            self.output = "logits"
        if self.output == "softmax" and num_outputs < 2:
            raise ValueError(
                "The softmax Jacobian norm needs class scores (K >= 2 outputs) but the model "
                f"has one output; for a regression model pass `{self._option}='logits'`."
            )

    def run_probe(
        self, model: nn.Module, probes: Probes, role: Role, context: Context
    ) -> Tensor | None:
        """Take the pass over the probe the norms are measured on; keep the norms."""
        if role != probes.unlabeled_role:
            return None
        self._pending, logits = self._norms_and_logits(model, probes, context)
        return logits

    def statistics(
        self, model: nn.Module, probes: Probes, outputs: Outputs, context: Context
    ) -> Stats:
        """Sum and count of the per-sample norms (kept for the histogram)."""
        norms, self._pending = self._pending, None
        if norms is None:  # another proxy ran the shared pass
            norms, _ = self._norms_and_logits(model, probes, context)
        self.last_norms = norms.detach().cpu()
        return sum_and_count("jacobian_norm", norms)

    def _norms_and_logits(
        self, model: nn.Module, probes: Probes, context: Context
    ) -> tuple[Tensor, Tensor]:
        probe = probes.unlabeled
        if not len(probe):  # a process's shard of a probe smaller than the world
            return torch.zeros(0), torch.zeros(0, context.num_outputs)
        return jacobian_norm(
            model,
            probe.inputs,
            output=self.output,
            method=self.method,
            num_projections=self.num_projections,
            batch_size=context.batch_size,
            generator=context.draws(probe),
            reduction="none",
            return_outputs=True,
            perturb_at=self._at,
        )

    def finalize(self, stats: Stats) -> dict[str, float]:
        """The mean norm and its standard error."""
        return with_se({"jacobian_norm": mean(stats, "jacobian_norm")}, stats)

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
        perturb_at: Module path whose output the Jacobian is taken against instead of
            the inputs. By default floating-point inputs; integer inputs (token ids,
            uint8 images) and keyword inputs use the first ``nn.Embedding``, else the
            first module with a floating-point output (said in an info line).
        **kwargs: Scheduling and probe options of :class:`~gapwatch.callbacks.ProbeCallback`.
    """

    def __init__(
        self,
        method: Method = "projection",
        output: Output = "softmax",
        num_projections: int = 3,
        perturb_at: str | None = None,
        **kwargs: Any,
    ) -> None:
        proxy = JacobianProxy(method, output, num_projections, perturb_at=perturb_at)
        super().__init__([proxy], **kwargs)
