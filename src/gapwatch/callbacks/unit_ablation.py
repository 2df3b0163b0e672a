"""Zhao et al.'s cumulative unit-ablation sparsity (zeta, kappa), as a callback."""

from __future__ import annotations

import math
from typing import Any, cast, get_args

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from tqdm import tqdm

from gapwatch.callbacks._ablation_layer import default_layer, refuse_output_layer
from gapwatch.callbacks._probes import Probe, Probes, Role
from gapwatch.callbacks._proxy import (
    Context,
    NotApplicableError,
    Outputs,
    Proxy,
    Stats,
    mean,
    require_classes,
    require_train_targets,
)
from gapwatch.callbacks.base import ProbeCallback
from gapwatch.functional._common import (
    check_choice,
    check_positive,
)
from gapwatch.functional._inputs import KeywordInputs
from gapwatch.functional.ablation import (
    AblationResult,
    KappaMethod,
    LayerSplit,
    ablation_from_activations,
    ablation_in_chunks,
    ablation_summary,
    split_model,
)

#: Seconds an ablation runs before its progress bar appears.
PROGRESS_DELAY = 2.0
#: The layer's activation is kept for at most this many chunks of rows: a larger probe is
#: ablated chunk by chunk (two more prefix passes), so that memory stays bounded by
#: ``batch_size`` whatever ``probe_size`` is.
KEPT_CHUNKS = 4


