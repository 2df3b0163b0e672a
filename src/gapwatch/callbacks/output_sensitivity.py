"""Output sensitivity S and Forouzesh et al.'s predicted test loss, as a callback."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from gapwatch.callbacks._perturbation import resolve_perturb_at, second_moment_stats
from gapwatch.callbacks._probes import Probes
from gapwatch.callbacks._proxy import (
    Context,
    Outputs,
    Proxy,
    Stats,
    mean,
    sum_and_count,
)
from gapwatch.callbacks._uncertainty import cluster_sums, variance_and_se
from gapwatch.callbacks.base import ProbeCallback
from gapwatch.functional._common import check_positive
from gapwatch.functional.predicted_loss import predicted_test_loss, sigma_term, softmax_mse
from gapwatch.functional.sensitivity import noise_response


class SensitivityProxy(Proxy):
    """S on the held-out probe, eq. 9's predicted loss with and without the bias estimate.

    The clean logits come from the shared forward pass, so S costs one noisy pass. The
    bias estimate is the train probe's mean squared error of the softmax outputs against
    one-hot labels (Forouzesh et al., eqs. 4-5, with the bias approximated by the train
    error); ``bias_fraction = bias / (bias + variance estimate)`` is near one in the early,
    bias-dominated phase, where S is not yet expected to track the held-out loss.
    """

    def __init__(
        self,
        sigma: float = 0.1,
        num_draws: int = 1,
        use_sigma_term: bool = False,
        perturb_at: str | None = None,
    ):
        check_positive("sigma", sigma)
        check_positive("num_draws", num_draws, integer=True)
        self.sigma = sigma
        self.num_draws = num_draws
        self.use_sigma_term = use_sigma_term
        self.perturb_at = perturb_at
        self._at: str | None = None  # where the noise goes in this fit: None is the inputs

    def setup(self, model: nn.Module, probes: Probes, num_outputs: int) -> None:
        """Remember K (eq. 9 only applies to classifiers) and where the noise goes."""
        self._at = resolve_perturb_at(model, probes, self.perturb_at, "output sensitivity")
        self.num_classes = num_outputs

    def statistics(
        self, model: nn.Module, probes: Probes, outputs: Outputs, context: Context
    ) -> Stats:
        """Sums of the per-pair noise response and its square, of x^2, and of the bias."""
        probe = probes.unlabeled
        response = torch.zeros(0, 1, dtype=torch.float64)  # an empty shard responds nothing
        if len(probe):
            response = noise_response(
                model,
                probe.inputs,
                sigma=self.sigma,
                num_draws=self.num_draws,
                clean_outputs=outputs.unlabeled_logits,
                batch_size=context.batch_size,
                generator=context.draws(probe),
                perturb_at=self._at,
            ).double()
        stats = sum_and_count("response", response)
        # One input's draws share it: the input, not the draw, is the unit of the error.
        per_input = response.reshape(-1, self.num_draws * response.shape[1])
        stats |= cluster_sums("response", per_input)
        stats |= second_moment_stats(model, probe.inputs, self._at, context.batch_size)
        if self.num_classes > 1 and probes.train.targets is not None:
            errors = softmax_mse(outputs.train_logits, probes.train.targets, reduction="none")
            stats |= sum_and_count("bias", errors)
        if self.use_sigma_term:
            stats["sigma_term_sum"] = sigma_term(model, max(self.num_classes, 2)).double()
            stats["sigma_term_count"] = torch.ones((), dtype=torch.float64)
        return stats

    def finalize(self, stats: Stats) -> dict[str, float]:
        """S (population variance over all pairs) with its standard error, eq. 9, the bias fraction.

        The predicted losses and the bias fraction carry no standard error (see
        :mod:`gapwatch.callbacks._uncertainty`).
        """
        sensitivity, error = variance_and_se(stats, "response")
        metrics = {"sensitivity": sensitivity, "sensitivity_se": error}
        if self.num_classes < 2:
            return metrics
        k = self.num_classes
        x2 = mean(stats, "x2")
        extra = mean(stats, "sigma_term") if self.use_sigma_term else 0.0
        predict = partial(
            predicted_test_loss, num_classes=k, input_second_moment=x2, sigma=self.sigma
        )
        metrics["predicted_test_loss"] = float(predict(sensitivity, sigma_term=extra))
        if "bias_sum" in stats:
            bias = mean(stats, "bias")
            variance = (k - 1) / k * (sensitivity * x2 / self.sigma**2 + extra)
            metrics["predicted_test_loss_bias"] = float(
                predict(sensitivity, sigma_term=extra, bias=bias)
            )
            total = bias + variance
            metrics["bias_fraction"] = bias / total if total > 0 else float("nan")
        return metrics


class OutputSensitivity(ProbeCallback):
    """Log the output sensitivity S and the test loss it predicts, beside the held-out loss.

    Logged (under ``prefix``): ``sensitivity``, ``predicted_test_loss``,
    ``predicted_test_loss_bias``, ``bias_fraction``, and the held-out and train loss and
    accuracy with their ``gap``.

    Args:
        sigma: Standard deviation of the Gaussian input noise.
        num_draws: Noise draws per probe input.
        use_sigma_term: Add eq. 8's bias-variance term Sigma to eq. 9 (off: the paper
            finds it negligible).
        perturb_at: Module path whose output gets the noise instead of the inputs;
            ``sigma`` is then in that output's units and eq. 9's ``E[x^2]`` is its second
            moment. By default floating-point inputs get it; integer inputs (token ids,
            uint8 images) and keyword inputs perturb the first ``nn.Embedding``, else the
            first module with a floating-point output (said in an info line).
        **kwargs: Scheduling and probe options of :class:`~gapwatch.callbacks.ProbeCallback`.

    Example::

        trainer = Trainer(callbacks=[OutputSensitivity(sigma=0.1)])
    """

    def __init__(
        self,
        sigma: float = 0.1,
        num_draws: int = 1,
        use_sigma_term: bool = False,
        perturb_at: str | None = None,
        **kwargs: Any,
    ) -> None:
        proxy = SensitivityProxy(sigma, num_draws, use_sigma_term, perturb_at)
        super().__init__([proxy], **kwargs)
