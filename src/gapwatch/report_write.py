"""Writing a :class:`~gapwatch.report.Report`: ``report.md``, CSV tables and PNG plots."""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from gapwatch._correlations import HELDOUT_LOSS
from gapwatch.report import CORRELATION_FIELDS, NO_GAP_FIT, Report, column
from gapwatch.report_stats import LARGER_GENERALIZES_BETTER, RANKING_FIELDS
from gapwatch.report_stopping import summary

#: The ranking table of ``report.md``: (column header, key of a ranking row).
RANKING_COLUMNS = [("proxy", "proxy"), ("tau gap", "tau_gap"), ("pairs", "pairs_gap"),
                   ("tau test_loss", "tau_test_loss"), ("pairs", "pairs_test_loss"),
                   ("Psi", "psi"), ("axes", "psi_axes"), ("pairs", "psi_pairs"),
                   ("worst sign error", "worst_sign_error"), ("mean", "mean_sign_error"),
                   ("pairs", "sign_error_pairs"),
                   ("worst group", "worst_group")]  # fmt: skip

#: The stopping audit's columns, in ``stopping.csv`` and ``report.md``.
STOPPING_FIELDS = ["run", "rule", "stopped", "check", "checks", "evaluated", "step", "loss",
                   "loss_regret", "error_regret", "checkpoint", "checkpoint_loss_regret",
                   "checkpoint_error_regret"]  # fmt: skip
#: Its summary over runs: (column header, key of a :func:`summary` row).
SUMMARY_COLUMNS = [("rule", "rule"), ("runs", "runs"), ("stopped", "stopped"),
                   ("loss regret: median", "median_loss_regret"), ("worst", "worst_loss_regret"),
                   ("error regret: median", "median_error_regret"),
                   ("worst", "worst_error_regret"),
                   ("best checkpoint's loss regret: median", "median_checkpoint_loss_regret"),
                   ("worst", "worst_checkpoint_loss_regret")]  # fmt: skip