class AblationProxy(Proxy):
    """Class-mean zeta and kappa of cumulative unit ablation on the train probe.

    Classes are independent (class ``j``'s curves use only class-``j`` samples and their
    own unit ranking), so under data parallelism each process takes a share of the
    classes over the whole train probe: the summed result is exactly the single-process
    one. The layer's activation is captured once and only the network after the layer is
    rerun, batched over ablation levels. In a single process the capture rides on the
    train probe's shared forward pass; a process of a data-parallel run holds only a
    shard of that pass, so it runs the prefix over its classes' samples instead.
    """

    def __init__(
        self,
        layer: str | None = None,
        max_classes: int = 10,
        gap_coefficients: tuple[float, float, float] | None = None,
        kappa: KappaMethod = "paper",
    ) -> None:
        check_positive("max_classes", max_classes, integer=True)
        check_choice("kappa", kappa, get_args(KappaMethod))
        if gap_coefficients is not None and (
            len(gap_coefficients) != 3
            or not all(isinstance(c, (int, float)) and math.isfinite(c) for c in gap_coefficients)
        ):
            raise ValueError(
                "`gap_coefficients` must be the three numbers (a, b, c) of "
                f"`gap = a * zeta + b * kappa + c`, got {gap_coefficients!r}."
            )
        self.layer = layer
        self.max_classes = max_classes
        self.gap_coefficients = gap_coefficients
        self.kappa = kappa
        self.last_result: AblationResult | None = None
        # (activation, live) of this evaluation's classes, from `run_probe`, for `statistics`.
        self._pending: tuple[Tensor, tuple[Tensor, ...]] | None = None

    def setup(self, model: nn.Module, probes: Probes, num_outputs: int) -> None:
        """Pick (or check) the layer and split the model there, before training starts."""
        require_classes(num_outputs, "Unit ablation")
        require_train_targets(probes, "Unit ablation")
        if isinstance(probes.train.inputs, KeywordInputs):
            raise NotApplicableError(
                "Unit ablation cuts a model that takes one input tensor; this one takes "
                f"keyword inputs ({', '.join(probes.train.inputs)}). Turn it off "
                "(`ablation=False` in the suite)."
            )
        device = next(iter(model.parameters())).device
        if self.layer is None:
            try:
                self.layer = default_layer(model, probes.train.inputs[:2].to(device))
            except ValueError as error:  # the suite skips it; UnitAblation still refuses
                raise NotApplicableError(str(error)) from None
            rank_zero_info(f"gapwatch: unit ablation uses layer {self.layer!r}.")
        else:
            refuse_output_layer(model, self.layer, probes.train.inputs[:2].to(device))
        self.num_classes = num_outputs
        self.probe: Probe = probes.train
        self.split: LayerSplit = self._cut(model)
        self._parts = _parts(model)
        assert probes.train.targets is not None  # for the type checker
        counts = torch.bincount(probes.train.targets, minlength=num_outputs)
        absent = (counts == 0).nonzero().flatten().tolist()
        if absent:
            rank_zero_warn(
                f"gapwatch: classes {absent} have no samples in the train probe; unit "
                "ablation averages zeta and kappa over the other classes."
            )

    def run_probe(
        self, model: nn.Module, probes: Probes, role: Role, context: Context
    ) -> Tensor | None:
        """Take the train probe's pass when it covers the whole probe, keeping the layer."""
        if role != "train" or context.world_size > 1:
            return None
        keep = torch.isin(self._targets, self._classes(context))
        if int(keep.sum()) > KEPT_CHUNKS * context.batch_size:
            return None  # too many rows to keep their activation: `statistics` streams them
        split = self._split_of(model)
        inputs = cast(Tensor, probes.train.inputs)  # keyword inputs were refused at setup
        activation, live, logits = split.run(inputs, batch_size=context.batch_size, keep=keep)
        self._pending = activation, live
        return logits

    def statistics(
        self, model: nn.Module, probes: Probes, outputs: Outputs, context: Context
    ) -> Stats:
        """Sums of per-class zeta and kappa over this process's share of the classes."""
        captured, self._pending = self._pending, None
        targets, mine = self._targets, self._classes(context)
        stats: Stats = {
            name: torch.zeros((), dtype=torch.float64) for name in ("zeta_sum", "kappa_sum")
        }
        stats["classes_count"] = torch.tensor(float(len(mine)), dtype=torch.float64)
        if len(mine) == 0:
            return stats
        keep = torch.isin(targets, mine)
        split = self._split_of(model)
        if captured is None and int(keep.sum()) > KEPT_CHUNKS * context.batch_size:
            result = ablation_in_chunks(
                split,
                self.probe.inputs[keep],
                targets[keep],
                num_classes=self.num_classes,
                classes=mine.tolist(),
                batch_size=context.batch_size,
                kappa=self.kappa,
            )
            return self._stats(stats, result)
        if captured is None:
            inputs = self.probe.inputs[keep]
            activation, live = split.capture(inputs, batch_size=context.batch_size)
        else:
            activation, live = captured
        labels = targets[keep].to(activation.device)
        # Class by class, so that a long ablation (a wide layer, many samples) can show
        # progress; the bar only appears once the work has taken PROGRESS_DELAY seconds.
        classes = tqdm(
            mine.tolist(),
            desc="gapwatch: unit ablation",
            unit="class",
            leave=False,
            delay=PROGRESS_DELAY,
            disable=True if context.rank != 0 else None,  # None: only on a terminal
        )
        per_class = [
            ablation_from_activations(
                split.suffix,
                activation,
                labels,
                num_classes=self.num_classes,
                live=live,
                classes=[label],
                batch_size=context.batch_size,
            )
            for label in classes
        ]
        result = ablation_summary(
            torch.cat([r.curves for r in per_class]),
            torch.cat([r.curves_reversed for r in per_class]),
            chance=1.0 / self.num_classes,
            classes=mine.to(activation.device),
            kappa=self.kappa,
        )
        return self._stats(stats, result)

    def _stats(self, stats: Stats, result: AblationResult) -> Stats:
        self.last_result = result
        stats["zeta_sum"] = result.zeta_per_class.double().sum().cpu()
        stats["kappa_sum"] = result.kappa_per_class.double().sum().cpu()
        return stats

    @property
    def _targets(self) -> Tensor:
        """The train probe's labels (``setup`` insists on them)."""
        assert self.probe.targets is not None  # for the type checker
        return self.probe.targets

    def _classes(self, context: Context) -> Tensor:
        """This process's share of the evaluation's classes: a fresh subset each step."""
        present = torch.unique(self._targets)
        subset = torch.randperm(len(present), generator=_cpu(context))[: self.max_classes]
        return present[subset.sort().values][context.rank :: context.world_size]

    def _split_of(self, model: nn.Module) -> LayerSplit:
        """The split of the model as it is now, cut again if a module or tensor was replaced.

        The split's graphs hold the modules and tensors the model had when it was cut; a
        model whose head is swapped mid-training must not be evaluated with the old one.
        """
        parts = _parts(model)
        if parts != self._parts:
            self.split, self._parts = self._cut(model), parts
        return self.split

    def _cut(self, model: nn.Module) -> LayerSplit:
        """Split ``model`` at the layer, by hooks if the traced suffix cannot be batched."""
        assert self.layer is not None  # for the type checker
        return split_model(model, self.layer, example_inputs=self.probe.inputs[:2])

    def finalize(self, stats: Stats) -> dict[str, float]:
        """Class means (eq. 6) and, with coefficients, the estimated gap (eq. 7)."""
        count = stats["classes_count"]
        stats = {**stats, "zeta_count": count, "kappa_count": count}
        zeta, kappa = mean(stats, "zeta"), mean(stats, "kappa")
        metrics = {"ablation_zeta": zeta, "ablation_kappa": kappa}
        if self.gap_coefficients is not None:
            a, b, c = self.gap_coefficients
            metrics["estimated_gap"] = a * zeta + b * kappa + c
        return metrics

    def artifacts(self) -> dict[str, object]:
        """The latest ablation curves of this process's classes, for a figure."""
        return {} if self.last_result is None else {"ablation_curves": self.last_result}


