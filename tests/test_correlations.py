"""gapwatch._correlations: which metrics are proxies, running Kendall tau, summary table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gapwatch._correlations import correlations, proxy_names, summary_table

LOSSES = [2.3, 1.1, 0.7, 0.5, 0.45, 0.48]
SENSITIVITY = [1e-5, 3e-4, 2e-3, 4e-3, 6e-3, 5e-3]
ZETA = [0.9, 0.8, 0.8, 0.7, 0.75, 0.6]  # a tie, and not monotone
LOG_NORM = [-0.5, 1.0, 2.0, 3.0, 3.5, 4.0]  # crosses zero: no log axis


def _history(n: int = len(LOSSES)) -> list[dict[str, float]]:
    return [
        {
            "step": float(20 * i),
            "test_loss": LOSSES[i],
            "test_acc": 0.5,
            "train_loss": 0.1,
            "train_acc": 0.9,
            "gap": 0.4,
            "sensitivity": SENSITIVITY[i],
            "ablation_zeta": ZETA[i],
            "log_norm_product": LOG_NORM[i],
        }
        for i in range(n)
    ]


def _tau_b(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b by counting pairs."""
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i):
            dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            concordant += dx * dy > 0
            discordant += dx * dy < 0
            ties_x += dx == 0 and dy != 0
            ties_y += dy == 0 and dx != 0
    pairs_x, pairs_y = concordant + discordant + ties_y, concordant + discordant + ties_x
    return (concordant - discordant) / math.sqrt(pairs_x * pairs_y)


def test_proxies_are_all_but_losses_accuracies_gap_and_correlations():
    metrics = {**_history(1)[0], "corr/sensitivity": 0.5, "bias_fraction": 0.3}
    assert proxy_names(metrics) == [
        "sensitivity",
        "ablation_zeta",
        "log_norm_product",
        "bias_fraction",
    ]


@pytest.mark.parametrize("n", [2, 3, 6])
def test_correlations_are_kendall_tau_b_over_the_evaluations_so_far(n):
    history = _history(n)
    result = correlations(history)
    assert set(result) == {"corr/sensitivity", "corr/ablation_zeta", "corr/log_norm_product"}
    for proxy, values in [("sensitivity", SENSITIVITY), ("ablation_zeta", ZETA)]:
        assert result[f"corr/{proxy}"] == pytest.approx(_tau_b(values[:n], LOSSES[:n]))
    assert result["corr/sensitivity"] == pytest.approx(-1.0)  # every pair discordant


def test_correlations_need_two_finite_evaluations_a_heldout_loss_and_no_constant_series():
    assert correlations(_history(1)) == {}
    assert (
        correlations([{k: v for k, v in h.items() if k != "test_loss"} for h in _history()]) == {}
    )
    history = _history(4)
    history[1]["sensitivity"] = math.nan  # left out, not poisoning every later tau
    for h in history:
        h["ablation_zeta"] = 0.5  # constant: tau undefined, nothing logged
    result = correlations(history)
    assert "corr/ablation_zeta" not in result
    kept = [0, 2, 3]
    expected = _tau_b([SENSITIVITY[i] for i in kept], [LOSSES[i] for i in kept])
    assert result["corr/sensitivity"] == pytest.approx(expected)


def test_summary_table_lists_final_values_and_correlations():
    history = _history()
    history[-1] |= correlations(history)
    del history[-1]["corr/log_norm_product"]
    lines = summary_table(history).splitlines()
    assert lines[0] == "gapwatch after 6 evaluations (step 100, test_loss 0.48):"
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert rows["sensitivity"] == ["0.005", f"{history[-1]['corr/sensitivity']:+.3f}"]
    assert rows["log_norm_product"] == ["4", "-"]
    assert list(rows) == ["sensitivity", "ablation_zeta", "log_norm_product"]


def test_standard_errors_and_their_bands_are_not_proxies():
    metrics = {**_history(1)[0], "sensitivity_se": 1e-6, "bands/sensitivity/lower": 0.0}
    assert "sensitivity_se" not in proxy_names(metrics)
    assert not [n for n in proxy_names(metrics) if n.startswith("bands/")]
    assert not [n for n in correlations([*_history(), metrics]) if n.endswith("_se")]
