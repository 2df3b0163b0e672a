"""TensorBoard visuals and running correlations in real runs, read back from the event files."""

from __future__ import annotations

import csv
import math
import re
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2
from torchmetrics.functional import kendall_rank_corrcoef

from gapwatch import GeneralizationMonitor
from gapwatch._correlations import proxy_names
from gapwatch.callbacks.jacobian_norm import JacobianProxy
from tests.conftest import own_warnings

from .conftest import fit, read_scalars

EPOCHS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The default suite for 3 epochs, logging to TensorBoard and CSV at once."""
    root = tmp_path_factory.mktemp("visuals")
    board = TensorBoardLogger(root, name="tb", default_hp_metric=False)
    table = CSVLogger(root, name="csv")
    monitor = GeneralizationMonitor(probe_size=128)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, model = fit(root, [monitor], logger=[board, table], max_epochs=EPOCHS)
    events = EventAccumulator(
        board.log_dir, size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0}
    )
    events.Reload()
    return {
        "monitor": monitor,
        "model": model,
        "events": events,
        "scalars": read_scalars(board.log_dir),
        "csv": Path(table.log_dir) / "metrics.csv",
        "warnings": own_warnings(caught),
        "root": root,
    }


def _steps(run) -> list[int]:
    return [int(h["step"]) for h in run["monitor"].history]


def test_no_warnings_and_no_pyplot_figures_left_open(run):
    assert run["warnings"] == []
    assert plt.get_fignums() == []


def test_custom_scalars_layout_written_once_one_chart_per_quantity(run):
    [event] = run["events"].Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])

    def tags(chart):
        if chart.WhichOneof("content") == "margin":  # a value and its standard-error band
            (series,) = chart.margin.series
            return ["margin", series.value, series.lower, series.upper]
        return list(chart.multiline.tag)

    categories = {
        category.title: {chart.title: tags(chart) for chart in category.chart}
        for category in layout.category
    }
    final = run["monitor"].history[-1]
    proxies = proxy_names(final)
    assert len(proxies) == 13

    def expected(name):
        if name + "_se" in final:
            band = f"gapwatch/bands/{name}/"
            return ["margin", f"gapwatch/{name}", band + "lower", band + "upper"]
        return [f"gapwatch/{name}$"]

    for proxy in proxies:
        assert categories.pop(f"gapwatch: {proxy}") == {
            proxy: expected(proxy),
            "test_loss": expected("test_loss"),
        }
    accuracy = categories.pop("gapwatch: accuracy and gap")
    assert list(accuracy) == ["train_acc", "test_acc", "gap", "train_loss", "test_loss"]
    tau = categories.pop("gapwatch: kendall tau with test_loss")
    assert tau == {f"corr/{p}": [f"gapwatch/corr/{p}$"] for p in proxies}
    assert categories == {}


def test_a_trail_figure_per_proxy_and_the_ablation_curves_first_and_last(run):
    # The default draws every 10th evaluation and the fit's last: here the first and last.
    events, steps = run["events"], _steps(run)
    assert len(steps) == 1 + EPOCHS
    names = [*proxy_names(run["monitor"].history[-1]), "ablation_curves"]
    assert sorted(events.Tags()["images"]) == sorted(f"gapwatch/figures/{n}" for n in names)
    for name in names:
        images = events.Images(f"gapwatch/figures/{name}")
        # Prediction changes need a previous evaluation: none at the first.
        drawn = steps[-1:] if name == "prediction_changes" else [steps[0], steps[-1]]
        assert [image.step for image in images] == drawn, name
        assert all(image.encoded_image_string.startswith(b"\x89PNG") for image in images)


def test_histogram_of_per_sample_jacobian_norms_at_every_evaluation(run):
    histograms = run["events"].Histograms("gapwatch/histograms/jacobian_norm")
    assert [h.step for h in histograms] == _steps(run)
    last = histograms[-1].histogram_value
    [jacobian] = [p for p in run["monitor"].proxies if isinstance(p, JacobianProxy)]
    norms = jacobian.last_norms
    assert last.num == len(norms) == 128
    assert last.sum == pytest.approx(norms.sum().item(), rel=1e-5)
    assert last.min == pytest.approx(norms.min().item())


def test_hparams_entry_has_the_settings_and_the_final_values_as_metrics(run):
    content = run["events"].PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]
    ).session_start_info
    hparams = dict(start.hparams)
    assert hparams["gapwatch/probe_size"].number_value == 128
    assert hparams["gapwatch/heldout"].string_value == "val"
    assert hparams["gapwatch/jacobian.method"].string_value == "projection"
    assert hparams["gapwatch/ablation.layer"].string_value == "net.5"
    assert hparams["width"].number_value == 8  # the module's own, saved by Lightning
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/experiment"]
    ).experiment
    metrics = {info.name.tag for info in experiment.metric_infos}
    final = run["monitor"].history[-1]
    assert metrics == {f"gapwatch/{n}" for n in final if n != "step"}
    last = _steps(run)[-1]
    for name in metrics:
        assert run["scalars"][name][last] == pytest.approx(final[name.removeprefix("gapwatch/")])


def test_every_point_is_written_once_also_at_fit_end(run):
    # The hparams entry names the metrics; it must not log their final values again.
    for tag in run["events"].Tags()["scalars"]:
        steps = [event.step for event in run["events"].Scalars(tag)]
        assert len(steps) == len(set(steps)), tag


def test_running_kendall_correlations_from_the_second_evaluation(run):
    scalars, steps = run["scalars"], _steps(run)
    for proxy in proxy_names(run["monitor"].history[-1]):
        tag = f"gapwatch/corr/{proxy}"
        assert 0 not in scalars.get(tag, {}), tag
        for k, step in enumerate(steps[1:], start=2):
            # Over the evaluations where the proxy has a value (prediction changes are not
            # logged at the first).
            values = scalars[f"gapwatch/{proxy}"]
            seen = [s for s in steps[:k] if math.isfinite(values.get(s, math.nan))]
            if len(seen) < 2:
                assert step not in scalars.get(tag, {}), (tag, step)
                continue
            expected = kendall_rank_corrcoef(
                torch.tensor([scalars[f"gapwatch/{proxy}"][s] for s in seen]),
                torch.tensor([scalars["gapwatch/test_loss"][s] for s in seen]),
            ).item()
            if math.isnan(expected):  # a constant series: tau is undefined and not logged
                assert step not in scalars.get(tag, {}), (tag, step)
            else:
                assert scalars[tag][step] == pytest.approx(expected, abs=1e-6), (tag, step)
    assert any(name.startswith("gapwatch/corr/") for name in scalars)


def test_csv_logger_in_the_same_run_gets_every_scalar(run):
    with run["csv"].open() as file:
        columns = set(next(csv.reader(file)))
    gapwatch_tags = {tag for tag in run["scalars"] if tag.startswith("gapwatch/")}
    # The band edges only draw TensorBoard's margin charts; the errors themselves are here.
    assert {tag for tag in gapwatch_tags if not tag.startswith("gapwatch/bands/")} <= columns
    assert "gapwatch/test_loss_se" in columns


def test_csv_logger_alone_writes_scalars_and_correlations_quietly(tmp_path, caplog):
    logger = CSVLogger(tmp_path, name="csv")
    monitor = GeneralizationMonitor(probe_size=64, ablation=False, normalized_loss=False)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("INFO"):
        warnings.simplefilter("always")
        fit(tmp_path, [monitor], logger=logger, max_epochs=2)
    assert own_warnings(caught) == []
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
    with (Path(logger.log_dir) / "metrics.csv").open() as file:
        columns = next(csv.reader(file))
    assert {"gapwatch/sensitivity", "gapwatch/corr/sensitivity"} <= set(columns)
    # The fit-end table: one line per proxy with its final value and correlation.
    [table] = [r.message for r in caplog.records if r.message.startswith("gapwatch after 3")]
    # ... and what monitoring cost: its seconds and their share of the fit's.
    cost = table.splitlines()[-1]
    assert re.fullmatch(r"gapwatch took \d+\.\d s of the fit's \d+\.\d s \(\d+\.\d%\), "
                        r"3 evaluations and the set-up\.", cost), cost  # fmt: skip
    assert max(map(len, table.splitlines())) <= 100
    final = monitor.history[-1]
    for proxy in proxy_names(final):
        tau = final.get(f"corr/{proxy}")
        assert f"{final[proxy]:.4g}" in table
        assert ("-" if tau is None else f"{tau:+.3f}") in table


def test_training_is_bitwise_identical_with_visuals_on(run, tmp_path):
    _, plain = fit(tmp_path, [], max_epochs=EPOCHS)
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), run["model"].state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), f"{name} differs"


@pytest.mark.parametrize("every", [0, 2])
def test_figures_every_n_evaluations(tmp_path, every):
    board = TensorBoardLogger(tmp_path, name="tb")
    monitor = GeneralizationMonitor(
        probe_size=64, jacobian=False, figures_every_n_evaluations=every
    )
    fit(tmp_path, [monitor], logger=board, max_epochs=3)
    events = EventAccumulator(board.log_dir, size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    if every == 0:
        assert tags == []
    else:
        evaluated = [int(h["step"]) for h in monitor.history]
        assert len(evaluated) == 4
        # Every 2nd evaluation, and the last, which the fit's end draws.
        drawn = [evaluated[0], evaluated[2], evaluated[3]]
        assert [i.step for i in events.Images("gapwatch/figures/sensitivity")] == drawn


def test_negative_figures_every_n_evaluations_is_rejected():
    with pytest.raises(ValueError, match="0: no figures"):
        GeneralizationMonitor(figures_every_n_evaluations=-1)


def test_a_logger_that_writes_the_placeholder_gets_one_warning_naming_the_fix(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")  # default_hp_metric=True
    monitor = GeneralizationMonitor(probe_size=32, ablation=False, figures_every_n_evaluations=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, [monitor], logger=logger, max_epochs=1, limit_train_batches=2)
    [warning] = own_warnings(caught)
    assert "placeholder hparams entry" in warning
    assert "TensorBoardLogger(..., default_hp_metric=False)" in warning
