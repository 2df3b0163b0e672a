"""Hardening: a gapwatch callback runs inside someone else's expensive training job.

It must never be the reason that job crashes, slows down over time or reports wrong
numbers. Here, in real runs on digits:

* bad input fails before the first optimizer step, with an error that names the fix;
* numerical trouble mid-training (NaN weights, overflowing logits, a product of layer
  norms beyond float64) is logged as NaN, or as the finite value the math gives, with one
  warning, and training goes on;
* a long run keeps its time and memory per evaluation flat and its history compact;
* an interrupted run leaves no hook, mode change, gradient or random state behind.
"""

from __future__ import annotations

import copy
import csv
import gc
import math
import os
import pickle
import signal
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from gapwatch import (
    GeneralizationMonitor,
    JacobianNorm,
    NormalizedLoss,
    OutputSensitivity,
    Transitions,
    UnitAblation,
)
from gapwatch.demo import DigitsClassifier, DigitsDataModule, digits_mlp
from gapwatch.functional import (
    jacobian_norm,
    normalized_cross_entropy,
    output_sensitivity,
    transitions,
    unit_ablation,
)
from tests.conftest import own_warnings

from .conftest import back_on_device, make_trainer, read_scalars

# -- models and data that go wrong in one way each -------------------------------------


class _Wrapped(DigitsClassifier):
    """A classifier whose forward hides its logits where gapwatch does not look for them.

    (A tuple with the logits first, or a dict with "logits", is read as it is.)
    """

    def __init__(self, container: type) -> None:
        super().__init__(width=8)
        self.container = container

    def forward(self, x: Tensor) -> Any:
        logits = self.net(x)
        return (x.shape, logits) if self.container is tuple else {"scores": logits}


class _Regressor(DigitsClassifier):
    """Digits as a regression on the label's value: one output, mean squared error."""

    def __init__(self) -> None:
        super().__init__(arch="mlp", width=8)
        self.net[-1] = nn.Linear(8, 1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x).view(-1), y.view(-1))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x).view(-1), y.view(-1)))


class _Tokens(DigitsClassifier):
    """An MLP over the 8x8 pixels as a sequence of one token: its hidden layer is 3-D."""

    def __init__(self) -> None:
        super().__init__(width=8)
        self.net = nn.Sequential(
            nn.Flatten(2), nn.Linear(64, 16), nn.ReLU(), nn.Flatten(), nn.Linear(16, 10)
        )


class _Residual(DigitsClassifier):
    """The digits MLP with a skip connection around its hidden layer."""

    def __init__(self) -> None:
        super().__init__(arch="mlp", width=8)
        self.skip = nn.Linear(64, 8)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        return self.net[-1](F.relu(self.net[1](flat)) + self.skip(flat))


class _Keyed(Dataset):
    """Samples ``({"pixels": x}, y)``: inputs nested one level deeper than gapwatch looks."""

    def __init__(self, inputs: Tensor, labels: Tensor) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[dict[str, Tensor], Tensor]:
        return {"pixels": self.inputs[index]}, self.labels[index]


class _Digits(DigitsDataModule):
    """Digits with each split's ``(inputs, labels)`` turned into another data set."""

    def __init__(self, change: Callable[[Tensor, Tensor], Dataset]) -> None:
        super().__init__()
        self.change = change

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.train_set, self.val_set = (
            self.change(*split.tensors) for split in (self.train_set, self.val_set)
        )


class _Mapped(Dataset):
    """Samples ``{"x": x, "label": y}``: the labels under a key gapwatch does not guess."""

    def __init__(self, inputs: Tensor, labels: Tensor) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"x": self.inputs[index], "label": self.labels[index]}


class _MappedClassifier(DigitsClassifier):
    """The digits classifier on ``{"x", "label"}`` batches."""

    def __init__(self) -> None:
        super().__init__(width=8)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch["x"]), batch["label"])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self(batch["x"]), batch["label"]))


def _values(x: Tensor, y: Tensor) -> Dataset:
    return TensorDataset(x, y.float())


def _one_hot(x: Tensor, y: Tensor) -> Dataset:
    return TensorDataset(x, F.one_hot(y, 10).float())


def _three_classes(x: Tensor, y: Tensor) -> Dataset:
    return TensorDataset(x[y < 3], y[y < 3])


