"""What a run shows beyond scalars, written to TensorBoard: figures, histograms, layout.

:class:`Visuals` writes the figures of :mod:`gapwatch._figures`, histograms, a
custom-scalars layout (:func:`layout`: one chart per quantity, each proxy beside the
held-out loss, with the running correlations of :mod:`gapwatch._correlations`) and an
hparams entry to the run of a Lightning ``TensorBoardLogger``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from gapwatch._correlations import (
    BANDS,
    CORR,
    GAP_NAMES,
    HELDOUT_LOSS,
    SE,
    History,
    _pairs,
    band_edges,
    proxy_names,
)
from gapwatch._figures import ablation_figure, trail_figure
from gapwatch.functional.ablation import AblationResult

if TYPE_CHECKING:  # Lightning stays out of the import path of `gapwatch report`.
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger


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
        every_n_evaluations: Draw the figures at every n-th evaluation and at the fit's
            last, never if 0 (the histograms and the layout cost next to nothing and are
            always written).
    """

    def __init__(self, logger: TensorBoardLogger, prefix: str, every_n_evaluations: int) -> None:
        self.logger = logger
        self.prefix = prefix
        self.every_n_evaluations = every_n_evaluations
        self._evaluations = 0
        # The latest evaluation's artifacts and step while its figures are not drawn: the
        # fit's end draws them (its history ends with that evaluation).
        self._undrawn: tuple[dict[str, object], int] | None = None

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
        for name, value in artifacts.items():
            if isinstance(value, Tensor):
                finite = value.float()[value.isfinite()]  # TensorBoard rejects NaN and empty
                if finite.numel():
                    writer.add_histogram(f"{self.prefix}histograms/{name}", finite, step)
            elif not isinstance(value, AblationResult):
                raise TypeError(f"gapwatch cannot show the {type(value).__name__} {name!r}.")
        if draw:
            self._draw(history, artifacts, step)
        self._undrawn = None if draw or every == 0 else (dict(artifacts), step)

    def _draw(self, history: History, artifacts: Mapping[str, object], step: int) -> None:
        """The figures of one evaluation: each proxy's trail and the ablation curves."""
        writer = self.logger.experiment
        figures = f"{self.prefix}figures/"
        for name, value in artifacts.items():
            if isinstance(value, AblationResult):
                writer.add_figure(figures + name, ablation_figure(value), step)
        for proxy in proxy_names(history[-1]):
            if len(_pairs(history, proxy)):
                writer.add_figure(figures + proxy, trail_figure(history, proxy), step)

    def finish(self, settings: Mapping[str, Any], history: History) -> None:
        """Draw the last evaluation's figures if they are not yet, and write the hparams entry.

        The hparams entry holds the run's settings, with its logged values as metrics.

        TensorBoard reads an hparams metric's value from the run's scalars of that tag,
        which gapwatch has logged already; the entry only names them. (Lightning's
        ``log_hyperparams(metrics=...)`` would log every final value a second time.)
        TensorBoard shows the first hparams entry of a run: see :func:`placeholder_warning`.

        Args:
            settings: Primitive settings of the callback and its proxies, full names.
            history: Every evaluation of the run.
        """
        if self._undrawn is not None and history:  # the final state belongs in the figures
            self._draw(history, *self._undrawn)
            self._undrawn = None
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
