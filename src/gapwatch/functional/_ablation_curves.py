"""The ablation curves of one layer and their sparsity quantities (Zhao et al., eqs. 1-6).

:func:`ablation_summary` turns the curves ``E`` and ``E_r`` into the turning points
``n0``, ``n0_r`` (eqs. 2-3), ``zeta`` (eq. 4) and ``kappa`` (eq. 5, as printed or as the
authors' code computes it), averaged over classes (eq. 6), and :class:`AblationResult`
holds them. The private helpers rank a class's units by their mean L1 activation and
count the correct predictions of the suffix at every ablation level (eq. 1), which the
entry points of :mod:`gapwatch.functional.ablation` run class by class or chunk by chunk.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from gapwatch.functional._common import as_outputs, check_choice, check_classifier, chunks
from gapwatch.functional._layer_cuts import Suffix

KappaMethod = Literal["paper", "authors"]
_KAPPA_METHODS = get_args(KappaMethod)


@dataclass(frozen=True)
class AblationResult:
    """Cumulative unit ablation of one layer, class by class.

    Attributes:
        classes: ``[C]`` class ids evaluated, in the order of every per-class field.
        curves: ``[C, M+1]`` ``E(n)``: accuracy on the class after removing its ``n`` most
            active units.
        curves_reversed: ``[C, M+1]`` ``E_r(n)``: the same, least active units first.
        n0: ``[C]`` turning point of ``E`` (eq. 2); the first minimum of ``E`` if ``E``
            never reaches chance.
        n0_r: ``[C]`` turning point of ``E_r`` (eq. 3): its last maximum before ``n = M``.
        zeta_per_class: ``[C]`` eq. 4.
        kappa_per_class: ``[C]`` eq. 5, or the authors' variant (see
            :func:`ablation_summary`).
        zeta: 0-d class mean of ``zeta_per_class`` (eq. 6).
        kappa: 0-d class mean of ``kappa_per_class`` (eq. 6).
    """

    classes: Tensor
    curves: Tensor
    curves_reversed: Tensor
    n0: Tensor
    n0_r: Tensor
    zeta_per_class: Tensor
    kappa_per_class: Tensor
    zeta: Tensor
    kappa: Tensor


def ablation_summary(
    curves: Tensor,
    curves_reversed: Tensor,
    *,
    chance: float,
    classes: Tensor | None = None,
    kappa: KappaMethod = "paper",
) -> AblationResult:
    """Turning points and sparsity quantities of given ablation curves (eqs. 2-6).

    ``n0`` (eq. 2) is the first ``n`` with ``E(n) <= chance``. When ``E`` never gets
    there it is the first minimum of ``E``, as in the authors' code: in a chain network
    with the layer fully removed every sample gets the same prediction, so ``E(M)`` is
    0 for every class but one, and only that class, the one an all-zero layer predicts,
    can miss chance. Its ``E`` climbs back to 1 at ``n = M`` only because the empty layer
    predicts it, so the first minimum, the most damage done before that, is its turning
    point; ``M`` (the empty set's infimum read as "all units") would give this class the
    least sparse ``n0`` for an artefact.

    ``n0_r`` (eq. 3) is the *last* maximum of ``E_r`` over ``n = 0..M-1``. Last: the
    paper reads ``M - n0_r`` as the fewest units that, active together, give the best
    accuracy, and a network that fits its class stays at its maximum for a while as the
    least active units go, so the first maximum would be ``n = 0``. Before ``M``: for the
    class an all-zero layer predicts, ``E_r(M) = 1`` is always a maximum and would give
    ``M - n0_r = 0``; the authors' code excludes ``n = M`` likewise and finds the end of
    the real plateau. ``zeta = (n0 + M - n0_r) / 2M`` (eq. 4).

    ``kappa`` chooses between two readings of eq. 5:

    - ``"paper"`` (default), eq. 5 as printed: ``kappa = sum_{n=0..M} |E_r(n) - E(n)| / M``,
      the area enclosed by the two curves, in [0, 1] up to the factor ``(M + 1) / M``.
    - ``"authors"``, the authors' code, which produced the paper's figures:
      ``kappa = sum_{n=0..M} (E_r(n) - E(n)) / (M + 1)``, the signed mean, where
      stretches with ``E > E_r`` subtract. It is ``M / (M + 1)`` times the paper's value
      when ``E_r >= E`` throughout, and can be far smaller (even negative) when the
      curves cross, as they do for untrained networks.

    The printed equation is the default because it is the quantity the paper describes
    (an area, "adjusted to fall in the range from 0 to 1"), what gapwatch has always
    logged, and eq. 7 is refitted to its own family anyway; ``"authors"`` reproduces the
    published numbers. Both quantities are averaged over classes (eq. 6). A class whose
    curves hold a NaN (a model whose outputs went NaN) gets NaN for both.

    Args:
        curves: ``[C, M+1]`` ``E(n)``, most active units removed first.
        curves_reversed: ``[C, M+1]`` ``E_r(n)``, least active units removed first.
        chance: Chance-level accuracy.
        classes: ``[C]`` class ids (default ``0..C-1``).
        kappa: ``"paper"`` or ``"authors"``: which eq. 5, as above.

    Returns:
        The :class:`AblationResult` of these curves.

    Raises:
        ValueError: If the curves' shapes differ or have fewer than two levels, or on an
            unknown ``kappa``.
    """
    check_choice("kappa", kappa, _KAPPA_METHODS)
    if curves.shape != curves_reversed.shape or curves.ndim != 2 or curves.shape[1] < 2:
        raise ValueError(
            "`curves` and `curves_reversed` must both be [C, M+1] with M >= 1, got "
            f"{tuple(curves.shape)} and {tuple(curves_reversed.shape)}."
        )
    m = curves.shape[1] - 1
    reached = curves <= chance
    # argmax/argmin return the first extreme index (torch documents it).
    n0 = torch.where(reached.any(1), reached.int().argmax(1), curves.argmin(1))
    n0_r = (m - 1) - curves_reversed[:, :m].flip(1).argmax(1)
    zeta = (n0 + m - n0_r).float() / (2 * m)
    # Turning points of curves with undefined (NaN) accuracies are undefined too.
    undefined = (curves.isnan() | curves_reversed.isnan()).any(1)
    zeta = zeta.masked_fill(undefined, math.nan)
    difference = curves_reversed - curves
    kappa_per_class = difference.abs().sum(1) / m if kappa == "paper" else difference.mean(1)
    if classes is None:
        classes = torch.arange(curves.shape[0], device=curves.device)
    return AblationResult(
        classes,
        curves,
        curves_reversed,
        n0,
        n0_r,
        zeta,
        kappa_per_class,
        zeta.mean(),
        kappa_per_class.mean(),
    )


def _present_classes(
    targets: Tensor, num_classes: int, classes: Sequence[int] | Tensor | None
) -> list[int]:
    """The requested classes (default all) that have samples; warn about the others."""
    if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"`targets` must lie in [0, {num_classes}); check `num_classes`.")
    wanted = list(range(num_classes)) if classes is None else torch.as_tensor(classes).tolist()
    if not isinstance(wanted, list) or not wanted or len(set(wanted)) != len(wanted):
        raise ValueError("`classes` must be a non-empty list of distinct class ids.")
    if not all(isinstance(c, int) and 0 <= c < num_classes for c in wanted):
        raise ValueError(f"`classes` must be integers in [0, {num_classes}), got {wanted}.")
    counts = torch.bincount(targets, minlength=num_classes).tolist()
    missing = [c for c in wanted if counts[c] == 0]
    if len(missing) == len(wanted):
        raise ValueError(f"None of the classes {missing} has samples in `targets`.")
    if missing:
        warnings.warn(
            f"Classes {missing} have no samples and are skipped; zeta and kappa average "
            "over the other classes.",
            stacklevel=3,
        )
    return [c for c in wanted if counts[c] > 0]


def _ablate_class(
    suffix: Suffix,
    activations: Tensor,
    live: tuple[Tensor, ...],
    label: int,
    num_classes: int,
    batch_size: int | None,
) -> Tensor:
    """``[2, M+1]``: ``E`` and ``E_r`` on the samples of one class (all labelled ``label``)."""
    rank = _ranks(_activity(activations).mean(0))
    hits = _class_hits(suffix, activations, live, rank, label, num_classes, batch_size)
    return hits.view(2, -1).float() / activations.shape[0]


def _activity(activations: Tensor) -> Tensor:
    """``[n, M]``: each unit's L1 activation per sample (summed over a map's positions)."""
    num, units = activations.shape[:2]
    return activations.abs().reshape(num, units, -1).sum(2)


def _ranks(score: Tensor) -> Tensor:
    """``[2, M]``: each unit's position when removing the most (0) or least (1) active first."""
    orders = [score.argsort(descending=True, stable=True), score.argsort(stable=True)]
    return torch.stack(orders).argsort(1)


