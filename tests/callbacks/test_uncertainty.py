"""Standard errors of every logged mean, against per-sample values recomputed here."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from gapwatch import GeneralizationMonitor
from gapwatch._correlations import proxy_names, summary_table
from gapwatch.callbacks._proxy import sum_and_count
from gapwatch.callbacks._uncertainty import cluster_sums, mean_se, variance_and_se
from gapwatch.functional import jacobian_norm, transitions
from gapwatch.functional._draws import RowSeeds
from gapwatch.functional.sensitivity import noise_response
from tests.conftest import own_warnings

from .conftest import fit, read_scalars

MAX_IMAGES = 8


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The suite with transitions on digits for one short epoch, logged to TensorBoard."""
    root = tmp_path_factory.mktemp("uncertainty")
    board = TensorBoardLogger(root, name="tb", default_hp_metric=False)
    monitor = GeneralizationMonitor(
        probe_size=96, ablation=False, transitions=True, max_images=MAX_IMAGES
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, model = fit(root, [monitor], logger=board, max_epochs=2, limit_train_batches=4)
    model.eval()
    events = EventAccumulator(board.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {
        "monitor": monitor,
        "model": model,
        "final": monitor.history[-1],
        "scalars": read_scalars(board.log_dir),
        "events": events,
        "warnings": own_warnings(caught),
    }


def _se(values: torch.Tensor) -> float:
    values = values.double().flatten()
    return float(values.std(correction=1) / math.sqrt(values.numel()))


def _draws(probe) -> RowSeeds:
    return RowSeeds((0 << 26) + probe.row_ids)  # seed 0, as Context.draws keys them


def test_losses_accuracies_and_the_gap_carry_the_error_of_their_per_sample_values(run):
    probes, final, model = run["monitor"]._probes, run["final"], run["model"]
    errors = {}
    for role, probe in (("train", probes.train), ("test", probes.heldout)):
        with torch.no_grad():
            logits = model(probe.inputs)
        loss = F.cross_entropy(logits, probe.targets, reduction="none")
        correct = (logits.argmax(1) == probe.targets).double()
        assert final[f"{role}_loss_se"] == pytest.approx(_se(loss), rel=1e-4)
        assert final[f"{role}_acc_se"] == pytest.approx(_se(correct), rel=1e-6)
        errors[role] = _se(correct)
        assert 0 < final[f"{role}_loss_se"] < final[f"{role}_loss"]
    assert final["gap_se"] == pytest.approx(math.hypot(errors["train"], errors["test"]))


def test_jacobian_norm_and_transitions_carry_the_error_of_their_per_sample_values(run):
    probe, final, model = run["monitor"]._probes.heldout, run["final"], run["model"]
    norms = jacobian_norm(
        model, probe.inputs, num_projections=3, generator=_draws(probe), reduction="none"
    )
    assert final["jacobian_norm"] == pytest.approx(float(norms.mean()), rel=1e-5)
    assert final["jacobian_norm_se"] == pytest.approx(_se(norms), rel=1e-4)
    counts = transitions(model, probe.inputs[:MAX_IMAGES], reduction="none")
    assert final["transitions_se"] == pytest.approx(_se(counts), rel=1e-6)


def test_normalized_losses_carry_the_error_of_their_per_sample_values(run):
    probes, final, model = run["monitor"]._probes, run["final"], run["model"]
    factor = math.exp(-final["log_norm_product"])
    for role, probe in (("train", probes.train), ("test", probes.heldout)):
        with torch.no_grad():
            normalized = model(probe.inputs).double() * factor
        losses = F.cross_entropy(normalized, probe.targets, reduction="none")
        assert final[f"normalized_{role}_loss"] == pytest.approx(float(losses.mean()), rel=1e-9)
        # Their spread sits in the 5th decimal of values near ln 10: centred sums keep it.
        assert final[f"normalized_{role}_loss_se"] == pytest.approx(_se(losses), rel=1e-3)


def test_sensitivity_error_treats_each_input_as_the_unit(run):
    probe, final, model = run["monitor"]._probes.heldout, run["final"], run["model"]
    response = noise_response(model, probe.inputs, sigma=0.1, generator=_draws(probe))
    per_input = response.double().reshape(len(probe), -1)
    s = float(per_input.var(correction=0))
    assert final["sensitivity"] == pytest.approx(s, rel=1e-5)
    # The influence of each input on S, explicitly; and the jackknife over inputs.
    n, entries = per_input.shape[0], per_input.numel()
    influence = ((per_input - per_input.mean()).square() - s).sum(1)
    expected = math.sqrt(float(influence.square().sum()) * n / (n - 1)) / entries
    assert final["sensitivity_se"] == pytest.approx(expected, rel=1e-4)
    leave_out = torch.stack(
        [torch.cat([per_input[:i], per_input[i + 1 :]]).var(correction=0) for i in range(n)]
    )
    jackknife = math.sqrt((n - 1) / n * float((leave_out - leave_out.mean()).square().sum()))
    assert final["sensitivity_se"] == pytest.approx(jackknife, rel=0.05)


def test_values_without_a_per_sample_mean_carry_no_error(run):
    final = run["final"]
    for name in ("log_norm_product", "predicted_test_loss", "bias_fraction"):
        assert name + "_se" not in final


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_sums_over_shards_give_the_single_process_errors(world_size):
    generator = torch.Generator().manual_seed(0)
    values = 2.3 + 1e-6 * torch.randn(50, 3, generator=generator, dtype=torch.float64)
    whole_mean = sum_and_count("x", values[:, 0], center=2.3)
    responses = (values - 2.3) * 1e3  # like noise responses: centred, spread 1e-3
    whole_variance = sum_and_count("r", responses) | cluster_sums("r", responses)
    shards = [values[r::world_size] for r in range(world_size)]
    parts = [sum_and_count("x", s[:, 0], center=2.3) for s in shards]
    summed = {k: sum(p[k] for p in parts) for k in whole_mean}
    assert mean_se(summed, "x", 2.3) == pytest.approx(mean_se(whole_mean, "x", 2.3), rel=1e-9)
    assert mean_se(summed, "x", 2.3) == pytest.approx(_se(values[:, 0]), rel=1e-6)
    parts = [
        sum_and_count("r", responses[r::world_size]) | cluster_sums("r", responses[r::world_size])
        for r in range(world_size)
    ]
    summed = {k: sum(p[k] for p in parts) for k in whole_variance}
    variance, error = variance_and_se(summed, "r")
    assert (variance, error) == pytest.approx(variance_and_se(whole_variance, "r"), rel=1e-9)
    influence = ((responses - responses.mean()).square() - variance).sum(1)
    expected = math.sqrt(float(influence.square().sum()) * 50 / 49) / responses.numel()
    assert error == pytest.approx(expected, rel=1e-6)


def test_one_sample_has_no_error():
    stats = sum_and_count("x", torch.ones(1)) | cluster_sums("x", torch.ones(1, 2))
    assert math.isnan(mean_se(stats, "x"))
    assert math.isnan(variance_and_se(stats, "x")[1])


def test_each_error_is_a_band_in_a_margin_chart(run):
    [event] = run["events"].Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    margins = {
        chart.title: chart.margin.series[0]
        for category in layout.category
        for chart in category.chart
        if chart.WhichOneof("content") == "margin"
    }
    final, scalars = run["final"], run["scalars"]
    with_error = sorted(n.removesuffix("_se") for n in final if n.endswith("_se"))
    assert sorted(margins) == with_error
    for name, series in margins.items():
        assert series.value == f"gapwatch/{name}"
        # A band wherever the value and its error are logged and finite (prediction changes
        # are not logged at the first evaluation).
        shown = [
            h for h in run["monitor"].history if math.isfinite(h.get(name + "_se", math.nan))
        ]
        assert len(shown) >= len(run["monitor"].history) - 1, name
        for edge, sign in ((series.lower, -1), (series.upper, 1)):
            assert sorted(scalars[edge]) == [int(h["step"]) for h in shown], edge
            for h in shown:
                expected = h[name] + sign * h[name + "_se"]
                assert scalars[edge][int(h["step"])] == pytest.approx(expected, rel=1e-5)


def test_errors_are_not_proxies(run):
    final = run["final"]
    assert not [n for n in proxy_names(final) if n.endswith("_se")]
    assert not [n for n in final if n.startswith("corr/") and n.endswith("_se")]
    assert "_se" not in summary_table(run["monitor"].history)
    assert run["warnings"] == []