def _fit(
    tmp_path: Path,
    callbacks: list[Callback],
    model: LightningModule,
    data: DigitsDataModule | None = None,
    **options: Any,
) -> Trainer:
    trainer = make_trainer(tmp_path, callbacks=callbacks, **options)
    trainer.fit(model, datamodule=data if data is not None else DigitsDataModule())
    back_on_device(model)
    return trainer


# -- bad input fails before the first optimizer step, naming the fix -------------------


def _case(
    name: str,
    callback: Callable[[], Callback],
    model: Callable[[], LightningModule],
    data: Callable[[], DigitsDataModule],
    error: type[Exception],
    fix: str,
    **marks: Any,
) -> Any:
    return pytest.param(callback, model, data, error, fix, id=name, **marks)


def _probe_16(kind: Callable[..., Callback], **kwargs: Any) -> Callable[[], Callback]:
    return lambda: kind(probe_size=16, **kwargs)


def _classifier() -> LightningModule:
    return DigitsClassifier(width=8)


BAD_SETUPS = [
    _case(
        "model returns a tuple",
        _probe_16(OutputSensitivity),
        lambda: _Wrapped(tuple),
        DigitsDataModule,
        TypeError,
        r"returned tuple.*`model_attr=`.*`get_model`",
    ),
    _case(
        "model returns a dict",
        _probe_16(OutputSensitivity),
        lambda: _Wrapped(dict),
        DigitsDataModule,
        TypeError,
        r"returned dict.*`model_attr=`.*`get_model`",
    ),
    _case(
        "model_attr names no submodule",
        _probe_16(OutputSensitivity, model_attr="body"),
        _classifier,
        DigitsDataModule,
        AttributeError,
        r"`model_attr='body'` names no submodule",
    ),
    _case(
        "inputs nested in the batch",
        _probe_16(OutputSensitivity),
        _classifier,
        lambda: _Digits(_Keyed),
        TypeError,
        r"override `split_batch",
    ),
    _case(
        "one-hot targets",
        _probe_16(OutputSensitivity),
        _classifier,
        lambda: _Digits(_one_hot),
        ValueError,
        r"\(16, 10\).*one target per sample.*y\.argmax\(1\).*\(x, None\)",
    ),
    _case(
        "held-out test data that does not exist",
        _probe_16(OutputSensitivity, heldout="test"),
        _classifier,
        DigitsDataModule,
        ValueError,
        r"`heldout='test'` needs a `test_dataloader\(\)`",
    ),
    _case(
        "transitions of flat inputs",
        _probe_16(Transitions),
        lambda: DigitsClassifier(arch="mlp", width=8),
        lambda: DigitsDataModule(flatten=True),
        ValueError,
        r"image inputs \[N, C, H, W\].*x\.view",
    ),
    _case(
        "ablation layer that does not exist",
        _probe_16(UnitAblation, layer="net.99"),
        _classifier,
        DigitsDataModule,
        ValueError,
        r"'net\.99'.*Valid paths: net, net\.0",
    ),
    _case(
        "ablation of the output layer",
        _probe_16(UnitAblation, layer="net.9"),
        _classifier,
        DigitsDataModule,
        ValueError,
        r"`layer='net\.9'` is the model's output layer.*`layer=None`",
    ),
    _case(
        "ablation layer with a 3-D output",
        _probe_16(UnitAblation, layer="net.2"),
        _Tokens,
        DigitsDataModule,
        ValueError,
        r"\(2, 1, 16\).*\[N, F\].*another layer",
    ),
    _case(
        "regression: softmax Jacobian",
        _probe_16(JacobianNorm),
        _Regressor,
        lambda: _Digits(_values),
        ValueError,
        r"K >= 2.*one output; for a regression model pass `output='logits'`",
    ),
    _case(
        "layerwise normalization of a residual network",
        _probe_16(NormalizedLoss, mode="layerwise"),
        lambda: _Residual(),
        DigitsDataModule,
        ValueError,
        r"not a chain of layers.*Use `mode='output'`.*or `mode='auto'`",
    ),
    _case(
        "layerwise normalization of a residual network in the suite",
        _probe_16(GeneralizationMonitor, normalization="layerwise"),
        lambda: _Residual(),
        DigitsDataModule,
        ValueError,
        r"not a chain of layers.*Use `normalization='output'`.*or `normalization='auto'`",
    ),
    _case(
        "dict batches whose labels are under another key",
        _probe_16(UnitAblation),
        _MappedClassifier,
        lambda: _Digits(_Mapped),
        ValueError,
        r"keys \['x', 'label'\]: set `target_key=` to the key of the labels",
    ),
    _case(
        "regression: normalized loss",
        _probe_16(NormalizedLoss),
        _Regressor,
        lambda: _Digits(_values),
        ValueError,
        r"K >= 2.*OutputSensitivity or JacobianNorm\(output='logits'\)",
    ),
    _case(
        "regression: unit ablation",
        _probe_16(UnitAblation),
        _Regressor,
        lambda: _Digits(_values),
        ValueError,
        r"K >= 2.*OutputSensitivity or JacobianNorm\(output='logits'\)",
    ),
    _case(
        "regression targets for a classifier's normalized loss",
        _probe_16(NormalizedLoss),
        _classifier,
        lambda: _Digits(_values),
        TypeError,
        r"reads the labels as class indices.*integer labels",
    ),
]


