"""The report's summary for the terminal: runs read, best proxies, stopping, the gap fit."""

from __future__ import annotations

import math

from gapwatch.report import MIN_RUNS, NO_GAP_FIT, TARGETS, Report
from gapwatch.report_stopping import summary


def summarize(report: Report) -> str:
    """A few lines for the terminal: runs read, best-ranking proxies, the gap fit."""
    lines = [f"Read {len(report.runs)} runs below {report.logdir}."]
    if report.missing:
        lines.append(f"{len(report.missing)} runs lack some metrics: see report.md.")
    if report.nonfinite:
        lines.append(f"{len(report.nonfinite)} runs end with NaN or inf values: see report.md.")
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
    lines += _ranking_lines(report)
    lines += _stopping_lines(report)
    fit = report.gap_fit
    if fit is None:
        lines.append(NO_GAP_FIT)
    else:
        lines.append(
            f"Gap from ablation sparsity (eq. 7) over {len(fit['runs'])} runs: Pearson r "
            f"{fit['pearson']:.3f}, leave-one-out mean abs. error {fit['loo_error']:.4g}."
        )
    return "\n".join(lines)


def _ranking_lines(report: Report) -> list[str]:
    """Psi and the worst sign error per proxy, best Psi first, and the runs left out."""
    lines = []
    if report.excluded:
        lines.append(f"{len(report.excluded)} runs left out of the rankings: see report.md.")
    ranked = [row for row in report.rankings if math.isfinite(row["psi"])]
    if not ranked:
        axes = ", ".join(report.axes) or "none vary"
        lines.append(f"No granulated ranking: no two runs differ in one axis only ({axes}).")
        return lines
    lines.append(f"Granulated Kendall Psi with the gap over {', '.join(report.axes)}:")
    for row in sorted(ranked, key=lambda row: -abs(row["psi"])):
        lines.append(
            f"  {row['proxy']:<26} Psi {row['psi']:+.3f} ({row['psi_pairs']} pairs), "
            f"tau {row['tau_gap']:+.3f} ({row['pairs_gap']}), sign error worst "
            f"{row['worst_sign_error']:.2f}, mean {row['mean_sign_error']:.2f} "
            f"({row['sign_error_pairs']})"
        )
    return lines


def _stopping_lines(report: Report) -> list[str]:
    """Per label-free rule: how many runs it stopped and its median and worst loss regret."""
    lines = []
    for row in summary(report.stopping):
        lines.append(
            f"Stopping on {row['rule']}: stopped {row['stopped']} of {row['runs']} runs, "
            f"held-out loss regret median {row['median_loss_regret']:.4g}, worst "
            f"{row['worst_loss_regret']:.4g} (see report.md)."
        )
    return lines
