"""Cross-run report: which proxy, read at the end of training, ranks the runs of a sweep.

Every run of a sweep (one directory of TensorBoard event files) contributes the final
value of each gapwatch scalar. Across runs, each proxy is correlated with the held-out
loss and with the generalization gap, the model-selection use of the papers, and Zhao
et al.'s linear gap model (eq. 7) is fitted on the ablation sparsities ζ and κ with its
leave-one-out error. With each run's hyperparameters (:mod:`gapwatch.report_runs`), every
proxy is also scored as the field scores generalization measures: Kendall's tau with the
gap and the held-out loss, the granulated coefficient Psi over the axes that vary, and the
worst-case sign error over one-axis groups (:mod:`gapwatch.report_stats`).
:func:`build_report` returns these as plain lists, dicts and numpy arrays;
:func:`write_report` turns them into ``report.md``, CSV tables and PNG plots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gapwatch._correlations import BANDS, CORR, HELDOUT_LOSS, SE, kendall, proxy_names
from gapwatch.functional.gap_estimator import GapEstimator
from gapwatch.report_runs import ReportError, Scalar, final_scalars, find_runs, read_run
from gapwatch.report_stats import RANKING_FIELDS, rankings, varying_axes
from gapwatch.report_stopping import audit_run, cadence

__all__ = ["CORRELATION_FIELDS", "RANKING_FIELDS", "Report", "ReportError", "build_report",
           "correlations", "final_scalars", "find_runs", "fit_gap", "kendall", "pearson",
           "summarize", "write_report"]  # fmt: skip

TARGETS = (HELDOUT_LOSS, "gap")
# Two points always correlate perfectly; three is the least that says anything.
MIN_RUNS = 3
MIN_GAP_FIT_RUNS = 4  # leave-one-out needs three networks left for three coefficients
CORRELATION_FIELDS = [
    "proxy",
    *(f"{stat}_{target}" for target in TARGETS for stat in ("n", "pearson", "kendall")),
]
NO_GAP_FIT = (
    f"No gap fit: it needs ablation_zeta, ablation_kappa and gap in at least "
    f"{MIN_GAP_FIT_RUNS} runs."
)


@dataclass
class Report:
    """Final metrics of every run and the comparisons across runs.

    Attributes:
        logdir: The directory that was searched for runs.
        prefix: Tag prefix of the gapwatch scalars; metric names are given without it.
        metrics: Every metric found in some run, losses, gap and accuracies first.
        runs: One dict per run: ``{"run": path relative to logdir, metric: final value}``;
            a metric the run did not log is absent from its dict.
        correlations: One dict per proxy: ``{"proxy": name}`` and, for each target in
            :data:`TARGETS`, ``n_<target>`` (runs with both values finite),
            ``pearson_<target>`` and ``kendall_<target>`` (NaN below :data:`MIN_RUNS`
            runs or when either side is constant).
        gap_fit: The output of :func:`fit_gap`, or ``None`` when too few runs have ζ, κ
            and the gap.
        hparams: Each run's hyperparameters, in the order of ``runs`` (``{}``: none saved).
        axes: The hyperparameters the rankings group runs by: those that vary across the
            ranked runs, or the ones asked for.
        rankings: One dict per proxy, the keys :data:`RANKING_FIELDS` and ``psi_<axis>``
            (see :func:`gapwatch.report_stats.rankings`), over the ranked runs.
        excluded: ``{run: reason}`` for the runs left out of the rankings.
        stopping: The stopping audit: for each run with held-out data and each of
            :data:`gapwatch.report_stopping.LABEL_FREE_RULES` the monitor logged,
            ``{"run": ..., **row}`` with a row of
            :func:`gapwatch.report_stopping.audit_run` (where the rule would have stopped,
            the held-out loss there and the regret against the run's best evaluation).
    """

    logdir: Path
    prefix: str
    metrics: list[str]
    runs: list[dict[str, Any]]
    correlations: list[dict[str, Any]]
    gap_fit: dict[str, Any] | None
    hparams: list[dict[str, Scalar]] = field(default_factory=list)
    axes: list[str] = field(default_factory=list)
    rankings: list[dict[str, Any]] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)
    stopping: list[dict[str, Any]] = field(default_factory=list)

    @property
    def missing(self) -> dict[str, list[str]]:
        """``{run: metrics some other run logged and this one did not}`` for incomplete runs."""
        gaps = {row["run"]: [m for m in self.metrics if m not in row] for row in self.runs}
        return {run: names for run, names in gaps.items() if names}

    @property
    def nonfinite(self) -> dict[str, list[str]]:
        """``{run: metrics whose final value is NaN or infinite}``; no statistic uses them."""
        bad = {
            row["run"]: [m for m in self.metrics if m in row and not math.isfinite(row[m])]
            for row in self.runs
        }
        return {run: names for run, names in bad.items() if names}


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r; NaN when either side is constant."""
    return _cosine(x - x.mean(), y - y.mean())


def _cosine(u: np.ndarray, v: np.ndarray) -> float:
    norm = math.sqrt(float((u * u).sum() * (v * v).sum()))
    return float((u * v).sum()) / norm if norm > 0 else math.nan


def column(runs: Sequence[dict[str, Any]], name: str) -> np.ndarray:
    """``name`` across runs as float64, NaN where a run lacks it."""
    return np.array([row.get(name, math.nan) for row in runs], dtype=np.float64)


def correlations(runs: Sequence[dict[str, Any]], proxies: Sequence[str]) -> list[dict[str, Any]]:
    """Across-run Pearson and Kendall correlation of each proxy with each of :data:`TARGETS`.

    Args:
        runs: Rows as in :attr:`Report.runs`.
        proxies: Metric names to correlate.

    Returns:
        One dict per proxy with the keys :data:`CORRELATION_FIELDS`, as in
        :attr:`Report.correlations`. Each pair uses the runs where both values are finite.
    """
    table = []
    for proxy in proxies:
        row: dict[str, Any] = {"proxy": proxy}
        for target in TARGETS:
            x, y = column(runs, proxy), column(runs, target)
            keep = np.isfinite(x) & np.isfinite(y)
            x, y = x[keep], y[keep]
            enough = len(x) >= MIN_RUNS
            row[f"n_{target}"] = len(x)
            row[f"pearson_{target}"] = pearson(x, y) if enough else math.nan
            row[f"kendall_{target}"] = kendall(x, y) if enough else math.nan
        table.append(row)
    return table


def fit_gap(runs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Fit ``gap = a * zeta + b * kappa + c`` (Zhao eq. 7) across runs.

    Args:
        runs: Rows as in :attr:`Report.runs`; those with finite ``ablation_zeta``,
            ``ablation_kappa`` and ``gap`` are used.

    Returns:
        ``None`` with fewer than :data:`MIN_GAP_FIT_RUNS` usable runs, else a dict with
        ``runs`` (names), ``zeta``, ``kappa``, ``gap``, ``predicted`` (numpy arrays),
        ``coefficients`` ``(a, b, c)``, ``pearson``, ``ssr`` and ``loo_error`` (mean
        absolute leave-one-out error; NaN, with the reason in ``note``, when leaving a
        run out leaves the fit underdetermined).
    """
    names = ("ablation_zeta", "ablation_kappa", "gap")
    values = np.stack([column(runs, name) for name in names])
    keep = np.isfinite(values).all(0)
    if keep.sum() < MIN_GAP_FIT_RUNS:
        return None
    zeta, kappa, gap = values[:, keep]
    estimator = GapEstimator().fit(zeta, kappa, gap)
    try:
        loo_error, note = GapEstimator.leave_one_out(zeta, kappa, gap), ""
    except ValueError as error:
        loo_error, note = math.nan, str(error)
    return {
        "runs": [row["run"] for row, kept in zip(runs, keep, strict=True) if kept],
        "zeta": zeta,
        "kappa": kappa,
        "gap": gap,
        "predicted": estimator.predict(zeta, kappa).numpy(),
        "coefficients": estimator.coefficients,
        "pearson": estimator.pearson(zeta, kappa, gap),
        "ssr": estimator.ssr(zeta, kappa, gap),
        "loo_error": loo_error,
        "note": note,
    }


def build_report(
    logdir: str | Path, prefix: str = "gapwatch/", axes: Sequence[str] | None = None
) -> Report:
    """Read every run below ``logdir`` and compare their final metrics.

    Args:
        logdir: Root of a sweep's logs; each directory holding event files is a run.
        prefix: Tag prefix of the gapwatch scalars.
        axes: Hyperparameters to group runs by for Psi and the sign error; by default
            every one that varies across the runs that can be ranked.

    Returns:
        The :class:`Report`.

    Raises:
        ReportError: If there are no runs, no run logged a scalar under ``prefix``, or an
            axis asked for is no run's hyperparameter.
    """
    logdir = Path(logdir)
    runs, hparams, stopping = [], [], []
    for run in find_runs(logdir):
        final, found_hparams, settings, curves = read_run(run, prefix)
        name = run.relative_to(logdir).as_posix()
        log_steps = int(settings.get(f"{prefix}log_steps") or 0)
        evaluated = cadence(
            settings.get(f"{prefix}every_n_epochs", 1), settings.get(f"{prefix}every_n_train_steps")
        )
        stopping += [
            {"run": name, **row} for row in audit_run(curves, log_steps, evaluated=evaluated)
        ]
        # Within-run correlations (corr/<proxy>) describe training curves, not end points;
        # standard errors and their bands describe one run's probe, not the sweep.
        final = {
            n: v for n, v in final.items() if not n.startswith((CORR, BANDS)) and not n.endswith(SE)
        }
        runs.append({"run": name, **final})
        hparams.append(found_hparams)
    found = {name for row in runs for name in row} - {"run"}
    if not found:
        raise ReportError(
            f"none of the {len(runs)} runs below {str(logdir)!r} logged a scalar starting "
            f"with {prefix!r}; pass the prefix the callbacks used with --prefix."
        )
    first = [name for name in (*TARGETS, "test_acc", "train_acc", "train_loss") if name in found]
    metrics = first + sorted(found - set(first))
    # Standard errors (`<name>_se`) describe a proxy's value, they are not proxies.
    proxies = [n for n in proxy_names(dict.fromkeys(metrics)) if not n.endswith("_se")]
    table = correlations(runs, proxies)
    report = Report(logdir, prefix, metrics, runs, table, fit_gap(runs), hparams)
    report.stopping = stopping
    _rank(report, proxies, axes)
    return report


def _rank(report: Report, proxies: Sequence[str], axes: Sequence[str] | None) -> None:
    """Fill ``axes``, ``rankings`` and ``excluded``: which runs can be ranked, and how."""
    known = {name for row in report.hparams for name in row}
    missing_axes = sorted(set(axes or ()) - known)
    if missing_axes:
        raise ReportError(
            f"no run has the hyperparameter(s) {', '.join(missing_axes)}; the runs have "
            f"{', '.join(sorted(known)) or 'none'}. Pass some of those with --axes."
        )
    kept = []
    for index, (row, params) in enumerate(zip(report.runs, report.hparams, strict=True)):
        if not math.isfinite(row.get("gap", math.nan)):
            report.excluded[row["run"]] = "no gap: no held-out data (or no accuracy)"
        elif not params:
            report.excluded[row["run"]] = "no hyperparameters (no hparams.yaml, no hparams entry)"
        else:
            kept.append(index)
    settings = [report.hparams[i] for i in kept]
    report.axes = list(axes) if axes else varying_axes(settings)
    for index, params in zip(kept, settings, strict=True):
        lacking = [axis for axis in report.axes if axis not in params]
        if lacking:
            report.excluded[report.runs[index]["run"]] = f"lacks {', '.join(lacking)}"
    kept = [i for i in kept if report.runs[i]["run"] not in report.excluded]
    report.rankings = rankings(
        [report.runs[i] for i in kept],
        [{axis: report.hparams[i].get(axis) for axis in report.axes} for i in kept],
        report.axes,
        proxies,
    )


def write_report(report: Report, out: str | Path) -> list[Path]:
    """Write ``report.md``, the CSV tables and the plots (:func:`gapwatch.report_write.write`)."""
    # Imported here: the writer imports this module for `Report`'s constants.
    from gapwatch.report_write import write

    return write(report, out)


def summarize(report: Report) -> str:
    """A few lines for the terminal (:func:`gapwatch.report_summary.summarize`)."""
    # Imported here: the summary imports this module for `Report`'s constants.
    from gapwatch.report_summary import summarize as lines

    return lines(report)
