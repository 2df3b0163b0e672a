"""The pure parts of gapwatch.tensorboard: correlations, table, figures, layout, and writing."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gapwatch.functional.ablation import ablation_summary
from gapwatch.tensorboard import (
    Visuals,
    ablation_figure,
    band_edges,
    correlations,
    layout,
    proxy_names,
    summary_table,
    trail_figure,
)

LOSSES = [2.3, 1.1, 0.7, 0.5, 0.45, 0.48]
SENSITIVITY = [1e-5, 3e-4, 2e-3, 4e-3, 6e-3, 5e-3]
ZETA = [0.9, 0.8, 0.8, 0.7, 0.75, 0.6]  # a tie, and not monotone
LOG_NORM = [-0.5, 1.0, 2.0, 3.0, 3.5, 4.0]  # crosses zero: no log axis


def _history(n: int = len(LOSSES)) -> list[dict[str, float]]:
    return [
        {
            "step": float(20 * i),
            "test_loss": LOSSES[i],
            "test_acc": 0.5,
            "train_loss": 0.1,
            "train_acc": 0.9,
            "gap": 0.4,
            "sensitivity": SENSITIVITY[i],
            "ablation_zeta": ZETA[i],
            "log_norm_product": LOG_NORM[i],
        }
        for i in range(n)
    ]


def _tau_b(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b by counting pairs."""
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i):
            dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            concordant += dx * dy > 0
            discordant += dx * dy < 0
            ties_x += dx == 0 and dy != 0
            ties_y += dy == 0 and dx != 0
    pairs_x, pairs_y = concordant + discordant + ties_y, concordant + discordant + ties_x
    return (concordant - discordant) / math.sqrt(pairs_x * pairs_y)


def test_proxies_are_all_but_losses_accuracies_gap_and_correlations():
    metrics = {**_history(1)[0], "corr/sensitivity": 0.5, "bias_fraction": 0.3}
    assert proxy_names(metrics) == [
        "sensitivity",
        "ablation_zeta",
        "log_norm_product",
        "bias_fraction",
    ]


@pytest.mark.parametrize("n", [2, 3, 6])
def test_correlations_are_kendall_tau_b_over_the_evaluations_so_far(n):
    history = _history(n)
    result = correlations(history)
    assert set(result) == {"corr/sensitivity", "corr/ablation_zeta", "corr/log_norm_product"}
    for proxy, values in [("sensitivity", SENSITIVITY), ("ablation_zeta", ZETA)]:
        assert result[f"corr/{proxy}"] == pytest.approx(_tau_b(values[:n], LOSSES[:n]))
    assert result["corr/sensitivity"] == pytest.approx(-1.0)  # every pair discordant


def test_correlations_need_two_finite_evaluations_a_heldout_loss_and_no_constant_series():
    assert correlations(_history(1)) == {}
    assert (
        correlations([{k: v for k, v in h.items() if k != "test_loss"} for h in _history()]) == {}
    )
    history = _history(4)
    history[1]["sensitivity"] = math.nan  # left out, not poisoning every later tau
    for h in history:
        h["ablation_zeta"] = 0.5  # constant: tau undefined, nothing logged
    result = correlations(history)
    assert "corr/ablation_zeta" not in result
    kept = [0, 2, 3]
    expected = _tau_b([SENSITIVITY[i] for i in kept], [LOSSES[i] for i in kept])
    assert result["corr/sensitivity"] == pytest.approx(expected)


def test_summary_table_lists_final_values_and_correlations():
    history = _history()
    history[-1] |= correlations(history)
    del history[-1]["corr/log_norm_product"]
    lines = summary_table(history).splitlines()
    assert lines[0] == "gapwatch after 6 evaluations (step 100, test_loss 0.48):"
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert rows["sensitivity"] == ["0.005", f"{history[-1]['corr/sensitivity']:+.3f}"]
    assert rows["log_norm_product"] == ["4", "-"]
    assert list(rows) == ["sensitivity", "ablation_zeta", "log_norm_product"]


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


def _charted(categories: dict, tags: list[str]) -> dict[tuple[str, str], list[str]]:
    """The tags each (category, chart) of a layout selects, as TensorBoard matches them."""
    return {
        (category, title): sorted(tag for tag in tags if any(re.match(rx, tag) for rx in regexes))
        for category, charts in categories.items()
        for title, (kind, regexes) in charts.items()
        if kind == "Multiline"
    }


