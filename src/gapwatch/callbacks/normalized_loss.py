"""Liao and Poggio's normalized train and test loss, as a callback."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from gapwatch.callbacks._probes import Probes
from gapwatch.callbacks._proxy import (
    Context,
    Outputs,
    Proxy,
    Stats,
    mean,
    require_classes,
    require_train_targets,
    sum_and_count,
)
from gapwatch.callbacks._uncertainty import with_se
from gapwatch.callbacks.base import ProbeCallback
from gapwatch.functional._common import (
    check_choice,
    check_positive,
    check_targets,
)
from gapwatch.functional.normalized_loss import (
    layerwise_obstacle,
    normalization_factor,
    normalized_cross_entropy,
)

Mode = Literal["auto", "layerwise", "output"]


class NormalizedLossProxy(Proxy):
    """Cross-entropy of ``scale * f / rho`` on both probes, and ``log rho``.

    The normalized logits are the shared clean logits divided by ``rho``, so the proxy
    costs no forward pass in ``"layerwise"`` mode, unless the logits overflowed: the
    network with normalized weights is then run instead, and stays finite. In ``"output"``
    mode ``rho`` comes from the first ``num_reference`` train-probe inputs, the same on
    every process. ``"auto"`` picks ``"layerwise"`` where it is exact and ``"output"``
    otherwise, at setup, saying which and why.

    Args:
        mode: ``"auto"``, ``"layerwise"`` or ``"output"``.
        p: Order of the norm.
        scale: Eq. 6's ``R``, multiplying the normalized logits.
        num_reference: Train-probe inputs used as references in ``"output"`` mode.
        option: The name of ``mode`` in the callback the user configures, for messages.
    """

    def __init__(
        self,
        mode: Mode = "auto",
        p: float = 2.0,
        scale: float = 1.0,
        num_reference: int = 8,
        *,
        option: str = "mode",
    ) -> None:
        check_choice(option, mode, ("auto", "layerwise", "output"))
        check_positive("p", p, finite=False)
        check_positive("scale", scale)
        check_positive("num_reference", num_reference, integer=True)
        self.mode = mode
        self.p = p
        self.scale = scale
        self.num_reference = num_reference
        self._option = option
        self._center = 0.0
        self.resolved_mode: Literal["layerwise", "output"] = (
            "output" if mode == "output" else "layerwise"
        )

    def setup(self, model: nn.Module, probes: Probes, num_outputs: int) -> None:
        """Fail now on regression, or on an architecture the mode cannot normalize."""
        require_classes(num_outputs, "The normalized cross-entropy")
        self._center = math.log(num_outputs)  # where the losses sit, for exact squares
        require_train_targets(probes, "The normalized train loss")
        for probe in (probes.train, probes.heldout):
            if probe is not None and probe.targets is not None:
                check_targets(probe.targets, len(probe))
        obstacle = None if self.mode == "output" else layerwise_obstacle(model)
        if obstacle is not None and self.mode == "layerwise":
            raise ValueError(
                f"{obstacle} Use `{self._option}='output'` (Liao-Poggio appendix H: normalize "
                f"by the output norm on reference inputs) or `{self._option}='auto'`."
            )
        self.resolved_mode = "output" if self.mode == "output" or obstacle else "layerwise"
        if self.mode == "auto":
            why = obstacle or "the model is a chain of layers whose norms factor out of f"
            rank_zero_info(f"gapwatch: normalized loss in {self.resolved_mode!r} mode: {why}")
        output_mode = self.resolved_mode == "output"
        self.reference = probes.train.inputs[: self.num_reference] if output_mode else None
        self._log_rho(model)

    def statistics(
        self, model: nn.Module, probes: Probes, outputs: Outputs, context: Context
    ) -> Stats:
        """``log rho`` and the summed normalized losses of both probes."""
        log_rho = self._log_rho(model)
        stats: Stats = {
            "log_norm_product_sum": log_rho,
            "log_norm_product_count": torch.ones((), dtype=torch.float64),
        }
        for role, probe, logits in outputs.labelled(probes):
            assert probe.targets is not None  # for the type checker
            if not len(probe):  # a process's shard of a probe smaller than the world
                empty = torch.zeros(0, dtype=torch.float64)
                stats |= sum_and_count(f"normalized_{role}_loss", empty, self._center)
                continue
            # Logits that overflowed do not mean that f / rho did: without them, layerwise
            # mode evaluates the network with normalized weights instead.
            shared = {"logits": logits, "log_rho": log_rho} if logits.isfinite().all() else {}
            loss = normalized_cross_entropy(
                model,
                probe.inputs,
                probe.targets,
                mode=self.resolved_mode,
                p=self.p,
                reference_inputs=self._reference(model),
                scale=self.scale,
                batch_size=context.batch_size,
                reduction="none",
                **shared,
            )
            stats |= sum_and_count(f"normalized_{role}_loss", loss, self._center)
        return stats

    def finalize(self, stats: Stats) -> dict[str, float]:
        """Mean normalized losses with their standard errors, and ``log rho``."""
        names = [n.removesuffix("_sum") for n in stats if n.endswith("_sum")]
        return with_se({name: mean(stats, name) for name in names}, stats, self._center)

    def _reference(self, model: nn.Module) -> Tensor | None:
        if self.reference is None:
            return None
        return self.reference.to(next(iter(model.parameters())).device)

    def _log_rho(self, model: nn.Module) -> Tensor:
        log_rho = normalization_factor(
            model,
            mode=self.resolved_mode,
            p=self.p,
            reference_inputs=self._reference(model),
            log=True,
        )
        return log_rho.double().cpu()


class NormalizedLoss(ProbeCallback):
    """Log the normalized train and test loss (Liao and Poggio), beside the held-out loss.

    Logged (under ``prefix``): ``normalized_train_loss``, ``normalized_test_loss``,
    ``log_norm_product`` (the log of the normalization factor rho), plus the held-out and
    train loss and accuracy with their ``gap``. The normalized train loss needs no
    held-out data, which makes it a candidate signal for early stopping::

        EarlyStopping(monitor="gapwatch/normalized_train_loss", min_delta=1e-5, patience=5)

    Its values sit just below ``ln K`` with differences in the 4th decimal (the
    normalized network's outputs are tiny), so ``min_delta`` must be of that scale, or
    ``scale`` (eq. 6's ``R``) must spread them. Use the model at the stop, not a checkpoint
    of the least value: over the 24 runs of ``experiments/stopping.py`` that least value
    came in the first three epochs in half the runs, and stopping on
    ``gapwatch/prediction_changes`` with a checkpoint on it left less held-out error.

    Args:
        mode: ``"layerwise"``: rho is the product of the layers' weight norms (BatchNorm
            folded in); ``"output"``: rho is the mean output norm on reference inputs,
            for residual networks; ``"auto"``: layerwise where that is exact (a chain of
            layers with homogeneous activations), output otherwise, reported once.
        p: Order of the norm.
        scale: The scale ``R`` the normalized logits are multiplied by.
        num_reference: Train-probe inputs used as references in ``"output"`` mode.
        **kwargs: Scheduling and probe options of :class:`~gapwatch.callbacks.ProbeCallback`.
    """

    def __init__(
        self,
        mode: Mode = "auto",
        p: float = 2.0,
        scale: float = 1.0,
        num_reference: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__([NormalizedLossProxy(mode, p, scale, num_reference)], **kwargs)