def write(report: Report, out: str | Path) -> list[Path]:
    """Write ``report.md``, the CSV tables (runs, correlations, rankings, stopping), plots.

    Args:
        report: From :func:`build_report`.
        out: Output directory, created if needed.

    Returns:
        The paths written, ``report.md`` first.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = ("report.md", "runs.csv", "correlations.csv", "rankings.csv", "stopping.csv")
    written = [out / name for name in names]
    _write_csv(written[1], report.runs, ["run", *report.metrics])
    _write_csv(written[2], report.correlations, CORRELATION_FIELDS)
    axis_fields = [f"psi_{axis}" for axis in report.axes]
    _write_csv(written[3], report.rankings, [*RANKING_FIELDS, *axis_fields])
    _write_csv(written[4], report.stopping, STOPPING_FIELDS)
    plots = {}
    if HELDOUT_LOSS in report.metrics:
        for row in report.correlations:
            plots[row["proxy"]] = _save(_plot_proxy(report.runs, row), out, row["proxy"])
    if report.gap_fit is not None:
        plots["gap_fit"] = _save(_plot_gap_fit(report.gap_fit), out, "gap_fit")
    written[0].write_text(_markdown(report, plots))
    return written + list(plots.values())


def _write_csv(path: Path, rows: Sequence[dict[str, Any]], fields: list[str]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _save(figure: Figure, out: Path, name: str) -> Path:
    path = out / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
    figure.savefig(path, dpi=100)
    return path


def _scatter(
    x: np.ndarray, y: np.ndarray, labels: Sequence[str], *, log: bool
) -> tuple[Figure, Any]:
    """Labelled runs; with ``log``, each axis whose values are all positive is logarithmic."""
    figure = Figure(figsize=(5, 4))
    # Fixed margins and plain log labels: a layout engine and mathtext triple the time.
    figure.subplots_adjust(left=0.16, right=0.95, bottom=0.12, top=0.92)
    axes = figure.add_subplot()
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    axes.scatter(x, y)
    for xi, yi, label in zip(x, y, np.asarray(labels)[keep], strict=True):
        axes.annotate(label, (xi, yi), fontsize=6, alpha=0.7)
    for set_scale, axis, values in (
        (axes.set_xscale, axes.xaxis, x),
        (axes.set_yscale, axes.yaxis, y),
    ):
        if log and len(values) and (values > 0).all():
            set_scale("log")
            axis.set_major_formatter(LogFormatter())
            axis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    return figure, axes


def _plot_proxy(runs: Sequence[dict[str, Any]], row: dict[str, Any]) -> Figure:
    proxy = row["proxy"]
    labels = [run["run"] for run in runs]
    figure, axes = _scatter(column(runs, proxy), column(runs, HELDOUT_LOSS), labels, log=True)
    axes.set(
        xlabel=f"final {proxy}",
        ylabel=f"final {HELDOUT_LOSS}",
        title=f"r = {row['pearson_test_loss']:.3f}, tau = {row['kendall_test_loss']:.3f}",
    )
    return figure


def _plot_gap_fit(fit: dict[str, Any]) -> Figure:
    figure, axes = _scatter(fit["gap"], fit["predicted"], fit["runs"], log=False)
    ends = [
        min(fit["gap"].min(), fit["predicted"].min()),
        max(fit["gap"].max(), fit["predicted"].max()),
    ]
    axes.plot(ends, ends, color="gray", linewidth=0.8)  # perfect prediction
    axes.set(
        xlabel="measured gap (train_acc - test_acc)",
        ylabel="a*zeta + b*kappa + c",
        title=f"r = {fit['pearson']:.3f}, leave-one-out MAE = {fit['loo_error']:.3g}",
    )
    return figure


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(_number(value) for value in row) + " |" for row in rows]
    return lines


def _markdown(report: Report, plots: dict[str, Path]) -> str:
    lines = [
        f"# gapwatch report: {report.logdir}",
        "",
        f"Final value of every `{report.prefix}*` scalar in each of {len(report.runs)} runs.",
        "",
        "## Runs",
        "",
        *_table(
            ["run", *report.metrics],
            [[row["run"], *(row.get(m, "") for m in report.metrics)] for row in report.runs],
        ),
        "",
        "## Correlation of each proxy with the held-out loss and the gap, across runs",
        "",
        "Pearson's r and Kendall's tau-b over the runs where both values are finite.",
        "",
        *_table(
            CORRELATION_FIELDS,
            [[row[field] for field in CORRELATION_FIELDS] for row in report.correlations],
        ),
    ]
    lines += ["", *ranking_section(report)]
    lines += ["", *_gap_section(report.gap_fit)]
    lines += ["", *stopping_section(report.stopping)]
    if report.missing:
        lines += ["", "## Runs with missing metrics", ""]
        lines += [f"- `{run}`: {', '.join(names)}" for run, names in report.missing.items()]
    if report.nonfinite:
        lines += ["", "## Runs whose final values are not finite (left out of each statistic)", ""]
        lines += [f"- `{run}`: {', '.join(names)}" for run, names in report.nonfinite.items()]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{name}]({path.name})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"


def ranking_section(report: Report) -> list[str]:
    """The markdown of the rankings: one row per proxy, then Psi per axis, then exclusions."""
    lines = [
        "## How each proxy ranks the runs (Jiang et al. 2020; Dziugaite et al. 2020)",
        "",
        f"Over {len(report.runs) - len(report.excluded)} runs; hyperparameter axes: "
        f"{', '.join(report.axes) or 'none vary'}. tau: mean of sign(d proxy) * sign(d target) "
        "over all pairs of runs. Psi: mean over axes of the mean tau with the gap within the "
        "groups of runs that differ in that axis only. Worst sign error: the largest share of "
        "pairs within one such group that the proxy orders against their gaps (0 is best), mean: "
        "its average over the groups ("
        f"{' and '.join(sorted(LARGER_GENERALIZES_BETTER))} negated, as their larger values go "
        "with smaller gaps). Pairs: how many pairs of runs each number rests on.",
        "",
        *_table(
            [header for header, _ in RANKING_COLUMNS],
            [[row[key] for _, key in RANKING_COLUMNS] for row in report.rankings],
        ),
    ]
    if report.axes:
        lines += ["", "psi_i, the mean tau with the gap over the groups that vary axis i only:", ""]
        lines += _table(
            ["proxy", *report.axes],
            [[row["proxy"], *(row[f"psi_{a}"] for a in report.axes)] for row in report.rankings],
        )
    if report.excluded:
        lines += ["", "Runs left out of the rankings:", ""]
        lines += [f"- `{run}`: {reason}" for run, reason in report.excluded.items()]
    return lines


def _gap_section(fit: dict[str, Any] | None) -> list[str]:
    title = "## Gap estimated from ablation sparsity (Zhao et al., eq. 7)"
    if fit is None:
        return [title, "", NO_GAP_FIT]
    a, b, c = fit["coefficients"]
    lines = [
        title,
        "",
        f"gap = {a:.4g} * zeta {b:+.4g} * kappa {c:+.4g}, fitted on {len(fit['runs'])} runs.",
        "",
        *_table(
            ["Pearson r", "SSR", "leave-one-out mean abs. error"],
            [[fit["pearson"], fit["ssr"], fit["loo_error"]]],
        ),
    ]
    return [*lines, "", fit["note"]] if fit["note"] else lines


def stopping_section(stopping: Sequence[dict[str, Any]]) -> list[str]:
    """The markdown of the stopping audit: the rules over all runs, then each run's stops."""
    title = "## Stopping audit: where each label-free rule would have stopped"
    if not stopping:
        return [title, "", "No run logged a held-out loss and a rule's metric at a check."]
    lines = [
        title,
        "",
        'Each rule is an `EarlyStopping(mode="min", min_delta, patience)` replayed on the '
        "logged curve at the evaluations a monitor reads (not step 0, not the `log_steps` "
        "extras). Regret: the held-out loss (error) at its stop minus the run's best over "
        "those evaluations. A rule that never stopped is scored at the last evaluation. "
        'Best checkpoint: the evaluation a `ModelCheckpoint(monitor, mode="min")` beside it '
        "would have kept (its least value up to the stop). `patience` counts the run's "
        "evaluations (`evaluated`): epochs only where it evaluated every epoch.",
        "",
        *_table(
            [header for header, _ in SUMMARY_COLUMNS],
            [[row[key] for _, key in SUMMARY_COLUMNS] for row in summary(stopping)],
        ),
        "",
        *_table(STOPPING_FIELDS, [[row[f] for f in STOPPING_FIELDS] for row in stopping]),
    ]
    return lines
