"""The contract every functional proxy keeps, checked on each of them alike.

Each proxy runs on a CNN with BatchNorm and Dropout in train mode, with .grad fields set,
and must: leave the model and the global RNG untouched; give the same answer inside
``torch.inference_mode()`` and ``torch.no_grad()`` (callbacks call them from Lightning's
validation loop); give the same answer in chunks as in one batch; and, where it draws
random numbers, repeat itself exactly under a seeded generator.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from gapwatch.functional import (
    jacobian_norm,
    normalization_factor,
    normalized_cross_entropy,
    output_sensitivity,
    transitions,
    unit_ablation,
)

Proxy = Callable[..., torch.Tensor]


def _ablation(model, x, y, **kw):
    return unit_ablation(model, "5", x, y, num_classes=10, classes=[0, 1], **kw).curves


PROXIES: dict[str, tuple[Proxy, bool]] = {
    # name: (call(model, x, y, **options), draws random numbers)
    "output_sensitivity": (lambda m, x, y, **kw: output_sensitivity(m, x, num_draws=2, **kw), True),
    "jacobian_projection": (
        lambda m, x, y, **kw: jacobian_norm(m, x, reduction="none", **kw),
        True,
    ),
    "jacobian_exact": (
        lambda m, x, y, **kw: jacobian_norm(m, x, method="exact", reduction="none", **kw),
        False,
    ),
    "normalized_cross_entropy": (
        lambda m, x, y, **kw: normalized_cross_entropy(m, x, y, **kw),
        False,
    ),
    "unit_ablation": (_ablation, False),
    "transitions": (
        lambda m, x, y, **kw: transitions(m, x[:4], num_points=16, reduction="none", **kw),
        False,
    ),
}


def _call(name, model, x, y, seed=None, **options):
    fn, random = PROXIES[name]
    if random:
        options["generator"] = torch.Generator().manual_seed(0 if seed is None else seed)
    return fn(model, x, y, **options)


@pytest.fixture
def busy_cnn(cnn):
    """The ``cnn`` fixture in train mode with every .grad set, as mid-training."""
    for p in cnn.parameters():
        p.grad = torch.randn_like(p)
    return cnn


@pytest.fixture
def batch(digits):
    images, labels = digits
    keep = labels < 2  # two classes keep the ablation quick
    return images[keep][:48], labels[keep][:48]


@pytest.mark.parametrize("name", PROXIES)
def test_model_and_global_rng_are_left_as_found(name, busy_cnn, batch, untouched):
    with untouched(busy_cnn):
        _call(name, busy_cnn, *batch)


@pytest.mark.parametrize("name", PROXIES)
@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad])
def test_same_answer_inside_inference_mode_and_no_grad(name, context, busy_cnn, batch):
    expected = _call(name, busy_cnn, *batch)
    with context():
        inside = _call(name, busy_cnn, *batch)
    torch.testing.assert_close(inside, expected)


@pytest.mark.parametrize("name", PROXIES)
def test_chunked_equals_unchunked(name, busy_cnn, batch):
    whole = _call(name, busy_cnn, *batch)
    # 16 rows keep the noise stream aligned for the sensitivity (drawn in blocks of 16).
    torch.testing.assert_close(_call(name, busy_cnn, *batch, batch_size=16), whole)


@pytest.mark.parametrize("name", [n for n, (_, random) in PROXIES.items() if random])
def test_seeded_generator_repeats_and_a_new_seed_differs(name, busy_cnn, batch):
    first, again = (_call(name, busy_cnn, *batch, seed=1) for _ in range(2))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, _call(name, busy_cnn, *batch, seed=2))


def test_normalization_factor_is_left_as_found(busy_cnn, untouched):
    with untouched(busy_cnn):
        normalization_factor(busy_cnn, p=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", PROXIES)
def test_a_model_in_another_dtype_is_refused_naming_the_fix(name, cnn, batch, dtype):
    x, y = batch
    with pytest.raises(ValueError, match=rf"float32.*{dtype!s}.*'bf16-mixed'"):
        _call(name, cnn.eval().to(dtype), x, y)