def _class_hits(
    suffix: Suffix,
    activations: Tensor,
    live: tuple[Tensor, ...],
    rank: Tensor,
    label: int,
    num_classes: int,
    batch_size: int | None,
) -> Tensor:
    """``[2 (M+1)]``: correct predictions of class ``label``'s rows at every ablation level."""
    num, units = activations.shape[:2]
    levels = units + 1
    # A chunk is a block of ablation steps times a block of samples: the masked copies are
    # a broadcast of the activations against the steps' masks, with no gather. Multiplying
    # by a 0/1 mask is several times faster than `torch.where`, and the same unless a
    # removed unit holds an inf or NaN (which a product would keep as NaN).
    finite = bool(activations.isfinite().all())
    rows = 2 * levels * num if batch_size is None else batch_size
    hits = torch.zeros(2 * levels, dtype=torch.float64, device=activations.device)
    for steps in chunks(2 * levels, max(1, rows // num)):
        step = torch.arange(steps.start, steps.stop, device=activations.device)
        removed = rank[step // levels] < (step % levels)[:, None]
        removed = removed.view(len(step), 1, units, *(1,) * (activations.ndim - 2))
        keep = (~removed).to(activations.dtype)
        for part in chunks(num, min(num, rows)):
            if finite:
                masked = (activations[part] * keep).flatten(0, 1)
            else:
                masked = torch.where(removed, 0.0, activations[part]).flatten(0, 1)
            values = tuple(v[part].repeat(len(step), *(1,) * (v.ndim - 1)) for v in live)
            logits = as_outputs(suffix(masked, values))
            if logits.shape[1] != num_classes:
                check_classifier(logits.shape[1], "unit_ablation")
                raise ValueError(
                    f"The model has {logits.shape[1]} outputs but num_classes={num_classes}."
                )
            # A NaN row has no prediction: its level's accuracy is undefined, not a guess.
            correct = (logits.argmax(1) == label).double()
            correct.masked_fill_(logits.isnan().any(1), math.nan)
            hits[steps] += correct.view(len(step), -1).sum(1)
    return hits