def test_layout_gives_every_quantity_its_own_chart_beside_the_heldout_loss():
    metrics = {**_history(1)[0], "predicted_test_loss": 0.5, "predicted_test_loss_bias": 0.6}
    tags = [f"gw.{name}" for name in [*metrics, "corr/sensitivity", "test_loss_x"]]
    selected = _charted(layout(metrics, "gw."), tags)
    # One tag per chart, so each quantity has its own y axis and lines are told apart by run.
    for proxy in proxy_names(metrics):
        assert selected.pop((f"gw.: {proxy}", proxy)) == [f"gw.{proxy}"]
        assert selected.pop((f"gw.: {proxy}", "test_loss")) == ["gw.test_loss"]
    accuracy = {key: selected.pop(("gw.: accuracy and gap", key)) for key in
                ["train_acc", "test_acc", "gap", "train_loss", "test_loss"]}  # fmt: skip
    assert accuracy == {key: [f"gw.{key}"] for key in accuracy}
    tau = {title: tags for (category, title), tags in selected.items()
           if category == "gw.: kendall tau with test_loss"}  # fmt: skip
    assert tau == {f"corr/{p}": ([f"gw.corr/{p}"] if p == "sensitivity" else [])
                   for p in proxy_names(metrics)}  # fmt: skip
    assert len(selected) == len(tau)


def test_layout_without_heldout_data_charts_only_what_is_logged():
    metrics = {"step": 0.0, "train_loss": 0.3, "train_acc": 0.9, "sensitivity": 1e-3}
    assert layout(metrics, "gapwatch/") == {
        "gapwatch: sensitivity": {"sensitivity": ["Multiline", ["gapwatch/sensitivity$"]]},
        "gapwatch: accuracy and gap": {
            "train_acc": ["Multiline", ["gapwatch/train_acc$"]],
            "train_loss": ["Multiline", ["gapwatch/train_loss$"]],
        },
    }


def test_visuals_write_histograms_each_time_figures_every_n_and_the_layout_once(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    visuals = Visuals(logger, "gapwatch/", every_n_evaluations=2)
    history = _history(5)
    norms = torch.rand(50, generator=torch.Generator().manual_seed(0))
    for k, h in enumerate(history):
        artifacts = {"jacobian_norm": norms * (k + 1), "ablation_curves": _ablation()}
        visuals.update(history[: k + 1], artifacts, int(h["step"]))
    with pytest.raises(TypeError, match="cannot show the str 'note'"):
        visuals.update(history, {"note": "text"}, 100)
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    assert len(events.Tensors("custom_scalars__config__")) == 1
    drawn = [0, 40, 80]
    for name in ["sensitivity", "ablation_zeta", "log_norm_product", "ablation_curves"]:
        assert [i.step for i in events.Images(f"gapwatch/figures/{name}")] == drawn
    histograms = events.Histograms("gapwatch/histograms/jacobian_norm")
    assert [h.step for h in histograms] == [0, 20, 40, 60, 80]
    assert histograms[-1].histogram_value.max == pytest.approx(5 * norms.max().item())


def test_visuals_only_for_a_tensorboard_logger(tmp_path):
    csv = CSVLogger(tmp_path)
    board = TensorBoardLogger(tmp_path)
    assert Visuals.of(Trainer(logger=csv, accelerator="cpu"), "g/", 1) is None
    assert Visuals.of(Trainer(logger=False, accelerator="cpu"), "g/", 1) is None
    visuals = Visuals.of(Trainer(logger=[csv, board], accelerator="cpu"), "g/", 1)
    assert visuals is not None
    assert visuals.logger is board


def test_standard_errors_and_their_bands_are_not_proxies():
    metrics = {**_history(1)[0], "sensitivity_se": 1e-6, "bands/sensitivity/lower": 0.0}
    assert "sensitivity_se" not in proxy_names(metrics)
    assert not [n for n in proxy_names(metrics) if n.startswith("bands/")]
    assert not [n for n in correlations([*_history(), metrics]) if n.endswith("_se")]


def test_a_quantity_with_an_error_is_a_margin_chart_of_its_band():
    metrics = {"test_loss": 0.5, "test_loss_se": 0.1, "sensitivity": 1e-4}
    charts = layout(metrics, "gw/")["gw: sensitivity"]
    assert charts == {
        "sensitivity": ["Multiline", ["gw/sensitivity$"]],
        "test_loss": [
            "Margin",
            ["gw/test_loss", "gw/bands/test_loss/lower", "gw/bands/test_loss/upper"],
        ],
    }
    assert band_edges(metrics) == {
        "bands/test_loss/lower": pytest.approx(0.4),
        "bands/test_loss/upper": pytest.approx(0.6),
    }
    assert band_edges({"x": 1.0, "x_se": math.nan}) == {}
