"""What a run shows beyond scalars: proxy-versus-loss trails, ablation curves, correlations.

The papers judge a proxy by how it moves with the held-out loss over training, not by its
value at one step. This module turns a probe callback's ``history`` (one dict of metrics
per evaluation) into that view:

* :func:`correlations` — the running Kendall rank correlation of each proxy with the
  held-out loss, logged like any metric so it can be monitored;
* :func:`trail_figure` and :func:`ablation_figure` — matplotlib figures drawn with the Agg
  canvas (no pyplot state, so nothing accumulates over a long run);
* :class:`Visuals` — writes the figures, histograms, a custom-scalars layout and an
  hparams entry to the run of a Lightning ``TensorBoardLogger``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, LogLocator, MaxNLocator, NullFormatter
from scipy.stats import kendalltau
from torch import Tensor

from gapwatch.functional.ablation import AblationResult

if TYPE_CHECKING:  # Lightning stays out of the import path of `gapwatch report`.
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger

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


def _anchored(tag: str) -> str:
    # Custom-scalars charts take regular expressions matched at the start of a tag only:
    # "gapwatch/predicted_test_loss" alone would also chart "..._bias".
    return re.escape(tag) + "$"


def layout(metrics: Mapping[str, float], prefix: str) -> dict[str, dict[str, list[Any]]]:
    """A custom-scalars layout: one chart per quantity, each proxy beside the held-out loss.

    Each chart holds a single tag, so every quantity gets its own y axis (sensitivity sits
    near 1e-4, transitions near 1e4) and each line is coloured by its run, which is how
    TensorBoard tells the lines of one chart apart. A chart is named after its tag alone,
    so the layouts of several runs in one log directory merge without duplicates.

    Args:
        metrics: One evaluation's metrics (names without prefix): only these are charted.
        prefix: The prefix of the logged names.

    Returns:
        The ``layout`` argument of ``SummaryWriter.add_custom_scalars``: a category per
        proxy with its chart and the held-out loss's side by side, one for accuracy and
        gap, and one of the running Kendall correlations, a chart per proxy. A quantity
        with a standard error is a margin chart: its value within one standard error
        (the ``bands/`` tags that :class:`Visuals` writes).
    """
    title = prefix.rstrip("/") or "gapwatch"
    loss = [HELDOUT_LOSS] if HELDOUT_LOSS in metrics else []
    proxies = proxy_names(metrics)

    def chart(name: str) -> list[Any]:
        if name + SE in metrics:  # exact tags, not expressions: the value and its band
            edges = [f"{prefix}{BANDS}{name}/{edge}" for edge in ("lower", "upper")]
            return ["Margin", [prefix + name, *edges]]
        return ["Multiline", [_anchored(prefix + name)]]

    def charts(names: Sequence[str]) -> dict[str, list[Any]]:
        return {name: chart(name) for name in names}

    categories = {f"{title}: {proxy}": charts([proxy, *loss]) for proxy in proxies}
    accuracy = [n for n in (*GAP_NAMES, "train_loss", *loss) if n in metrics]
    if accuracy:
        categories[f"{title}: accuracy and gap"] = charts(accuracy)
    if loss and proxies:
        categories[f"{title}: kendall tau with {HELDOUT_LOSS}"] = charts(
            [CORR + proxy for proxy in proxies]
        )
    return categories


def tensorboard_logger(trainer: Trainer) -> TensorBoardLogger | None:
    """The trainer's first ``TensorBoardLogger`` (every process has one; rank 0 writes)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