@pytest.mark.parametrize(("callback", "model", "data", "error", "fix"), BAD_SETUPS)
def test_bad_setup_fails_before_the_first_step_naming_the_fix(
    tmp_path, callback, model, data, error, fix
):
    seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, callbacks=[callback()], max_epochs=1)
    with pytest.raises(error, match=fix):
        trainer.fit(model(), datamodule=data())
    assert trainer.global_step == 0


@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
def test_a_model_converted_from_float32_fails_before_the_first_step(tmp_path, precision):
    seed_everything(0, verbose=False)
    callback = GeneralizationMonitor(probe_size=32)
    trainer = make_trainer(tmp_path, callbacks=[callback], max_epochs=1, precision=precision)
    with pytest.raises(ValueError, match=r"float32.*precision='bf16-mixed'"):
        trainer.fit(DigitsClassifier(width=8), datamodule=DigitsDataModule())
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    ("make", "fix"),
    [
        (lambda: GeneralizationMonitor(sigma=-0.1), "`sigma` must be a positive, finite number"),
        (lambda: OutputSensitivity(sigma=math.inf), "`sigma` must be a positive, finite number"),
        (lambda: UnitAblation(gap_coefficients=(1, 2, "x")), r"three numbers \(a, b, c\)"),
        (lambda: GeneralizationMonitor(every_n_epochs=-1), "`every_n_epochs`"),
        (lambda: GeneralizationMonitor(jacobian_method="svd"), "'projection', 'exact'"),
        (lambda: JacobianNorm(output="probabilities"), "'softmax', 'logits'"),
        (lambda: NormalizedLoss(mode="spectral"), "'layerwise', 'output'"),
        (lambda: GeneralizationMonitor(normalization="spectral"), "'layerwise', 'output'"),
        (lambda: NormalizedLoss(p=0), "`p` must be a positive number or math.inf"),
        (lambda: OutputSensitivity(num_draws=0), "`num_draws` must be a positive integer"),
        (lambda: Transitions(num_points=0), "`num_points` must be a positive integer"),
        (lambda: UnitAblation(max_classes=0), "`max_classes` must be a positive integer"),
        (lambda: UnitAblation(gap_coefficients=(1.0, 2.0)), r"three numbers \(a, b, c\)"),
    ],
)
def test_bad_arguments_fail_in_init_naming_the_fix(make, fix):
    with pytest.raises(ValueError, match=fix):
        make()


def test_a_seed_that_is_not_an_integer_fails_in_init():
    with pytest.raises(TypeError, match=r"`seed` must be an integer, got 'abc'"):
        GeneralizationMonitor(seed="abc")


