import importlib
import inspect
import pkgutil

import pytest
import torch
from torch import nn

from gapwatch.callbacks.base import ProbeCallback
from gapwatch.functional import (
    jacobian_norm,
    normalization_factor,
    normalized_cross_entropy,
    output_sensitivity,
    transitions,
    unit_ablation,
)
from gapwatch.functional._common import (
    DEFAULT_BATCH_SIZE,
    as_outputs,
    check_choice,
    check_inputs,
    check_positive,
    check_targets,
    chunks,
    evaluation,
    gradients_enabled,
)


def test_chunks_cover_every_row_once():
    assert [(s.start, s.stop) for s in chunks(10, 4)] == [(0, 4), (4, 8), (8, 10)]
    assert [(s.start, s.stop) for s in chunks(10, None)] == [(0, 10)]


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ([1.0, 2.0], TypeError, "torch.Tensor"),
        (torch.ones(3), ValueError, "unsqueeze"),
        (torch.ones(3, 2, dtype=torch.long), TypeError, r"\.float\(\)"),
        (torch.ones(1, 2), ValueError, "at least 2"),
    ],
)
def test_check_inputs_names_the_fix(value, error, match):
    with pytest.raises(error, match=match):
        check_inputs(value, min_samples=2)


def test_check_targets_rejects_regression_and_mismatch():
    with pytest.raises(TypeError, match="regression"):
        check_targets(torch.randn(4), 4)
    with pytest.raises(ValueError, match="4 inputs"):
        check_targets(torch.zeros(3, dtype=torch.long), 4)


def test_model_output_checks_name_the_fix():
    with pytest.raises(TypeError, match="model_attr="):
        as_outputs(("features", torch.ones(2, 3)))
    with pytest.raises(TypeError, match="dict"):
        as_outputs({"scores": torch.ones(2, 3)})
    assert as_outputs(torch.ones(5)).shape == (5, 1)


def test_choice_and_positive_checks():
    with pytest.raises(ValueError, match="'exact', 'projection'"):
        check_choice("method", "fast", ("exact", "projection"))
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="sigma"):
            check_positive("sigma", bad)
    with pytest.raises(ValueError, match="integer"):
        check_positive("batch_size", 2.5, integer=True)


def test_evaluation_restores_mixed_flags_even_on_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.BatchNorm1d(2))
    model.train()
    model[2].eval()  # a user's deliberate choice must survive
    seen = []

    def fail_inside() -> None:
        with evaluation(model):
            seen.extend(m.training for m in model.modules())
            raise RuntimeError

    with pytest.raises(RuntimeError):
        fail_inside()
    assert seen == [False, False, False, False]
    assert [m.training for m in model.modules()] == [True, True, True, False]


def test_gradients_enabled_lifts_inference_mode():
    with torch.inference_mode():
        x = torch.ones(3)
        with gradients_enabled():
            x = x.clone().requires_grad_()
            (x * 2).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))


# ------------------------------------------------------------ one default chunk size


def _functions_with_batch_size():
    """Every public function and method of gapwatch.functional that takes ``batch_size``."""
    import gapwatch.functional as functional

    found = {}
    for info in pkgutil.iter_modules(functional.__path__):
        if info.name.startswith("_"):  # the plumbing's helpers take a required batch_size
            continue
        module = importlib.import_module(f"gapwatch.functional.{info.name}")
        exported = set(getattr(module, "__all__", ()))
        for name, value in vars(module).items():
            candidates = [(name, value)]
            if inspect.isclass(value):
                candidates = [(f"{name}.{m}", f) for m, f in vars(value).items()]
            # A name in `__all__` is the module's own even when defined in a private one.
            home = getattr(value, "__module__", None) if name in exported else module.__name__
            for label, fn in candidates:
                own = getattr(fn, "__module__", None) == home
                if own and callable(fn) and not label.split(".")[-1].startswith("_"):
                    try:
                        parameters = inspect.signature(fn).parameters
                    except (TypeError, ValueError):
                        continue
                    if "batch_size" in parameters:
                        found[label] = parameters["batch_size"].default
    return found


def test_every_functional_proxy_and_the_callbacks_default_to_one_batch_size():
    defaults = _functions_with_batch_size()
    expected = {
        "output_sensitivity", "noise_response", "jacobian_norm", "normalization_factor",
        "normalized_cross_entropy", "unit_ablation", "ablation_from_activations",
        "transitions", "LayerSplit.capture", "LayerSplit.run",
    }  # fmt: skip
    assert expected <= set(defaults)
    assert defaults == dict.fromkeys(defaults, DEFAULT_BATCH_SIZE)
    callback = inspect.signature(ProbeCallback.__init__).parameters["batch_size"]
    assert callback.default == DEFAULT_BATCH_SIZE == 128


def _recorder() -> tuple[nn.Module, list[int]]:
    """A small ReLU CNN on 1x8x8 images that records the rows of every call of its layers."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3)
    )
    rows: list[int] = []
    for layer in (model[0], model[3]):  # the prefix and the suffix of an ablation at "1"
        layer.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    return model, rows


DEFAULT_CALLS = {
    "output_sensitivity": lambda m, x, y: output_sensitivity(m, x, generator=_seeded()),
    "jacobian_projection": lambda m, x, y: jacobian_norm(m, x, generator=_seeded()),
    "jacobian_exact": lambda m, x, y: jacobian_norm(m, x, method="exact"),
    "normalized_cross_entropy": lambda m, x, y: normalized_cross_entropy(m, x, y),
    "normalization_factor_output": lambda m, x, y: normalization_factor(
        m, mode="output", reference_inputs=x
    ),
    "unit_ablation": lambda m, x, y: unit_ablation(m, "1", x, y, num_classes=3),
    "transitions": lambda m, x, y: transitions(m, x[:4]),
}


def _seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("name", DEFAULT_CALLS)
def test_functional_proxies_chunk_by_the_default_without_batch_size(name):
    model, rows = _recorder()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(300, 1, 8, 8, generator=generator)
    targets = torch.randint(0, 3, (300,), generator=generator)
    DEFAULT_CALLS[name](model, inputs, targets)
    # Chunks of at most 128 rows, not one of all 300 (an ablation chunk holds whole levels
    # of a class's ~100 samples, so it stays below 128).
    assert max(rows) <= DEFAULT_BATCH_SIZE
    assert name == "unit_ablation" or DEFAULT_BATCH_SIZE in rows


def test_batch_size_none_still_runs_all_rows_at_once():
    model, rows = _recorder()
    jacobian_norm(model, torch.randn(300, 1, 8, 8), method="exact", batch_size=None)
    assert rows == [300, 300]
