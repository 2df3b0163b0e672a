"""How well a proxy ranks a sweep's runs: the statistics of Jiang et al. and Dziugaite et al.

Every statistic compares a proxy ``mu`` with a target ``g`` (the generalization gap, or the
held-out loss) over pairs of runs:

- Kendall's tau as Jiang et al. (2020, "Fantastic Generalization Measures", section 4)
  define it: the mean over all pairs of ``sign(mu_i - mu_j) * sign(g_i - g_j)``; a tie on
  either side counts 0 (tau-a; the correlation table of the report gives tau-b).
- The granulated coefficient Psi (ibid.): for each hyperparameter axis ``i``, ``psi_i`` is
  the mean, over the settings of all other axes, of tau over the runs that share those
  settings and differ in axis ``i`` only; Psi is the mean of ``psi_i`` over the axes that
  have such a group. Groups with a single run have no pair and are left out.
- The worst-case sign error of Dziugaite et al. (2020, "In Search of Robust Measures of
  Generalization"): within a one-axis group, each pair of runs whose gaps differ scores
  ``(1 - sign(d mu) * sign(d g)) / 2`` (0 when the proxy orders the two runs as their
  gaps, 1 when it orders them the other way, 1/2 on a tie of the proxy), the group's sign
  error is the mean over its pairs, and the worst case is the largest over all groups.
  The proxy is oriented so that a larger value predicts a larger gap: proxies in
  :data:`LARGER_GENERALIZES_BETTER` (a larger margin, a larger kappa) are negated first.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np

#: Proxies whose larger values go with *smaller* gaps, so the sign error negates them: a
#: larger margin (Jiang et al. 2020) and a larger kappa (Zhao et al.). The others, as
#: their papers have it, grow with the gap.
LARGER_GENERALIZES_BETTER = frozenset({"margin_q10", "ablation_kappa"})

RANKING_FIELDS = ["proxy", "runs", "tau_gap", "pairs_gap", "tau_test_loss", "pairs_test_loss",
                  "psi", "psi_axes", "psi_pairs", "worst_sign_error", "worst_group",
                  "mean_sign_error", "sign_error_pairs"]  # fmt: skip


def kendall_pairs(mu: np.ndarray, g: np.ndarray) -> tuple[float, int]:
    """``(tau, pairs)``: Jiang et al.'s tau over all pairs, and how many pairs there are.

    NaN with no pair. ``mu`` and ``g`` must be finite.
    """
    n = len(mu)
    pairs = n * (n - 1) // 2
    if pairs == 0:
        return math.nan, 0
    upper = np.triu_indices(n, 1)
    agree = np.sign(mu[:, None] - mu[None, :]) * np.sign(g[:, None] - g[None, :])
    return float(agree[upper].mean()), pairs


def one_axis_groups(
    settings: Sequence[Mapping[str, Hashable]], axes: Sequence[str]
) -> dict[str, list[tuple[str, list[int]]]]:
    """For each axis, the groups of runs (indices) that share every other axis's value.

    Args:
        settings: Each run's value of every axis.
        axes: The axes.

    Returns:
        ``{axis: [(label of the fixed values, run indices), ...]}``, groups of two or more
        runs only, in the order their first run appears.
    """
    found: dict[str, list[tuple[str, list[int]]]] = {}
    for axis in axes:
        others = [a for a in axes if a != axis]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, row in enumerate(settings):
            groups[tuple(row[a] for a in others)].append(index)
        found[axis] = [
            (", ".join(f"{a}={v}" for a, v in zip(others, key, strict=True)) or "all", members)
            for key, members in groups.items()
            if len(members) >= 2
        ]
    return found


def granulated(
    mu: np.ndarray, g: np.ndarray, groups: dict[str, list[tuple[str, list[int]]]]
) -> tuple[float, dict[str, float], int]:
    """``(Psi, {axis: psi_i}, pairs)`` over the one-axis groups (see the module docstring)."""
    per_axis, pairs = {}, 0
    for axis, members in groups.items():
        taus = []
        for _, rows in members:
            tau, count = kendall_pairs(mu[rows], g[rows])
            taus.append(tau)
            pairs += count
        if taus:
            per_axis[axis] = float(np.mean(taus))
    psi = float(np.mean(list(per_axis.values()))) if per_axis else math.nan
    return psi, per_axis, pairs


def worst_sign_error(
    mu: np.ndarray, g: np.ndarray, groups: dict[str, list[tuple[str, list[int]]]]
) -> tuple[float, str, int, float]:
    """``(worst group's sign error, its label, pairs over all groups, mean over groups)``.

    Pairs with equal gaps are left out (their order is no prediction), and so is a group
    with no other pair. The mean over groups says how typical the worst case is: with
    one pair per group (two values per axis, one seed) the worst case is 0 or 1.

    ``mu`` must already be oriented (larger predicts a larger gap).
    """
    worst, label, total, means = math.nan, "", 0, []
    for axis, members in groups.items():
        for fixed, rows in members:
            errors = [
                (1.0 - np.sign(mu[i] - mu[j]) * np.sign(g[i] - g[j])) / 2
                for i, j in combinations(rows, 2)
                if g[i] != g[j]
            ]
            total += len(errors)
            means += [float(np.mean(errors))] if errors else []
            if errors and not float(np.mean(errors)) <= worst:  # NaN at first
                worst = float(np.mean(errors))
                pairs = f"{len(errors)} pair{'s' if len(errors) > 1 else ''}"
                label = f"{axis} varies ({fixed}; {pairs})"
    return worst, label, total, float(np.mean(means)) if means else math.nan


def rankings(
    runs: Sequence[dict[str, Any]],
    settings: Sequence[Mapping[str, Hashable]],
    axes: Sequence[str],
    proxies: Sequence[str],
) -> list[dict[str, Any]]:
    """Every statistic for every proxy; each uses the runs where the proxy and target are finite.

    Args:
        runs: Final metrics per run (``{"run": name, metric: value}``).
        settings: The runs' values of ``axes``, in the same order.
        axes: The hyperparameter axes for Psi and the sign error.
        proxies: The metric names to score.

    Returns:
        One dict per proxy with the keys :data:`RANKING_FIELDS`, and ``psi_<axis>`` per axis.
    """
    gap_all, loss_all = _column(runs, "gap"), _column(runs, "test_loss")
    table = []
    for proxy in proxies:
        mu_all = _column(runs, proxy)
        row: dict[str, Any] = {"proxy": proxy}
        for target, target_all in (("gap", gap_all), ("test_loss", loss_all)):
            keep = np.isfinite(mu_all) & np.isfinite(target_all)
            tau, pairs = kendall_pairs(mu_all[keep], target_all[keep])
            row[f"tau_{target}"], row[f"pairs_{target}"] = tau, pairs
        kept = np.flatnonzero(np.isfinite(mu_all) & np.isfinite(gap_all))
        mu, gap = mu_all[kept], gap_all[kept]
        groups = one_axis_groups([settings[int(i)] for i in kept], axes)
        row["runs"] = len(kept)
        row["psi"], per_axis, row["psi_pairs"] = granulated(mu, gap, groups)
        row["psi_axes"] = len(per_axis)
        row |= {f"psi_{axis}": per_axis.get(axis, math.nan) for axis in axes}
        oriented = -mu if proxy in LARGER_GENERALIZES_BETTER else mu
        error, group, pairs, typical = worst_sign_error(oriented, gap, groups)
        row |= {"worst_sign_error": error, "worst_group": group, "sign_error_pairs": pairs,
                "mean_sign_error": typical}  # fmt: skip
        table.append(row)
    return table


def varying_axes(settings: Sequence[Mapping[str, Hashable]]) -> list[str]:
    """The hyperparameters that take more than one value across the runs that have them.

    A hyperparameter only some runs saved, with one value (a callback's settings, say), is
    no axis; the runs that lack an axis are for the caller to leave out.
    """
    names = sorted({name for row in settings for name in row})
    return [name for name in names if len({row[name] for row in settings if name in row}) > 1]


def _column(runs: Sequence[dict[str, Any]], name: str) -> np.ndarray:
    return np.array([row.get(name, math.nan) for row in runs], dtype=np.float64)
