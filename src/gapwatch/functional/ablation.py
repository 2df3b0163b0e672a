"""Cumulative unit ablation and the sparsity of critical units (Zhao et al., eqs. 1-6).

For every class, the units of one layer are ranked by their mean L1 activation on that
class and zeroed cumulatively, most active first (curve ``E``) and least active first
(curve ``E_r``); the turning points of the two curves and the area between them give
the sparsity quantities ``zeta`` and ``kappa``.

Both curves need ``2 (M + 1)`` evaluations per class. Running the whole network for each
would repeat the part before the layer ``2 (M + 1)`` times with identical results, so the
model is split at the layer: the prefix runs once, and only the suffix runs on the
masked activations, all ablation levels of a class stacked into large batches.

The cut lives in :mod:`gapwatch.functional._layer_split`, the curves' arithmetic and
eqs. 2-6 in :mod:`gapwatch.functional._ablation_curves`; this module holds the entry points.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gapwatch.functional._ablation_curves import (
    _KAPPA_METHODS,
    AblationResult,
    KappaMethod,
    _ablate_class,
    _activity,
    _class_hits,
    _present_classes,
    _ranks,
    ablation_summary,
)
from gapwatch.functional._common import (
    DEFAULT_BATCH_SIZE,
    check_batch_size,
    check_choice,
    check_inputs,
    check_positive,
    check_targets,
    chunks,
    evaluation,
)
from gapwatch.functional._layer_cuts import Suffix
from gapwatch.functional._layer_split import (
    LayerSplit,
    SplitMethod,
    UnbatchableSplitError,
    split_model,
)

__all__ = [
    "AblationResult",
    "KappaMethod",
    "LayerSplit",
    "UnbatchableSplitError",
    "ablation_from_activations",
    "ablation_in_chunks",
    "ablation_summary",
    "split_model",
    "unit_ablation",
]


def ablation_in_chunks(
    split: LayerSplit,
    inputs: Tensor,
    targets: Tensor,
    *,
    num_classes: int,
    classes: Sequence[int],
    chance: float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    kappa: KappaMethod = "paper",
) -> AblationResult:
    """Cumulative unit ablation (eqs. 1-6) holding one chunk's activation at a time.

    :func:`ablation_from_activations` needs the layer's activation of every sample at once,
    which grows with the number of samples. Here the prefix runs twice over the inputs,
    ``batch_size`` rows at a time: the first pass sums each class's unit activity (the
    ranking of eq. 1), the second ablates each chunk's rows at every level and counts
    correct predictions per class. Extra memory is bounded by ``batch_size``, not by N.

    Args:
        split: The model split at the ablated layer (:func:`split_model`).
        inputs: ``[N, ...]`` inputs on any device.
        targets: ``[N]`` integer labels.
        num_classes: Number of classes ``K``.
        classes: Class ids to evaluate; each must have samples.
        chance: Chance accuracy for eq. 2 (default ``1 / num_classes``).
        batch_size: Rows per prefix pass, and per suffix call.
        kappa: ``"paper"`` or ``"authors"``; see :func:`ablation_summary`.

    Returns:
        The :class:`AblationResult`, as :func:`ablation_from_activations` gives it up to
        the float rounding of the activity sums.
    """
    check_inputs(inputs, floating=False)
    check_targets(targets, inputs.shape[0])
    check_positive("batch_size", batch_size, integer=True)
    check_choice("kappa", kappa, _KAPPA_METHODS)
    ids = list(classes)
    activity: Tensor | None = None
    for rows in chunks(inputs.shape[0], batch_size):
        activation, _ = split.capture(inputs[rows], batch_size=None)
        labels = targets[rows].to(activation.device)
        part = _activity(activation.float()).double()
        if activity is None:
            activity = part.new_zeros((len(ids), part.shape[1]))
        for i, label in enumerate(ids):
            activity[i] += part[labels == label].sum(0)
    assert activity is not None  # inputs has rows
    ranks = [_ranks(score.float()) for score in activity]
    hits = activity.new_zeros((len(ids), 2 * (activity.shape[1] + 1)))
    for rows in chunks(inputs.shape[0], batch_size):
        activation, live = split.capture(inputs[rows], batch_size=None)
        labels = targets[rows].to(activation.device)
        for i, label in enumerate(ids):
            members = labels == label
            if bool(members.any()):
                values = tuple(v[members] for v in live)
                hits[i] += _class_hits(
                    split.suffix, activation[members].float(), values, ranks[i], label,
                    num_classes, batch_size,
                )  # fmt: skip
    counts = torch.stack([(targets == label).sum() for label in ids]).to(hits)
    curves = (hits / counts[:, None]).float().view(len(ids), 2, -1)
    chance = 1.0 / num_classes if chance is None else chance
    ids_tensor = torch.tensor(ids, device=curves.device)
    return ablation_summary(
        curves[:, 0], curves[:, 1], chance=chance, classes=ids_tensor, kappa=kappa
    )


def ablation_from_activations(
    suffix: Suffix,
    activations: Tensor,
    targets: Tensor,
    *,
    num_classes: int,
    live: Sequence[Tensor] = (),
    classes: Sequence[int] | Tensor | None = None,
    chance: float | None = None,
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    kappa: KappaMethod = "paper",
) -> AblationResult:
    """Cumulative unit ablation (eq. 1) from an already captured layer activation.

    For each class ``j`` the units are ranked by their L1 attribute, ``sum_{x,y} |U(x,y)|``
    averaged over the class's samples (ties broken by unit index), and for every level
    ``n = 0..M`` the ``n`` first units of the descending (``E``) and of the ascending
    (``E_r``) ranking are set to zero. All ``2 (M + 1)`` masked copies of every sample are
    run through ``suffix`` in chunks of at most ``batch_size`` rows (one ablation level
    of one sample is one row); a row counts as correct when its arg-max output is its
    class, and a row with a NaN output makes its level's accuracy NaN. The model must be
    in eval mode, so that BatchNorm does not mix rows. (One sentence of the paper's
    Sec. 3.1 swaps the names; its Sec. 3.2 and eqs. 2-3 fix ``E`` as most-active-first,
    as here.)

    This is the entry point for a caller that already ran the prefix, e.g. a callback
    that also needs the clean logits from the same pass, via :meth:`LayerSplit.run`.

    Args:
        suffix: ``(activation, live) -> logits``, e.g. ``split_model(model, layer).suffix``.
        activations: ``[N, M]`` or ``[N, M, H, W]`` layer outputs; a unit is a feature or
            a channel.
        targets: ``[N]`` integer labels.
        num_classes: Number of classes ``K`` of the model.
        live: Other per-sample suffix inputs (``[N, ...]`` each), repeated per level.
        classes: Class ids to evaluate (default all); classes without samples are
            skipped with a warning.
        chance: Chance accuracy for eq. 2 (default ``1 / num_classes``).
        batch_size: Rows per suffix call: ``DEFAULT_BATCH_SIZE`` (128) unless given;
            ``None``: all ``2 (M + 1) N`` rows at once.
        kappa: ``"paper"`` (eq. 5 as printed) or ``"authors"`` (the authors' signed
            mean); see :func:`ablation_summary`.

    Returns:
        The :class:`AblationResult`; float32 curves on the activations' device.

    Raises:
        ValueError: On activations that are not 2-D or 4-D, labels out of range, classes
            without any sample, a non-positive ``num_classes``, ``chance`` outside
            [0, 1], an unknown ``kappa``, or a model with other than ``num_classes``
            outputs.
        TypeError: On non-integer targets.
    """
    check_inputs(activations, name="activations")
    if activations.ndim not in (2, 4):
        raise ValueError(
            f"`activations` must be [N, F] or [N, C, H, W], got {tuple(activations.shape)}; "
            "pick a layer with a linear or convolutional output."
        )
    check_positive("num_classes", num_classes, integer=True)
    check_batch_size(batch_size)
    check_choice("kappa", kappa, _KAPPA_METHODS)
    chance = 1.0 / num_classes if chance is None else chance
    if not 0.0 <= chance <= 1.0:
        raise ValueError(f"`chance` is an accuracy and must lie in [0, 1], got {chance}.")
    targets = check_targets(targets, activations.shape[0]).to(activations.device)
    classes = _present_classes(targets, num_classes, classes)
    curves = []
    for label in classes:
        members = targets == label
        values = tuple(v[members] for v in live)
        curves.append(
            _ablate_class(
                suffix, activations[members].float(), values, label, num_classes, batch_size
            )
        )
    both = torch.stack(curves)
    ids = torch.tensor(classes, device=both.device)
    return ablation_summary(both[:, 0], both[:, 1], chance=chance, classes=ids, kappa=kappa)


def unit_ablation(
    model: nn.Module,
    layer: str,
    inputs: Tensor,
    targets: Tensor,
    *,
    num_classes: int,
    classes: Sequence[int] | Tensor | None = None,
    chance: float | None = None,
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    method: SplitMethod = "auto",
    kappa: KappaMethod = "paper",
) -> AblationResult:
    """Cumulative unit ablation of ``layer`` and its sparsity quantities (eqs. 1-6).

    ``E(n)`` is the accuracy on class ``j`` (fraction of its samples predicted as ``j``)
    after zeroing the ``n`` units with the largest mean L1 activation on class ``j``;
    ``E_r(n)`` removes the smallest first. See :func:`ablation_from_activations` for the
    ranking and :func:`ablation_summary` for eqs. 2-6. The layer's output is captured
    once and only the network after it is rerun (see :func:`split_model`), batched over
    levels, so the cost is one forward pass plus ``2 (M + 1)`` suffix passes per sample.

    Args:
        model: Classifier mapping inputs to ``[N, K]`` logits; run in eval mode and left
            as found.
        layer: Module path, e.g. ``"features.18"``, ``"layer4"``, ``"3"``; its output must
            be ``[N, F]`` or ``[N, C, H, W]``.
        inputs: ``[N, ...]`` inputs on any device.
        targets: ``[N]`` integer labels.
        num_classes: Number of classes ``K``.
        classes: Class ids to evaluate (default all with at least one sample).
        chance: Chance accuracy for eq. 2 (default ``1 / num_classes``).
        batch_size: Rows per forward call, for the prefix and the suffix passes:
            ``DEFAULT_BATCH_SIZE`` (128) unless given; ``None``: all at once.
        method: How to split the model: ``"auto"``, ``"fx"`` or ``"hook"``.
        kappa: ``"paper"`` (eq. 5 as printed) or ``"authors"`` (the authors' signed
            mean); see :func:`ablation_summary`.

    Returns:
        The :class:`AblationResult`.

    Raises:
        ValueError: On an unknown layer (valid paths are listed), a layer output that is
            not 2-D or 4-D, or the cases of :func:`ablation_from_activations`.
        TypeError: On non-tensor inputs or non-integer targets.
    """
    check_inputs(inputs, floating=False)
    check_targets(targets, inputs.shape[0])
    check_choice("kappa", kappa, _KAPPA_METHODS)
    split = split_model(model, layer, method=method, example_inputs=inputs[:2])
    with evaluation(model), torch.no_grad():
        activations, live = split.capture(inputs, batch_size=batch_size)
        return ablation_from_activations(
            split.suffix,
            activations,
            targets,
            num_classes=num_classes,
            live=live,
            classes=classes,
            chance=chance,
            batch_size=batch_size,
            kappa=kappa,
        )
