import pytest
import torch
from torch import nn

from gapwatch.functional._common import (
    as_outputs,
    check_choice,
    check_inputs,
    check_positive,
    check_targets,
    chunks,
    evaluation,
    gradients_enabled,
    make_generator,
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
        as_outputs((torch.ones(2, 3),))
    with pytest.raises(TypeError, match="dict"):
        as_outputs({"logits": torch.ones(2, 3)})
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


def test_fresh_generator_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    g = make_generator(None, torch.device("cpu"))
    torch.randn(3, generator=g)
    assert torch.equal(state, torch.random.get_rng_state())
    with pytest.raises(TypeError, match="Generator"):
        make_generator(0, torch.device("cpu"))
