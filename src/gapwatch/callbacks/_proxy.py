"""The proxy protocol: how one measurement plugs into a probe callback.

An evaluation runs each probe through the model once (``Outputs``); every proxy then
turns those shared logits, plus any extra work of its own, into *additive statistics*:
sums and counts over this process's shard of the probes. The callback sums them across
processes and lets each proxy ``finalize`` them into metrics, so a data-parallel run
reports exactly the numbers a single process would on the same probes.

A proxy whose own work begins with that same forward pass (the Jacobian needs its graph,
unit ablation a layer's activation) may run the shared pass itself (``run_probe``), so
that no probe goes through the model twice for the same logits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gapwatch.callbacks._probes import Probe, Probes, Role
from gapwatch.functional._draws import RowSeeds


class NotApplicableError(ValueError):
    """A proxy cannot measure this model or data: a regression model, unlabelled batches.

    A single-proxy callback lets it stop the fit at setup; ``GeneralizationMonitor`` skips
    the proxy instead and says why.
    """


def require_classes(num_outputs: int, what: str) -> None:
    """Raise, naming the callbacks that do apply, if the model has a single output."""
    if num_outputs < 2:
        raise NotApplicableError(
            f"{what} needs class scores (K >= 2 outputs), but the model has one output. For a "
            "regression model use OutputSensitivity or JacobianNorm(output='logits'), or "
            "GeneralizationMonitor(), which runs what applies and skips the rest."
        )


def require_float_inputs(probes: Probes, what: str, switch: str) -> None:
    """Raise, naming the switch, if a proxy that perturbs inputs meets integer inputs.

    Token ids and raw image bytes have no Gaussian neighbourhood: the perturbation must
    act after the model has embedded or converted them.
    """
    inputs = probes.unlabeled.inputs
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
        kind = "keyword inputs"
        if isinstance(inputs, Tensor):
            kind = f"{inputs.dtype} (token ids or raw image bytes)"
        raise NotApplicableError(
            f"{what} perturbs the inputs, but they are {kind}, "
            f"which cannot be perturbed in place; turn it off ({switch}) or feed floating-point "
            "inputs."
        )


def require_train_targets(probes: Probes, what: str) -> None:
    """Raise, naming the fix, if a proxy that needs labels meets unlabelled train batches."""
    if probes.train.targets is not None:
        return
    keys = probes.train.batch_keys
    if keys is not None:
        fix = (
            f"the batches are mappings with keys {list(keys)}: set `target_key=` to the key "
            "of the labels"
        )
    else:
        fix = "use `(inputs, targets)` batches or override `split_batch`"
    raise NotApplicableError(
        f"{what} needs labelled train batches, but they carry no targets: {fix}."
    )


Stats = dict[str, Tensor]


@dataclass(frozen=True)
class Context:
    """Settings of one evaluation that every proxy shares."""

    generator: torch.Generator
    batch_size: int
    seed: int = 0
    step: int = 0
    rank: int = 0
    world_size: int = 1
    num_outputs: int = 1

    def draws(self, probe: Probe) -> RowSeeds:
        """Random streams for the rows of ``probe``, keyed to their place in the whole probe.

        The same at every evaluation (curves move with the model, not the noise), and the
        same for a row whichever process holds it, so data-parallel values equal a single
        process's.
        """
        base = (self.seed % 2**20) << 26
        return RowSeeds(base + probe.row_ids)


@dataclass
class Outputs:
    """What the one clean forward pass per probe produced (float32, this shard)."""

    heldout_logits: Tensor | None
    train_logits: Tensor

    def labelled(self, probes: Probes) -> list[tuple[str, Probe, Tensor]]:
        """``(name, probe, logits)`` of each probe with targets: ``"train"``, then ``"test"``."""
        pairs = [("train", probes.train, self.train_logits)]
        if probes.heldout is not None and self.heldout_logits is not None:
            pairs.append(("test", probes.heldout, self.heldout_logits))
        return [(name, probe, logits) for name, probe, logits in pairs if probe.targets is not None]

    @property
    def unlabeled_logits(self) -> Tensor:
        """Logits of ``Probes.unlabeled``: held-out if there is a held-out probe."""
        return self.heldout_logits if self.heldout_logits is not None else self.train_logits


class Proxy(ABC):
    """One measurement inside a probe callback.

    Subclasses implement ``statistics`` (additive, on this process's shard) and
    ``finalize`` (metrics from the summed statistics). ``setup`` runs once, before the
    first evaluation, with the whole (unsharded) probe sets on the CPU, and is where bad
    configurations must fail.
    """

    #: Metrics that have no value at a fit's first evaluation (logged NaN without a warning).
    undefined_at_first: tuple[str, ...] = ()

    def setup(self, model: nn.Module, probes: Probes, num_outputs: int) -> None:  # noqa: B027
        """Check the model and probes before training starts (default: nothing to check)."""

    def reset(self) -> None:  # noqa: B027
        """Forget what an earlier fit left (before a checkpoint is restored; default: nothing)."""

    def state_dict(self) -> dict[str, object]:
        """What a resumed fit needs from earlier evaluations (default: nothing)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027
        """Restore ``state_dict`` (default: nothing)."""

    def run_probe(
        self, model: nn.Module, probes: Probes, role: Role, context: Context
    ) -> Tensor | None:
        """Run the shared forward pass over one probe, doing this proxy's work on the way.

        The callback offers each probe's shared pass to its proxies in order; the first
        that returns logits has run it. It must return what the plain pass would: the
        detached float32 ``[n, K]`` outputs on this process's shard, in eval mode. A
        proxy that is not offered the pass (an earlier proxy took it, or it declined)
        does the same work in ``statistics``; only the order of the draws from
        ``context.generator`` may differ. Default: decline (``None``).
        """
        return None

    @abstractmethod
    def statistics(
        self, model: nn.Module, probes: Probes, outputs: Outputs, context: Context
    ) -> Stats:
        """Additive statistics of this shard: sums and counts, each a tensor."""

    @abstractmethod
    def finalize(self, stats: Stats) -> dict[str, float]:
        """Metric values (names without prefix) from statistics summed over processes."""

    def artifacts(self) -> dict[str, object]:
        """More than scalars from this process's latest evaluation, by name, for TensorBoard.

        A tensor is shown as a histogram, an ``AblationResult`` as its curves (see
        :class:`gapwatch.tensorboard.Visuals`). Default: nothing.
        """
        return {}


def mean(stats: Stats, key: str) -> float:
    """``stats[key + '_sum'] / stats[key + '_count']``; NaN when nothing was counted."""
    count = float(stats[f"{key}_count"])
    return float(stats[f"{key}_sum"]) / count if count > 0 else float("nan")


def sum_and_count(key: str, values: Tensor, center: float = 0.0) -> Stats:
    """The additive form of a per-sample quantity, in float64.

    ``_sumsq`` sums ``(x - center)²`` for the standard error (``_uncertainty.mean_se``);
    a centre near the values keeps it exact when they differ in late decimals.
    """
    values = values.detach().double()
    return {
        f"{key}_sum": values.sum(),
        f"{key}_sumsq": (values - center).square().sum(),
        f"{key}_count": values.new_tensor(values.numel()),
    }
