"""Loss and accuracy on both probes, and the gap: what every gapwatch callback logs."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from gapwatch.callbacks._probes import Probe, Probes
from gapwatch.callbacks._proxy import Context, Outputs, Proxy, Stats, mean, sum_and_count
from gapwatch.callbacks._uncertainty import difference_se, with_se
from gapwatch.functional._common import evaluation, forward_chunks

#: The label ``F.cross_entropy`` skips by default; rows carrying it count nowhere.
IGNORE_INDEX = -100

Kind = Literal["multiclass", "binary", "regression"]


class LossProxy(Proxy):
    """Loss and accuracy on both probes, and the gap (train minus held-out accuracy).

    What the loss is follows from the model and its labels:

    * ``K >= 2`` outputs: cross-entropy of the logits, accuracy of their argmax (rows
      labelled ``-100`` are left out of the probes at setup, as ``F.cross_entropy``
      leaves them out of a loss). A model
      whose outputs are already probabilities (non-negative rows summing to one) gets the
      negative log-likelihood of those, with one warning;
    * one output and 0/1 labels (integer, bool or float, as ``BCEWithLogitsLoss`` takes
      them): a binary classifier's binary cross-entropy of its logit, accuracy of
      ``logit > 0``. A regression whose targets are all 0 or 1 is scored so too;
    * one output otherwise: regression, the mean squared error and no accuracy or gap.
    """

    kind: Kind = "multiclass"
    probabilities = False

    def setup(self, model: nn.Module, probes: Probes, num_outputs: int) -> None:
        """Decide what the loss is; check every probe's labels against it.

        A probe without targets simply has no loss or accuracy: the label-free proxies
        (sensitivity, Jacobian norm, transitions) still run on it.
        """
        labelled = [
            p for p in (probes.train, probes.heldout) if p is not None and p.targets is not None
        ]
        targets = [p.targets for p in labelled if p.targets is not None]
        if num_outputs > 1:
            self.kind = "multiclass"
            for probe in labelled:
                _check_labels(probe, num_outputs)
        elif targets and all(binary_labels(t) for t in targets):
            self.kind = "binary"
            rank_zero_info(
                "gapwatch: one output and 0/1 labels: scored as a binary classifier (binary "
                "cross-entropy of the logit, accuracy of logit > 0), as BCEWithLogitsLoss "
                "trains one."
            )
        else:
            self.kind = "regression"
        self.probabilities = self.kind == "multiclass" and _outputs_probabilities(
            model, probes.train
        )
        if self.probabilities:
            rank_zero_warn(
                "gapwatch: the model's outputs are probabilities (non-negative, each row sums "
                "to one), not logits; the losses are their negative log-likelihood. Proxies "
                "of the logits (sensitivity, the logit Jacobian, the normalized loss) measure "
                "the probabilities instead: point `model_attr` at the module before the softmax."
            )

    def statistics(
        self, model: nn.Module, probes: Probes, outputs: Outputs, context: Context
    ) -> Stats:
        """Per-probe sums of loss and correct predictions."""
        stats: Stats = {}
        for role, probe, logits in outputs.labelled(probes):
            assert probe.targets is not None  # for the type checker
            loss, correct = self._per_sample(logits, probe.targets)
            stats |= sum_and_count(f"{role}_loss", loss)
            if correct is not None:
                stats |= sum_and_count(f"{role}_acc", correct)
        return stats

    def finalize(self, stats: Stats) -> dict[str, float]:
        """Mean loss and accuracy per probe, and the gap when both probes are present.

        Each comes with its standard error (``_se``; the gap's from two independent probes).
        """
        names = [n.removesuffix("_sum") for n in stats if n.endswith("_sum")]
        metrics = with_se({name: mean(stats, name) for name in names}, stats)
        if "train_acc" in metrics and "test_acc" in metrics:
            metrics["gap"] = metrics["train_acc"] - metrics["test_acc"]
            metrics["gap_se"] = difference_se(metrics["train_acc_se"], metrics["test_acc_se"])
        return metrics

    def _per_sample(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | None]:
        """Each counted row's loss and correctness (NaN where the outputs are NaN)."""
        if self.kind == "regression":
            return (logits.squeeze(1) - targets.float()).square(), None
        unknown = logits.isnan().any(1)  # argmax picks a class even from NaN logits
        if self.kind == "binary":
            logit, labels = logits.squeeze(1), targets.float()
            loss = F.binary_cross_entropy_with_logits(logit, labels, reduction="none")
            correct = ((logit > 0) == (labels > 0.5)).float()
        else:
            if self.probabilities:
                loss = F.nll_loss(logits.clamp_min(1e-45).log(), targets, reduction="none")
            else:
                loss = F.cross_entropy(logits, targets, reduction="none")
            correct = (logits.argmax(1) == targets).float()
        return loss, correct.masked_fill(unknown, math.nan)


def binary_labels(targets: Tensor) -> bool:
    """Whether every label is 0 or 1, in whatever dtype (float for ``BCEWithLogitsLoss``)."""
    return bool(((targets == 0) | (targets == 1)).all())


def _check_labels(probe: Probe, num_classes: int) -> None:
    """Integer class indices in ``[0, K)`` (or the ignore index), one per sample."""
    targets = probe.targets
    assert targets is not None  # for the type checker
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(
            f"The model has {num_classes} outputs, so gapwatch reads the labels as class "
            f"indices, but they are {targets.dtype}; classification needs integer labels "
            "(`y.long()`), or a one-output model for regression."
        )
    if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(
            f"The labels must be class indices in [0, {num_classes}) for the model's "
            f"{num_classes} outputs (or {IGNORE_INDEX}, which is skipped), but they range "
            f"from {int(targets.min())} to {int(targets.max())}."
        )


def _outputs_probabilities(model: nn.Module, probe: Probe) -> bool:
    """Whether the model's outputs on two probe rows are probabilities (logits never sum to 1)."""
    with evaluation(model), torch.no_grad():
        _, _, outputs = next(forward_chunks(model, probe.inputs[:2], None))
    return bool((outputs >= 0).all() and torch.allclose(outputs.sum(1), torch.ones(()), atol=1e-4))
