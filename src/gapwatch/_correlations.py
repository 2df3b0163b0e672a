"""Which metrics are proxies, and how each moves with the held-out loss over a run.

The papers judge a proxy by how it moves with the held-out loss (Forouzesh et al. report
Pearson's rho between S and the test loss across networks, their Table I), not by its
value at one step; no paper equation is computed here. On a probe callback's ``history``
(one dict of metrics per evaluation) this module picks out the proxies, their
standard-error band edges, the running Kendall tau-b of each with the held-out loss
(:func:`correlations`, logged like any metric so it can be monitored) and the final
:func:`summary_table`. It imports neither matplotlib nor Lightning: the callbacks,
:mod:`gapwatch.tensorboard` and ``gapwatch report`` share it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import kendalltau

History = Sequence[Mapping[str, float]]

HELDOUT_LOSS = "test_loss"
GAP_NAMES = ("train_acc", "test_acc", "gap")
_NOT_PROXIES = frozenset({"step", HELDOUT_LOSS, "train_loss", *GAP_NAMES})
CORR = "corr/"
#: Standard errors (``<name>_se``) and the band edges drawn from them (``bands/<name>/...``).
SE, BANDS = "_se", "bands/"


def proxy_names(metrics: Mapping[str, object]) -> list[str]:
    """The proxies among ``metrics``: not losses, accuracies, gap, correlations or errors."""
    return [
        n
        for n in metrics
        if n not in _NOT_PROXIES and not n.startswith((CORR, BANDS)) and not n.endswith(SE)
    ]


def band_edges(metrics: Mapping[str, float]) -> dict[str, float]:
    """``bands/<name>/lower`` and ``/upper``: each value minus and plus its standard error.

    TensorBoard's margin charts draw a band between two logged tags; names whose value or
    error is not finite get none.
    """
    edges = {}
    for name, value in metrics.items():
        error = metrics.get(name + SE)
        if error is not None and math.isfinite(value) and math.isfinite(error):
            edges[f"{BANDS}{name}/lower"] = value - error
            edges[f"{BANDS}{name}/upper"] = value + error
    return edges


def _pairs(history: History, proxy: str) -> np.ndarray:
    """``[N, 3]`` rows of (step, proxy, held-out loss) where both values are finite."""
    rows = [
        (h["step"], h[proxy], h[HELDOUT_LOSS]) for h in history if proxy in h and HELDOUT_LOSS in h
    ]
    table = np.array(rows, dtype=np.float64).reshape(-1, 3)
    return table[np.isfinite(table[:, 1:]).all(1)]


def kendall(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b (ties corrected); NaN, without a warning, when either side is constant.

    scipy's O(n log n) version: a pairwise one grows quadratically with a long history.
    """
    return float(kendalltau(x, y).statistic)


def correlations(history: History) -> dict[str, float]:
    """Kendall's tau-b between each proxy and the held-out loss over the evaluations so far.

    Args:
        history: One mapping of metric values per evaluation, oldest first, each with a
            ``"step"``.

    Returns:
        ``{"corr/<proxy>": tau}`` for every proxy of the latest evaluation with at least two
        evaluations where it and the held-out loss are finite and neither is constant
        (tau is undefined otherwise); empty without a held-out loss.
    """
    if not history or HELDOUT_LOSS not in history[-1]:
        return {}
    result = {}
    for proxy in proxy_names(history[-1]):
        pairs = _pairs(history, proxy)[:, 1:]
        if len(pairs) >= 2:
            tau = kendall(pairs[:, 0], pairs[:, 1])
            if math.isfinite(tau):
                result[CORR + proxy] = tau
    return result


def summary_table(history: History) -> str:
    """A few lines: each proxy's final value and its correlation with the held-out loss.

    Args:
        history: One mapping of metric values per evaluation, oldest first.

    Returns:
        The table, headed by the step, the number of evaluations and the held-out loss.
    """
    final = history[-1]
    loss = f", {HELDOUT_LOSS} {final[HELDOUT_LOSS]:.4g}" if HELDOUT_LOSS in final else ""
    lines = [
        f"gapwatch after {len(history)} evaluations (step {int(final['step'])}{loss}):",
        f"  {'proxy':<26}{'final':>11}{'kendall tau':>13}",
    ]
    for proxy in proxy_names(final):
        tau = final.get(CORR + proxy)
        lines.append(
            f"  {proxy:<26}{final[proxy]:>11.4g}{'-' if tau is None else f'{tau:+.3f}':>13}"
        )
    return "\n".join(lines)