def test_the_suite_on_a_regression_model_runs_what_applies(tmp_path, caplog):
    monitor = GeneralizationMonitor(probe_size=64)
    model = _Regressor()
    seed_everything(0, verbose=False)
    with caplog.at_level("INFO"):
        _fit(tmp_path, [monitor], model, _Digits(_values), max_epochs=1, limit_train_batches=3)
    final = monitor.history[-1]
    logged = {n for n in final if not n.startswith("corr/")}
    values = {"test_loss", "train_loss", "sensitivity", "jacobian_norm"}
    se = {f"{n}_se" for n in values}
    assert logged == {"step", *values, *se, "distance_from_init"}
    assert all(math.isfinite(v) for v in final.values())
    skipped = [r.message for r in caplog.records if r.message.startswith("gapwatch: skipping")]
    assert [m.split(":")[1].strip() for m in skipped] == [
        "skipping NormalizedLoss",
        "skipping Margin",
        "skipping PredictionChanges",
        "skipping Ablation",
    ]
    assert all("K >= 2" in m for m in skipped)
    # With one output the row-sampling projection always draws that row: it is exact.
    expected = jacobian_norm(model, monitor._probes.heldout.inputs, output="logits", method="exact")
    assert final["jacobian_norm"] == pytest.approx(expected.item(), rel=1e-5)


