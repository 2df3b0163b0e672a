"""Standard errors of the logged means, from additive sums over the probe samples.

Every value gapwatch logs as a mean over probe samples also gets ``<name>_se``, the
standard error of that mean across draws of the probe from the data. Each is a closed form
of additive sums (of the per-sample values and their squares, or of per-sample products),
so the data-parallel value is exactly the single-process one: the sums are reduced like
every other statistic. No bootstrap is needed for any logged value:

* a mean ``x̄`` over ``n`` samples: ``se = s / sqrt(n)`` with ``s²`` the sample variance
  (Bessel-corrected), from ``Σ(x - c)`` and ``Σ(x - c)²`` for a fixed centre ``c``
  (the normalized losses sit within 1e-4 of ``ln K``: centring there keeps float64 exact);
* a difference of means of two independent probes (the gap): ``sqrt(se_a² + se_b²)``;
* the output sensitivity ``S``, the population variance of all entries of all samples
  (Forouzesh et al., eq. 2): the entries of one sample are not independent (its draws and
  outputs share the input), so the sample is the unit. Linearizing ``S = B/C - (A/C)²`` in
  the per-sample totals ``a_i = Σx``, ``b_i = Σx²``, ``c_i`` (entries) gives the
  influence ``u_i = Σ_entries[(x - m)² - S]`` and the cluster-robust (sandwich) variance
  ``n/(n-1) Σ u_i² / C²``. ``Σ u_i²`` expands into sums of ``a², b², c², ab, ac, bc``
  over samples, which are additive.

Values that are not means over samples get no ``_se``: ``log_norm_product`` (a function
of the weights), the ablation's ``zeta``/``kappa`` (means over classes of curves that
share all samples), and the derived ``predicted_test_loss``, ``predicted_test_loss_bias``
and ``bias_fraction`` (ratios of correlated estimates; their delta-method errors would need
the joint sums of S, the input second moment and the train error, left for later).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gapwatch.callbacks._proxy import Stats

SE_SUFFIX = "_se"


def mean_se(stats: Stats, key: str, center: float = 0.0) -> float:
    """The standard error of ``mean(stats, key)`` from its ``_sum``, ``_sumsq``, ``_count``.

    Args:
        stats: Summed statistics holding ``key + '_sum'`` (of ``x``), ``key + '_sumsq'``
            (of ``(x - center)²``) and ``key + '_count'``.
        key: The quantity.
        center: The centre the squares were taken about (see ``sum_and_count``).

    Returns:
        ``s / sqrt(n)``; NaN with fewer than two samples.
    """
    n = float(stats[f"{key}_count"])
    if n < 2:
        return math.nan
    offset = float(stats[f"{key}_sum"]) / n - center
    variance = (float(stats[f"{key}_sumsq"]) / n - offset * offset) * n / (n - 1)
    return math.sqrt(max(variance, 0.0) / n)


def difference_se(first: float, second: float) -> float:
    """The standard error of a difference of means of two independent probes."""
    return math.sqrt(first * first + second * second)


def cluster_sums(key: str, values: Tensor) -> Stats:
    """Additive per-sample sums of ``[n, ...]`` values, for :func:`variance_and_se`.

    Row ``i`` (all entries of ``values[i]``) is one sample.
    """
    values = values.detach().double().flatten(1)
    a = values.sum(1)
    b = values.square().sum(1)
    c = torch.full_like(a, values.shape[1])
    products = {"a2": a * a, "b2": b * b, "c2": c * c, "ab": a * b, "ac": a * c, "bc": b * c}
    stats = {f"{key}_{name}": part.sum() for name, part in products.items()}
    stats |= {f"{key}_samples": a.new_tensor(values.shape[0])}
    return stats


def variance_and_se(stats: Stats, key: str) -> tuple[float, float]:
    """The population variance of all entries and its cluster-robust standard error.

    Args:
        stats: Summed :func:`cluster_sums` plus ``key + '_sum'``, ``_sumsq`` (about 0) and
            ``_count`` of every entry (``sum_and_count``).
        key: The quantity.

    Returns:
        ``(S, se)``; se is NaN with fewer than two samples.
    """
    entries = float(stats[f"{key}_count"])
    m1 = float(stats[f"{key}_sum"]) / entries
    variance = max(float(stats[f"{key}_sumsq"]) / entries - m1 * m1, 0.0)
    n = float(stats[f"{key}_samples"])
    if n < 2:
        return variance, math.nan
    k = m1 * m1 - variance

    def s(name: str) -> float:
        return float(stats[f"{key}_{name}"])

    influence = (
        s("b2") + 4 * m1 * m1 * s("a2") + k * k * s("c2")
        - 4 * m1 * s("ab") + 2 * k * s("bc") - 4 * m1 * k * s("ac")
    )  # fmt: skip
    return variance, math.sqrt(max(influence, 0.0) * n / (n - 1)) / entries


def with_se(metrics: dict[str, float], stats: Stats, center: float = 0.0) -> dict[str, float]:
    """``metrics`` plus ``<name>_se`` for each name whose ``_sumsq`` is in ``stats``."""
    found = dict(metrics)
    for name in metrics:
        if f"{name}_sumsq" in stats:
            found[name + SE_SUFFIX] = mean_se(stats, name, center)
    return found