def _parts(model: nn.Module) -> list[int]:
    """Identities of the model's submodules, parameters and buffers.

    Not of the root module, which a ``get_model`` override may build anew each time
    around the same modules.
    """
    modules = [id(m) for _, m in model.named_modules(remove_duplicate=False)][1:]
    return modules + [id(t) for t in (*model.parameters(), *model.buffers())]


def _cpu(context: Context) -> torch.Generator:
    # A fresh subset of classes at each evaluation, identical on every process.
    return torch.Generator().manual_seed(context.seed + context.step)


class UnitAblation(ProbeCallback):
    """Log Zhao et al.'s ablation sparsity zeta and kappa, beside the held-out loss.

    Logged (under ``prefix``): ``ablation_zeta``, ``ablation_kappa``, ``estimated_gap``
    (with ``gap_coefficients``), plus the held-out and train loss and accuracy with
    their ``gap``. Lower zeta and higher kappa go with a smaller generalization gap.

    Args:
        layer: Module path of the ablated layer (``"features.28"``, ``"layer4"``); by
            default the last hidden layer before the classifier, reported once.
        max_classes: Classes evaluated per evaluation; with more classes a random subset
            is drawn at each evaluation.
        gap_coefficients: ``(a, b, c)`` of a fitted :class:`~gapwatch.GapEstimator`
            (fitted with the same ``kappa``).
        kappa: ``"paper"``: eq. 5 as printed, ``sum_n |E_r(n) - E(n)| / M``;
            ``"authors"``: the authors' code, ``sum_n (E_r(n) - E(n)) / (M + 1)``. See
            :func:`gapwatch.functional.ablation.ablation_summary` for why the first is the default.
        **kwargs: Scheduling and probe options of :class:`~gapwatch.callbacks.ProbeCallback`.
    """

    def __init__(
        self,
        layer: str | None = None,
        max_classes: int = 10,
        gap_coefficients: tuple[float, float, float] | None = None,
        kappa: KappaMethod = "paper",
        **kwargs: Any,
    ) -> None:
        proxy = AblationProxy(layer, max_classes, gap_coefficients, kappa)
        super().__init__([proxy], **kwargs)