def test_regression_column_targets_give_the_mean_squared_error(tmp_path):
    # A [N, 1] target against a [N] output would broadcast to [N, N] pairs.
    callback = OutputSensitivity(probe_size=64)
    seed_everything(0, verbose=False)
    model = _Regressor()
    column = _Digits(lambda x, y: TensorDataset(x, y.float()[:, None]))
    _fit(tmp_path, [callback], model, column, max_epochs=1, limit_train_batches=2)
    probe = callback._probes.heldout
    model.eval()
    with torch.no_grad():
        expected = F.mse_loss(model(probe.inputs).view(-1), probe.targets.float())
    assert callback.history[-1]["test_loss"] == pytest.approx(expected.item(), rel=1e-5)


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    """A 10-output classifier trained on digits 0, 1 and 2 only, with unit ablation."""
    callback = UnitAblation(probe_size=64)
    seed_everything(0, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(
            tmp_path_factory.mktemp("three_classes"),
            [callback],
            DigitsClassifier(width=8),
            _Digits(_three_classes),
            max_epochs=2,
            limit_train_batches=2,
        )
    return callback, caught


def test_ablation_averages_over_the_classes_present(three_classes):
    callback, _ = three_classes
    assert callback.proxies[-1].last_result.classes.tolist() == [0, 1, 2]
    for row in callback.history:
        assert math.isfinite(row["ablation_zeta"])
        assert math.isfinite(row["ablation_kappa"])


def test_ablation_warns_once_about_classes_absent_from_the_probe(three_classes):
    _, caught = three_classes
    absent = [str(w.message) for w in caught if "no samples" in str(w.message)]
    assert len(absent) == 1
    assert "[3, 4, 5, 6, 7, 8, 9]" in absent[0]


# -- numerical trouble mid-training is logged, never raised ----------------------------


class _Diverging(DigitsClassifier):
    """A run that diverges: from ``nan_from_step`` on the loss, then every weight, is NaN."""

    def __init__(self, nan_from_step: int) -> None:
        super().__init__(width=8)
        self.nan_from_step = nan_from_step

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if self.global_step >= self.nan_from_step else loss


_ACCURACIES = ("train_acc", "test_acc", "gap")


def _suite() -> GeneralizationMonitor:
    # 128 probes hold every digit class, so no absent-class warning mixes in.
    return GeneralizationMonitor(
        transitions=True, max_images=2, num_points=8, probe_size=128, figures_every_n_evaluations=0
    )


def _metric_names(row: dict[str, float]) -> list[str]:
    return [n for n in row if n != "step" and not n.startswith("corr/")]


def _diverge(tmp_path: Path, logger: Any) -> tuple[Trainer, GeneralizationMonitor, list]:
    """Three epochs of three steps; the fourth step's loss is NaN, and every weight after it."""
    monitor = _suite()
    seed_everything(0, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(
            tmp_path, [monitor], _Diverging(3), max_epochs=3, limit_train_batches=3, logger=logger
        )
    return trainer, monitor, caught


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("diverged")
    logger = CSVLogger(tmp_path, name="csv")
    return (*_diverge(tmp_path, logger), Path(logger.log_dir))


def test_nan_weights_are_logged_as_nan_with_one_warning_and_training_goes_on(diverged):
    trainer, monitor, caught, log_dir = diverged
    assert trainer.global_step == 9
    assert [int(row["step"]) for row in monitor.history] == [0, 2, 5, 8]
    healthy, broken = monitor.history[1], monitor.history[-1]
    names = [n for n in _metric_names(broken) if n not in _ACCURACIES]
    assert all(math.isfinite(healthy[n]) for n in names)
    assert [n for n in names if not math.isnan(broken[n])] == []
    (warning,) = own_warnings(caught)
    assert "non-finite values at step 5" in warning
    with (log_dir / "metrics.csv").open() as file:
        logged = [row for row in csv.DictReader(file) if row["gapwatch/transitions"]]
    assert [row["step"] for row in logged] == ["0", "2", "5", "8"]
    assert all(row[f"gapwatch/{n}"] == "nan" for row in logged[2:] for n in names)


def test_nan_logits_have_no_accuracy(diverged):
    _, monitor, _, _ = diverged
    assert all(math.isnan(monitor.history[-1][n]) for n in _ACCURACIES)


def test_nan_weights_with_a_tensorboard_logger(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    _, _, caught = _diverge(tmp_path, logger)
    assert len(own_warnings(caught)) == 1
    scalars = read_scalars(logger.log_dir)
    assert math.isnan(scalars["gapwatch/sensitivity"][8])


def test_early_stopping_stops_on_a_nan_proxy_with_its_own_reason(tmp_path):
    stopper = EarlyStopping("gapwatch/normalized_train_loss", patience=100, check_finite=True)
    monitor = GeneralizationMonitor(jacobian=False, ablation=False, probe_size=32)
    seed_everything(0, verbose=False)
    _fit(tmp_path, [monitor, stopper], _Diverging(3), max_epochs=5, limit_train_batches=3)
    assert stopper.stopping_reason == EarlyStoppingReason.NON_FINITE_METRIC
    assert "gapwatch/normalized_train_loss = nan is not finite" in stopper.stopping_reason_message
    assert stopper.stopped_epoch == 1


def _seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


FUNCTIONAL: dict[str, Callable[[nn.Module, Tensor, Tensor], Tensor]] = {
    "output_sensitivity": lambda m, x, y: output_sensitivity(m, x, generator=_seeded()),
    "jacobian_softmax": lambda m, x, y: jacobian_norm(m, x, generator=_seeded()),
    "jacobian_logits": lambda m, x, y: jacobian_norm(m, x, output="logits", method="exact"),
    "normalized_cross_entropy": lambda m, x, y: normalized_cross_entropy(m, x, y),
    "unit_ablation": lambda m, x, y: unit_ablation(m, "5", x, y, num_classes=10).zeta,
    "transitions": lambda m, x, y: transitions(m, x[:2], num_points=8),
}


@pytest.mark.parametrize("name", FUNCTIONAL)
@pytest.mark.parametrize("where", ["a weight", "an input"])
def test_functional_proxies_give_nan_not_a_number_where_the_model_gives_nan(
    name, where, cnn, digits
):
    # ReLU passes no gradient back from a NaN and a NaN is above no region boundary:
    # without care, the Jacobian, transitions and ablation would turn NaN into numbers.
    inputs, labels = digits[0][:24].clone(), digits[1][:24]
    with torch.no_grad():
        if where == "a weight":
            cnn[0].weight[0, 0, 0, 0] = math.nan
        else:
            inputs[0, 0, 3, 3] = math.nan
    assert math.isnan(FUNCTIONAL[name](cnn, inputs, labels))


@pytest.mark.parametrize("name", FUNCTIONAL)
def test_functional_proxies_survive_overflowing_outputs(name, cnn, digits):
    with torch.no_grad():
        cnn[-1].weight.mul_(1e38)  # logits overflow float32 to +-inf
    inputs, labels = digits
    assert FUNCTIONAL[name](cnn, inputs[:64], labels[:64]).ndim == 0


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def test_product_of_layer_norms_beyond_float64_stays_in_log_space(tmp_path):
    # Nine hidden layers, each with a unit that ReLU keeps dead (its inputs are never
    # negative): rho_k is about 4e36 for each, so rho is far beyond float64, while the
    # network computes, and trains, as if those units were not there.
    seed_everything(0, verbose=False)
    model = DigitsClassifier(arch="mlp", width=16)
    model.net = digits_mlp(16, depth=10)
    with torch.no_grad():
        for layer in _linears(model)[1:-1]:
            layer.weight[0] = -1e36
            layer.bias[0] = 0.0
    monitor = _suite()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, [monitor], model, max_epochs=1, limit_train_batches=2)
    assert not own_warnings(caught)
    final = monitor.history[-1]
    assert all(math.isfinite(final[n]) for n in _metric_names(final))
    assert final["log_norm_product"] > math.log(torch.finfo(torch.float64).max)
    # f / rho underflows to zero logits, whose cross-entropy is ln K.
    assert final["normalized_train_loss"] == pytest.approx(math.log(10), rel=1e-6)


def test_overflowing_logits_keep_a_finite_normalized_loss(tmp_path):
    # A bias-free ReLU MLP with every weight times c computes c^3 f: f overflows float32,
    # while the weight-normalized network is the same as before.
    seed_everything(0, verbose=False)
    reference = DigitsClassifier(arch="mlp", width=8)
    for layer in _linears(reference):
        nn.init.zeros_(layer.bias)
    model = copy.deepcopy(reference)
    with torch.no_grad():
        for layer in _linears(model):
            layer.weight.mul_(1e15)
    monitor = NormalizedLoss(probe_size=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, [monitor], model, max_epochs=1, limit_train_batches=2)
    first = monitor.history[0]
    assert not math.isfinite(first["test_loss"])
    for role, probe in (("train", monitor._probes.train), ("test", monitor._probes.heldout)):
        expected = normalized_cross_entropy(reference, probe.inputs, probe.targets)
        assert first[f"normalized_{role}_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert len(own_warnings(caught)) == 1


# -- a long run: flat time and memory per evaluation, a compact history ----------------


def _resident_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors() -> int:
    gc.collect()
    return sum(isinstance(obj, Tensor) for obj in gc.get_objects())


class _Timed(GeneralizationMonitor):
    """The suite, recording the CPU seconds and resident memory of each evaluation.

    CPU time of this thread, not wall time: other processes on the machine do not count.
    """

    def __init__(self, census_at: tuple[int, ...], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.census_at = census_at
        self.seconds: list[float] = []
        self.resident: list[int] = []
        self.tensors: list[int] = []

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        done, start = len(self.history), time.thread_time()
        super()._evaluate(trainer, pl_module)
        if len(self.history) > done:
            self.seconds.append(time.thread_time() - start)
            self.resident.append(_resident_bytes())
            if len(self.history) in self.census_at:
                self.tensors.append(_live_tensors())


#: The 100 evaluations after step 0 (which pays one-time costs): first and last quartile.
FIRST, LAST = slice(1, 26), slice(76, 101)


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """100 epochs of a small MLP with the full suite, logging to TensorBoard."""
    if not Path("/proc/self/statm").exists():
        pytest.skip("reads the resident memory from /proc (Linux)")
    tmp_path = tmp_path_factory.mktemp("long_run")
    monitor = _Timed(
        census_at=(FIRST.stop, LAST.stop),
        transitions=True,
        max_images=2,
        num_points=8,
        probe_size=32,
        figures_every_n_evaluations=50,
    )
    seed_everything(0, verbose=False)
    _fit(
        tmp_path,
        [monitor],
        DigitsClassifier(arch="mlp", width=8),
        max_epochs=100,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=TensorBoardLogger(tmp_path, name="run"),
    )
    assert len(monitor.history) == LAST.stop
    return monitor


@pytest.mark.slow
def test_long_run_time_per_evaluation_stays_flat(long_run):
    # A growth check, not a speed limit: a cost that grows with the number of evaluations
    # so far, as small as 1/100 of an evaluation per evaluation, shows between quartiles.
    early, late = (statistics.median(long_run.seconds[q]) for q in (FIRST, LAST))
    assert late < 1.5 * early, f"an evaluation went from {early:.3f} to {late:.3f} CPU seconds"


@pytest.mark.slow
def test_long_run_memory_stays_flat(long_run):
    early, late = (statistics.median(long_run.resident[q]) for q in (FIRST, LAST))
    assert late - early < 16 * 2**20, f"resident memory grew by {(late - early) / 2**20:.1f} MiB"
    assert long_run.tensors[1] - long_run.tensors[0] <= 8, "tensors accumulate"


@pytest.mark.slow
def test_long_run_history_is_compact(long_run):
    assert all(type(v) is float for row in long_run.history for v in row.values())
    assert len(pickle.dumps(long_run.state_dict())) / len(long_run.history) < 2048


# -- an interrupted run leaves the model as it found it --------------------------------


#: Where a run is interrupted: a test on the tripwire and how many passes meet it first.
PLACES: dict[str, tuple[Callable[[nn.Module], bool], int]] = {
    "training step": (lambda relu: relu.training, 3),
    # The ablation's layer search hooks every module during setup.
    "ablation setup": (lambda relu: bool(relu._forward_hooks), 1),
    "jacobian": (lambda relu: not relu.training and torch.is_grad_enabled(), 1),
    # Transitions hook each ReLU: once for the setup check, then at step 0.
    "transitions": (lambda relu: bool(relu._forward_pre_hooks), 2),
}


class _Tripwire(nn.ReLU):
    """A ReLU that raises ``error`` in the forward pass that reaches ``PLACES[where]``."""

    def __init__(self, where: str, error: BaseException) -> None:
        super().__init__()
        (self.at, self.times), self.error = PLACES[where], error
        self.seen = 0

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor):  # not while torch.fx traces
            self.seen += self.at(self)
            if self.seen == self.times:
                raise self.error
        return super().forward(x)


class _Snapshot(Callback):
    """What the model and the global RNG looked like when training started."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.training = [m.training for m in pl_module.modules()]
        self.rng = torch.get_rng_state()


@pytest.fixture
def restore_sigint():
    # Lightning ignores SIGINT after a KeyboardInterrupt; give Ctrl-C back to pytest.
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


@pytest.mark.usefixtures("restore_sigint")
@pytest.mark.parametrize("where", PLACES)
@pytest.mark.parametrize(
    ("error", "raised"),
    [(KeyboardInterrupt(), SystemExit), (RuntimeError("boom"), RuntimeError)],
    ids=["KeyboardInterrupt", "RuntimeError"],
)
def test_interrupted_run_leaves_no_hook_mode_or_gradient_behind(tmp_path, where, error, raised):
    seed_everything(0, verbose=False)
    model = DigitsClassifier(width=8)
    model.net[2] = _Tripwire(where, error)
    snapshot = _Snapshot()
    trainer = make_trainer(tmp_path, callbacks=[snapshot, _suite()], max_epochs=1)
    with pytest.raises(raised):
        trainer.fit(model, datamodule=DigitsDataModule())
    assert trainer.interrupted
    for name, module in model.named_modules():
        assert not module._forward_hooks, name
        assert not module._forward_pre_hooks, name
    assert [m.training for m in model.modules()] == snapshot.training
    if where != "training step":  # interrupted before the first backward pass
        assert trainer.global_step == 0
        assert all(p.grad is None for p in model.parameters())
        assert torch.equal(torch.get_rng_state(), snapshot.rng)


class _DrawingTripwire(_Tripwire):
    """A tripwire that also draws from the global RNG on every forward pass in eval mode."""

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor) and not self.training:
            torch.rand(1)
        return super().forward(x)


@pytest.mark.usefixtures("restore_sigint")
@pytest.mark.parametrize(
    ("error", "raised"),
    [(KeyboardInterrupt(), SystemExit), (RuntimeError("boom"), RuntimeError)],
    ids=["KeyboardInterrupt", "RuntimeError"],
)
def test_an_evaluation_interrupted_after_drawing_restores_the_global_rng(tmp_path, error, raised):
    # Lightning's isolate_rng restores the streams only when its block ends normally.
    seed_everything(0, verbose=False)
    model = DigitsClassifier(width=8)
    model.net[2] = _DrawingTripwire("jacobian", error)
    snapshot = _Snapshot()
    trainer = make_trainer(tmp_path, callbacks=[snapshot, _suite()], max_epochs=1)
    with pytest.raises(raised):
        trainer.fit(model, datamodule=DigitsDataModule())
    assert model.net[2].seen == 1  # it drew, then raised, inside the step-0 evaluation
    assert torch.equal(torch.get_rng_state(), snapshot.rng)
