"""gapwatch._figures: the proxy-versus-loss trail and the ablation curves figures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gapwatch._figures import ablation_figure, trail_figure
from gapwatch.functional.ablation import ablation_summary
from tests.test_correlations import LOSSES, SENSITIVITY, _history


def test_trail_figure_one_point_per_evaluation_coloured_by_step_on_log_axes():
    history = _history()
    figure = trail_figure(history, "sensitivity")
    [axes] = figure.axes
    points, first, last = axes.collections
    np.testing.assert_allclose(points.get_offsets(), np.c_[SENSITIVITY, LOSSES])
    np.testing.assert_array_equal(points.get_array(), [h["step"] for h in history])
    [line] = axes.lines
    np.testing.assert_allclose(line.get_xdata(), SENSITIVITY)  # joined in evaluation order
    np.testing.assert_allclose(first.get_offsets(), [[SENSITIVITY[0], LOSSES[0]]])
    np.testing.assert_allclose(last.get_offsets(), [[SENSITIVITY[-1], LOSSES[-1]]])
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["step 0", "step 100"]
    # S spans nearly three decades; the losses less than one, where a log axis shows nothing.
    assert (axes.get_xscale(), axes.get_yscale()) == ("log", "linear")
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("sensitivity", "test_loss")
    wide = [{**h, "test_loss": 10.0 ** -i} for i, h in enumerate(history)]
    assert trail_figure(wide, "sensitivity").axes[0].get_yscale() == "log"


def test_trail_figure_keeps_a_linear_axis_for_non_positive_values_and_drops_non_finite():
    history = _history()
    history[2]["log_norm_product"] = math.inf
    [axes] = trail_figure(history, "log_norm_product").axes
    assert len(axes.collections[0].get_offsets()) == 5
    assert (axes.get_xscale(), axes.get_yscale()) == ("linear", "linear")


def _pixels(figure) -> tuple[int, int]:
    width, height = figure.get_size_inches() * figure.dpi
    return round(width), round(height)


def _overlapping_labels(figure) -> list[tuple[str, str]]:
    """Pairs of tick labels of one axis whose drawn boxes intersect."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    pairs = []
    for axes in figure.axes:
        for axis in (axes.xaxis, axes.yaxis):
            labels = [t for t in axis.get_ticklabels(which="both") if t.get_visible()]
            labels = [t for t in labels if t.get_text()]
            boxes = [t.get_window_extent(renderer) for t in labels]
            for i in range(len(boxes)):
                for j in range(i):
                    if boxes[i].overlaps(boxes[j]):
                        pairs.append((labels[i].get_text(), labels[j].get_text()))
    return pairs


@pytest.mark.parametrize(
    "values",
    [
        [0.231, 0.232, 0.2335, 0.236, 0.2341, 0.2338],  # kappa: a narrow band
        [0.12, 0.19, 0.31, 0.55, 0.9, 1.4],  # just over a decade
        [1e-5, 3e-4, 2e-3, 4e-3, 6e-3, 5e-3],
        [7811.0, 7902.0, 8120.0, 8305.0, 8010.0, 7950.0],  # transitions
    ],
)
def test_trail_figures_fit_a_tensorboard_card_with_readable_ticks(values):
    history = [{**h, "ablation_kappa": v} for h, v in zip(_history(), values, strict=True)]
    figure = trail_figure(history, "ablation_kappa")
    assert _pixels(figure) == (480, 360)
    assert _overlapping_labels(figure) == []


def _ablation():
    # M = 8 units. E drops to chance (0.1) after 4, 6 and never (-> M) removals; E_r
    # peaks last at 3, 3 and 5 removals, and stays above E.
    curves = torch.tensor(
        [
            [0.9, 0.9, 0.6, 0.3, 0.1, 0.05, 0.0, 0.0, 0.0],
            [1.0, 1.0, 0.9, 0.8, 0.6, 0.4, 0.1, 0.1, 0.0],
            [0.9, 0.9, 0.8, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3],
        ]
    )
    reversed_ = torch.tensor(
        [
            [0.9, 0.95, 1.0, 1.0, 0.8, 0.5, 0.3, 0.1, 0.0],
            [1.0, 1.0, 1.0, 1.0, 0.9, 0.9, 0.8, 0.3, 0.0],
            [0.9, 0.9, 0.9, 0.9, 0.9, 1.0, 0.9, 0.9, 0.3],
        ]
    )
    return ablation_summary(curves, reversed_, chance=0.1, classes=torch.tensor([3, 5, 7]))


def _area(polygon: np.ndarray) -> float:
    x, y = polygon.T
    return abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2


def test_ablation_figure_marks_turning_points_and_shades_the_area_between_curves():
    result = _ablation()
    figure = ablation_figure(result)
    assert len(figure.axes) == 3
    units = np.arange(9)
    assert (result.curves_reversed >= result.curves).all()
    for i, (axes, n0, n0_r) in enumerate(zip(figure.axes, [4, 6, 8], [3, 3, 5], strict=True)):
        e, e_r = result.curves[i].numpy(), result.curves_reversed[i].numpy()
        lines = {line.get_label(): line for line in axes.lines}
        np.testing.assert_allclose(lines["E(n)"].get_xydata(), np.c_[units, e])
        np.testing.assert_allclose(lines["E_r(n)"].get_xydata(), np.c_[units, e_r])
        np.testing.assert_allclose(lines["n0"].get_xydata(), [[n0, e[n0]]])
        np.testing.assert_allclose(lines["n0_r"].get_xydata(), [[n0_r, e_r[n0_r]]])
        [shade] = axes.collections
        area = sum(_area(path.vertices) for path in shade.get_paths())
        between = e_r - e
        assert area == pytest.approx(((between[1:] + between[:-1]) / 2).sum(), rel=1e-6)
        assert axes.get_title().startswith(f"class {int(result.classes[i])}:")
    assert len(ablation_figure(result, max_classes=2).axes) == 2


def test_ablation_figure_lays_out_two_panels_a_row_at_card_width():
    result = _ablation()
    figure = ablation_figure(result)  # three classes: a 2 x 2 grid with one panel left out
    assert _pixels(figure) == (560, 500)
    rows = sorted({round(axes.get_position().y0, 3) for axes in figure.axes})
    assert len(rows) == 2
    assert _overlapping_labels(figure) == []
    assert _pixels(ablation_figure(result, max_classes=1)) == (280, 270)