class Visuals:
    """Figures, histograms, custom-scalars layout and hparams for one TensorBoard run.

    Args:
        logger: The run's logger; written to on global rank zero only.
        prefix: The prefix of the logged names; figure tags go below ``<prefix>figures/``
            and histograms below ``<prefix>histograms/`` (a tag holds one kind of data).
        every_n_evaluations: Draw the figures at every n-th evaluation, never if 0 (the
            histograms and the layout cost next to nothing and are always written).
    """

    def __init__(self, logger: TensorBoardLogger, prefix: str, every_n_evaluations: int) -> None:
        self.logger = logger
        self.prefix = prefix
        self.every_n_evaluations = every_n_evaluations
        self._evaluations = 0

    @classmethod
    def of(cls, trainer: Trainer, prefix: str, every_n_evaluations: int) -> Visuals | None:
        """Visuals for the trainer's first ``TensorBoardLogger``; None without, or off rank 0."""
        logger = tensorboard_logger(trainer)
        if trainer.global_rank != 0 or logger is None:
            return None
        return cls(logger, prefix, every_n_evaluations)

    def update(
        self,
        history: History,
        artifacts: Mapping[str, object],
        step: int,
        *,
        later: Collection[str] = (),
    ) -> None:
        """Write one evaluation: the layout (first time only), bands, figures, histograms.

        Args:
            history: Every evaluation so far, the current one last.
            artifacts: Per-proxy extras by name: tensors become histograms and an
                :class:`~gapwatch.functional.AblationResult` its curves figure.
            step: The step of the current evaluation.
            later: Names logged from the second evaluation on, charted from the first.

        Raises:
            TypeError: If an artifact is of another type.
        """
        writer = self.logger.experiment
        if self._evaluations == 0:
            coming = dict.fromkeys(later, math.nan)  # charted before their first point
            writer.add_custom_scalars(layout({**coming, **history[-1]}, self.prefix))
        for tag, edge in band_edges(history[-1]).items():
            writer.add_scalar(self.prefix + tag, edge, step)
        every = self.every_n_evaluations
        draw = every > 0 and self._evaluations % every == 0
        self._evaluations += 1
        figures = f"{self.prefix}figures/"
        for name, value in artifacts.items():
            if isinstance(value, Tensor):
                finite = value.float()[value.isfinite()]  # TensorBoard rejects NaN and empty
                if finite.numel():
                    writer.add_histogram(f"{self.prefix}histograms/{name}", finite, step)
            elif isinstance(value, AblationResult):
                if draw:
                    writer.add_figure(figures + name, ablation_figure(value), step)
            else:
                raise TypeError(f"gapwatch cannot show the {type(value).__name__} {name!r}.")
        if draw:
            for proxy in proxy_names(history[-1]):
                if len(_pairs(history, proxy)):
                    writer.add_figure(figures + proxy, trail_figure(history, proxy), step)

    def finish(self, settings: Mapping[str, Any], history: History) -> None:
        """Write the hparams entry: the run's settings, with its logged values as metrics.

        TensorBoard reads an hparams metric's value from the run's scalars of that tag,
        which gapwatch has logged already; the entry only names them. (Lightning's
        ``log_hyperparams(metrics=...)`` would log every final value a second time.)
        TensorBoard shows the first hparams entry of a run: see :func:`placeholder_warning`.

        Args:
            settings: Primitive settings of the callback and its proxies, full names.
            history: Every evaluation of the run.
        """
        if not history:
            return
        from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
        from torch.utils.tensorboard.summary import hparams

        # In the entry only: Lightning saved hparams.yaml at fit start and never rewrites it
        # (gapwatch report reads these settings from the entry).
        self.logger.hparams.update(settings)
        params = self.logger._sanitize_params(_flatten_dict(_convert_params(self.logger.hparams)))
        metrics = {self.prefix + n: v for n, v in history[-1].items() if n != "step"}
        writer = self.logger.experiment._get_file_writer()
        step = int(history[-1]["step"])
        for summary in hparams(params, metrics):
            writer.add_summary(summary, step)
        self.logger.save()


def placeholder_warning(logger: TensorBoardLogger) -> str | None:
    """What to tell a user whose logger writes Lightning's placeholder hparams entry.

    Lightning's ``TensorBoardLogger`` writes ``hp_metric = -1`` at fit start unless it was
    created with ``default_hp_metric=False``; TensorBoard's HParams tab then shows that
    entry, not gapwatch's settings and final values.
    """
    if not getattr(logger, "_default_hp_metric", False):
        return None
    return (
        "gapwatch: this TensorBoardLogger writes Lightning's placeholder hparams entry "
        "(hp_metric = -1), which TensorBoard's HParams tab shows instead of gapwatch's "
        "settings and final values; create it with TensorBoardLogger(..., "
        "default_hp_metric=False)."
    )
