"""Cross-run report: which proxy, read at the end of training, ranks the runs of a sweep.

Every run of a sweep (one directory of TensorBoard event files) contributes the final
value of each gapwatch scalar. Across runs, each proxy is correlated with the held-out
loss and with the generalization gap, the model-selection use of the papers, and Zhao
et al.'s linear gap model (eq. 7) is fitted on the ablation sparsities ζ and κ with its
leave-one-out error. :func:`build_report` returns these as plain lists, dicts and numpy
arrays; :func:`write_report` turns them into ``report.md``, CSV tables and PNG plots.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gapwatch.functional.gap_estimator import GapEstimator
from gapwatch.tensorboard import BANDS, CORR, HELDOUT_LOSS, SE, kendall, proxy_names

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


class ReportError(Exception):
    """The log directory holds nothing to report on."""


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
    """

    logdir: Path
    prefix: str
    metrics: list[str]
    runs: list[dict[str, Any]]
    correlations: list[dict[str, Any]]
    gap_fit: dict[str, Any] | None

    @property
    def missing(self) -> dict[str, list[str]]:
        """``{run: metrics some other run logged and this one did not}`` for incomplete runs."""
        gaps = {row["run"]: [m for m in self.metrics if m not in row] for row in self.runs}
        return {run: names for run, names in gaps.items() if names}


def find_runs(logdir: str | Path) -> list[Path]:
    """Every directory below ``logdir`` (itself included) that holds TensorBoard event files.

    Args:
        logdir: Root of a sweep's logs.

    Returns:
        The run directories, in natural order (``w8`` before ``w16``).

    Raises:
        ReportError: If ``logdir`` is not a directory or holds no event files.
    """
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise ReportError(f"log directory {str(logdir)!r} does not exist.")
    runs = {file.parent for file in logdir.rglob("*tfevents*") if file.is_file()}
    if not runs:
        raise ReportError(f"no TensorBoard event files below {str(logdir)!r}.")
    return sorted(runs, key=_natural_order)


def _natural_order(path: Path) -> list[Any]:
    # Sweeps name runs by numbers: w8 should come before w16.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def final_scalars(run_dir: str | Path, prefix: str = "gapwatch/") -> dict[str, float]:
    """The last logged value of every scalar whose tag starts with ``prefix``.

    Args:
        run_dir: One run's directory; all its event files are read, in order (steps a
            resumed run logged again replace the earlier ones).
        prefix: Tag prefix; it is removed from the returned names.

    Returns:
        ``{name: value at the highest step}``.
    """
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    final = {}
    for tag in accumulator.Tags()["scalars"]:
        if tag.startswith(prefix):
            last = max(accumulator.Scalars(tag), key=lambda event: (event.step, event.wall_time))
            final[tag[len(prefix) :]] = float(last.value)
    return final


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


def build_report(logdir: str | Path, prefix: str = "gapwatch/") -> Report:
    """Read every run below ``logdir`` and compare their final metrics.

    Args:
        logdir: Root of a sweep's logs; each directory holding event files is a run.
        prefix: Tag prefix of the gapwatch scalars.

    Returns:
        The :class:`Report`.

    Raises:
        ReportError: If there are no runs, or no run logged a scalar under ``prefix``.
    """
    logdir = Path(logdir)
    runs = []
    for run in find_runs(logdir):
        # Within-run correlations (corr/<proxy>) describe training curves, not end points;
        # standard errors and their bands describe one run's probe, not the sweep.
        final = {
            n: v
            for n, v in final_scalars(run, prefix).items()
            if not n.startswith((CORR, BANDS)) and not n.endswith(SE)
        }
        runs.append({"run": run.relative_to(logdir).as_posix(), **final})
    found = {name for row in runs for name in row} - {"run"}
    if not found:
        raise ReportError(
            f"none of the {len(runs)} runs below {str(logdir)!r} logged a scalar starting "
            f"with {prefix!r}; pass the prefix the callbacks used with --prefix."
        )
    first = [name for name in (*TARGETS, "test_acc", "train_acc", "train_loss") if name in found]
    metrics = first + sorted(found - set(first))
    table = correlations(runs, proxy_names(dict.fromkeys(metrics)))
    return Report(logdir, prefix, metrics, runs, table, fit_gap(runs))


def write_report(report: Report, out: str | Path) -> list[Path]:
    """Write ``report.md``, ``runs.csv``, ``correlations.csv`` and the scatter plots.

    Args:
        report: From :func:`build_report`.
        out: Output directory, created if needed.

    Returns:
        The paths written, ``report.md`` first.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.md", out / "runs.csv", out / "correlations.csv"]
    _write_csv(written[1], report.runs, ["run", *report.metrics])
    _write_csv(written[2], report.correlations, CORRELATION_FIELDS)
    plots = {}
    if HELDOUT_LOSS in report.metrics:
        for row in report.correlations:
            plots[row["proxy"]] = _save(_plot_proxy(report.runs, row), out, row["proxy"])
    if report.gap_fit is not None:
        plots["gap_fit"] = _save(_plot_gap_fit(report.gap_fit), out, "gap_fit")
    written[0].write_text(_markdown(report, plots))
    return written + list(plots.values())


def summarize(report: Report) -> str:
    """A few lines for the terminal: runs read, best-ranking proxies, the gap fit."""
    lines = [f"Read {len(report.runs)} runs below {report.logdir}."]
    if report.missing:
        lines.append(f"{len(report.missing)} runs lack some metrics: see report.md.")
    for target in TARGETS:
        key = f"kendall_{target}"
        ranked = [row for row in report.correlations if math.isfinite(row[key])]
        if ranked:
            best = max(ranked, key=lambda row: abs(row[key]))
            lines.append(
                f"Best rank agreement with {target}: {best['proxy']} "
                f"(Kendall tau {best[key]:+.3f}, {best[f'n_{target}']} runs)."
            )
        else:
            lines.append(
                f"No correlation with {target}: needs {MIN_RUNS} runs with both, not all equal."
            )
    fit = report.gap_fit
    if fit is None:
        lines.append(NO_GAP_FIT)
    else:
        lines.append(
            f"Gap from ablation sparsity (eq. 7) over {len(fit['runs'])} runs: Pearson r "
            f"{fit['pearson']:.3f}, leave-one-out mean abs. error {fit['loo_error']:.4g}."
        )
    return "\n".join(lines)


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
    lines += ["", *_gap_section(report.gap_fit)]
    if report.missing:
        lines += ["", "## Runs with missing metrics", ""]
        lines += [f"- `{run}`: {', '.join(names)}" for run, names in report.missing.items()]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{name}]({path.name})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"


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
