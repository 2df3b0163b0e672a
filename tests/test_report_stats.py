"""The ranking statistics against hand computation and an independent brute force."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from gapwatch.report import Report, _rank, write_report
from gapwatch.report_stats import (
    granulated,
    kendall_pairs,
    one_axis_groups,
    rankings,
    varying_axes,
    worst_sign_error,
)

# A 2 x 3 grid: axis A in {1, 2}, axis B in {1, 2, 3}; runs r4 and r5 tie on the gap.
SETTINGS = [{"A": a, "B": b} for a in (1, 2) for b in (1, 2, 3)]
MU = np.array([0.1, 0.4, 0.3, 0.2, 0.6, 0.5])
GAP = np.array([0.2, 0.3, 0.5, 0.1, 0.4, 0.4])
LOSS = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])


def test_kendall_over_all_pairs_by_hand() -> None:
    # Of the 15 pairs, 10 agree, 4 disagree ((0,3), (1,2), (2,4), (2,5)), 1 ties on the gap.
    assert kendall_pairs(MU, GAP) == (pytest.approx(6 / 15), 15)
    assert kendall_pairs(MU, LOSS)[0] == pytest.approx(scipy.stats.kendalltau(MU, LOSS)[0])
    assert math.isnan(kendall_pairs(MU[:1], GAP[:1])[0])


def test_granulated_psi_by_hand() -> None:
    groups = one_axis_groups(SETTINGS, ["A", "B"])
    assert [(label, rows) for label, rows in groups["A"]] == [
        ("B=1", [0, 3]), ("B=2", [1, 4]), ("B=3", [2, 5])
    ]  # fmt: skip
    assert [rows for _, rows in groups["B"]] == [[0, 1, 2], [3, 4, 5]]
    psi, per_axis, pairs = granulated(MU, GAP, groups)
    # A: taus -1, +1, -1. B: at A=1 (+1 +1 -1)/3, at A=2 (+1 +1 0)/3.
    assert per_axis == {"A": pytest.approx(-1 / 3), "B": pytest.approx(1 / 2)}
    assert psi == pytest.approx(1 / 12)
    assert pairs == 9


def test_worst_sign_error_by_hand() -> None:
    groups = one_axis_groups(SETTINGS, ["A", "B"])
    # Errors: A at B=1: 1, B=2: 0, B=3: 1; B at A=1: 1/3, at A=2: 0 over 2 pairs (tie out).
    assert worst_sign_error(MU, GAP, groups) == (
        1.0, "A varies (B=1; 1 pair)", 8, pytest.approx(7 / 15)
    )  # fmt: skip
    # Negated: A: 0, 1, 0; B at A=1: 2/3, at A=2: 1 over two pairs.
    assert worst_sign_error(-MU, GAP, groups) == (
        1.0, "A varies (B=2; 1 pair)", 8, pytest.approx(8 / 15)
    )  # fmt: skip
    tie = one_axis_groups([{"A": 1}, {"A": 2}], ["A"])
    assert worst_sign_error(np.array([1.0, 1.0]), np.array([0.1, 0.2]), tie)[0] == 0.5


def brute_force(settings, axes, mu, gap):
    """Psi, the worst and the mean group sign error, from every pair of runs that differ
    in one axis only."""
    taus: dict[str, dict[tuple, list[float]]] = {axis: {} for axis in axes}
    errors: dict[tuple, list[float]] = {}
    for i, j in itertools.combinations(range(len(mu)), 2):
        differing = [a for a in axes if settings[i][a] != settings[j][a]]
        if len(differing) != 1:
            continue
        axis = differing[0]
        key = tuple(settings[i][a] for a in axes if a != axis)
        agree = np.sign(mu[i] - mu[j]) * np.sign(gap[i] - gap[j])
        taus[axis].setdefault(key, []).append(agree)
        if gap[i] != gap[j]:
            errors.setdefault((axis, key), []).append((1 - agree) / 2)
    psi_i = [np.mean([np.mean(v) for v in groups.values()]) for groups in taus.values() if groups]
    group_errors = [np.mean(v) for v in errors.values()]
    return np.mean(psi_i), max(group_errors), np.mean(group_errors)


def test_rankings_match_a_brute_force_on_a_random_sweep() -> None:
    generator = np.random.default_rng(0)
    settings = [
        {"lr": lr, "width": w, "noise": n}
        for lr, w, n in itertools.product((0.01, 0.1), (8, 16, 32), (0.0, 0.2))
    ]
    runs = [
        {"run": f"r{i}", "gap": g, "test_loss": loss, "proxy": p}
        for i, (g, loss, p) in enumerate(generator.normal(size=(len(settings), 3)))
    ]
    del runs[5]["proxy"]  # a missing value leaves that run out of this proxy's numbers
    axes = varying_axes(settings)
    assert axes == ["lr", "noise", "width"]
    (row,) = rankings(runs, settings, axes, ["proxy"])
    keep = [i for i in range(len(runs)) if "proxy" in runs[i]]
    mu = np.array([runs[i]["proxy"] for i in keep])
    gap = np.array([runs[i]["gap"] for i in keep])
    psi, worst, typical = brute_force([settings[i] for i in keep], axes, mu, gap)
    assert row["runs"] == 11
    assert row["psi"] == pytest.approx(psi, abs=1e-12)
    assert row["worst_sign_error"] == pytest.approx(worst, abs=1e-12)
    assert row["mean_sign_error"] == pytest.approx(typical, abs=1e-12)
    # Without ties, Jiang's tau is scipy's tau-b.
    assert row["tau_gap"] == pytest.approx(scipy.stats.kendalltau(mu, gap)[0], abs=1e-12)
    assert row["pairs_gap"] == 55
    assert row["psi_axes"] == 3


def test_runs_that_cannot_be_ranked_are_listed(tmp_path: Path) -> None:
    runs = [
        {"run": "a", "gap": 0.1, "p": 1.0},
        {"run": "b", "gap": 0.2, "p": 2.0},
        {"run": "c", "gap": 0.3, "p": 1.5},
        {"run": "no_heldout", "train_loss": 0.1, "p": 3.0},
        {"run": "no_hparams", "gap": 0.4, "p": 4.0},
        {"run": "no_width", "gap": 0.5, "p": 5.0},
    ]
    hparams = [{"width": 8, "seed": 0}, {"width": 16, "seed": 0}, {"width": 32}, {"width": 8},
               {}, {"depth": 2}]  # fmt: skip
    report = Report(tmp_path, "gapwatch/", ["gap", "p"], runs, [], None, hparams)
    _rank(report, ["p"], None)
    assert report.axes == ["width"]  # seed: one value where saved; depth: one run
    assert report.excluded == {
        "no_heldout": "no gap: no held-out data (or no accuracy)",
        "no_hparams": "no hyperparameters (no hparams.yaml, no hparams entry)",
        "no_width": "lacks width",
    }
    assert report.rankings[0]["runs"] == 3
    assert report.rankings[0]["psi"] == pytest.approx(1 / 3)  # pairs: +1, +1, -1


def test_non_finite_final_values_are_listed_and_left_out(tmp_path: Path) -> None:
    runs = [{"run": r, "gap": g, "p": p} for r, g, p in
            [("a", 0.1, 1.0), ("b", 0.2, math.nan), ("c", 0.3, 3.0), ("d", 0.4, 2.0)]]  # fmt: skip
    hparams = [{"width": w} for w in (8, 16, 32, 64)]
    report = Report(tmp_path, "gapwatch/", ["gap", "p"], runs, [], None, hparams)
    _rank(report, ["p"], None)
    assert report.nonfinite == {"b": ["p"]}
    assert report.rankings[0]["runs"] == 3
    assert report.rankings[0]["psi"] == pytest.approx(1 / 3)  # a-c +1, a-d +1, c-d -1
    markdown = write_report(report, tmp_path / "out")[0].read_text()
    assert "## Runs whose final values are not finite" in markdown
    assert "- `b`: p" in markdown
