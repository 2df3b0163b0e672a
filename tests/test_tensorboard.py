"""gapwatch.tensorboard: the custom-scalars layout and what Visuals writes to a run."""

from __future__ import annotations

import math
import re

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gapwatch._correlations import band_edges, proxy_names
from gapwatch.tensorboard import Visuals, layout
from tests.test_correlations import _history
from tests.test_figures import _ablation


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


def test_the_fits_end_draws_the_last_evaluation_once(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    visuals = Visuals(logger, "gapwatch/", every_n_evaluations=2)
    history = _history(4)  # steps 0, 20, 40, 60: drawn at 0 and 40 on the way
    for k, h in enumerate(history):
        visuals.update(history[: k + 1], {"ablation_curves": _ablation()}, int(h["step"]))
    visuals.finish({"gapwatch/seed": 0}, history)
    visuals.finish({"gapwatch/seed": 0}, history)  # a second end draws nothing more
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    for name in ["sensitivity", "ablation_curves"]:
        assert [i.step for i in events.Images(f"gapwatch/figures/{name}")] == [0, 40, 60]


def test_visuals_only_for_a_tensorboard_logger(tmp_path):
    csv = CSVLogger(tmp_path)
    board = TensorBoardLogger(tmp_path)
    assert Visuals.of(Trainer(logger=csv, accelerator="cpu"), "g/", 1) is None
    assert Visuals.of(Trainer(logger=False, accelerator="cpu"), "g/", 1) is None
    visuals = Visuals.of(Trainer(logger=[csv, board], accelerator="cpu"), "g/", 1)
    assert visuals is not None
    assert visuals.logger is board


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
