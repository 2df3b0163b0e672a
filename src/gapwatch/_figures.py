"""Matplotlib figures of a run: proxy-versus-loss trails and Zhao et al.'s ablation curves.

:func:`trail_figure` draws the held-out loss against one proxy over the evaluations, the
view the papers judge a proxy by; :func:`ablation_figure` draws the cumulative ablation
curves ``E(n)`` and ``E_r(n)`` of Zhao et al. (their Fig. 1) with the turning points of
eqs. 2-3 and the area that kappa sums (eq. 5). Both use the Agg canvas through
``matplotlib.figure.Figure`` (no pyplot state, so nothing accumulates over a long run);
:class:`gapwatch.tensorboard.Visuals` writes them to TensorBoard.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, LogLocator, MaxNLocator, NullFormatter

from gapwatch._correlations import HELDOUT_LOSS, History, _pairs
from gapwatch.functional.ablation import AblationResult


def _scale(values: np.ndarray) -> str:
    """Logarithmic for positive values spanning a decade or more, else linear.

    Within a decade a log axis shows nothing a linear one does not, and its minor labels
    crowd each other.
    """
    positive = bool((values > 0).all())
    return "log" if positive and values.max() >= 10 * values.min() else "linear"


def trail_figure(history: History, proxy: str) -> Figure:
    """The held-out loss against a proxy over the evaluations, one point per evaluation.

    Points are coloured by step (viridis: dark is early) and joined in order; the first
    and the latest are ringed and named, so the early, bias-dominated phase stands out.
    Each axis is logarithmic (as in the papers) when its values are positive and span a
    decade or more. The figure is 480 x 360 pixels, the width of a TensorBoard image card.

    Args:
        history: One mapping of metric values per evaluation, oldest first.
        proxy: The metric on the x axis.

    Returns:
        The figure; evaluations where either value is missing or non-finite are left out.
    """
    steps, x, y = _pairs(history, proxy).T
    figure = Figure(figsize=(4.8, 3.6), dpi=100)
    # Fixed margins and no colorbar: either a layout engine or a colorbar adds half again
    # to the drawing time.
    figure.subplots_adjust(left=0.17, right=0.96, bottom=0.15, top=0.9)
    axes = figure.add_subplot()
    axes.plot(x, y, color="0.75", linewidth=1, zorder=1)
    axes.scatter(x, y, c=steps, cmap="viridis", s=22, zorder=2)
    for i, edge in {0: "crimson", len(steps) - 1: "black"}.items():
        axes.scatter(
            x[i], y[i], s=90, facecolors="none", edgecolors=edge, label=f"step {steps[i]:.0f}"
        )
    axes.legend(fontsize=8)
    axes.set(
        xscale=_scale(x),
        yscale=_scale(y),
        xlabel=proxy,
        ylabel=HELDOUT_LOSS,
        title=f"{HELDOUT_LOSS} vs {proxy}",
    )
    for axis in (axes.xaxis, axes.yaxis):
        if axis.get_scale() == "log":
            # Minor ticks at 2 and 5 only, plain labels: the default eight minor ticks per
            # decade and typeset labels double the drawing time.
            axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
            axis.set_major_formatter(LogFormatter())
            axis.set_minor_formatter(NullFormatter())
        else:
            axis.set_major_locator(MaxNLocator(nbins=5))
    return figure


def ablation_figure(result: AblationResult, max_classes: int = 4) -> Figure:
    """Zhao et al.'s cumulative ablation curves of the first few classes (their Fig. 1).

    ``E(n)`` removes the most active units first, ``E_r(n)`` the least active; the turning
    points ``n0`` (eq. 2) and ``n0_r`` (eq. 3) are marked and the area between the curves,
    which kappa sums (eq. 5), is shaded. Panels are laid out two per row, so that four
    classes fill a 560-pixel-wide TensorBoard card at a readable size.

    Args:
        result: The ablation of one evaluation (at least one class).
        max_classes: Panels drawn, one per class.

    Returns:
        The figure.
    """
    shown = min(len(result.classes), max_classes)
    cols = min(shown, 2)
    rows = -(-shown // cols)
    figure = Figure(figsize=(2.8 * cols, 0.4 + 2.3 * rows), dpi=100)
    figure.subplots_adjust(left=0.12, right=0.98, bottom=0.45 / (0.4 + 2.3 * rows) + 0.06,
                           top=1 - 0.35 / (0.4 + 2.3 * rows), wspace=0.08, hspace=0.45)  # fmt: skip
    grid = figure.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).flatten()
    units = np.arange(result.curves.shape[1])
    for i, axes in enumerate(grid[:shown]):
        e, e_r = result.curves[i].cpu().numpy(), result.curves_reversed[i].cpu().numpy()
        n0, n0_r = int(result.n0[i]), int(result.n0_r[i])
        axes.fill_between(units, e, e_r, color="C0", alpha=0.2, linewidth=0)
        axes.plot(units, e, color="C3", label="E(n)")
        axes.plot(units, e_r, color="C2", label="E_r(n)")
        axes.plot([n0], [e[n0]], "v", color="C3", label="n0")
        axes.plot([n0_r], [e_r[n0_r]], "^", color="C2", label="n0_r")
        zeta, kappa = float(result.zeta_per_class[i]), float(result.kappa_per_class[i])
        axes.set_title(f"class {int(result.classes[i])}: ζ {zeta:.2f}, κ {kappa:.2f}", fontsize=9)
        axes.tick_params(labelsize=8)
        if i % cols == 0:
            axes.set_ylabel("class accuracy", fontsize=8)
        if i + cols >= shown:
            axes.set_xlabel("units removed n", fontsize=8)
            axes.xaxis.set_tick_params(labelbottom=True)
    for axes in grid[shown:]:
        figure.delaxes(axes)
    grid[0].legend(fontsize=7)
    return figure
