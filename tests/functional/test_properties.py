"""Property tests: the papers' own invariances, over random models, scales and inputs."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gapwatch.functional import (
    jacobian_norm,
    normalized_cross_entropy,
    output_sensitivity,
    unit_ablation,
)
from gapwatch.functional.ablation import ablation_summary

PROPERTY = settings(max_examples=15, deadline=None)
seeds = st.integers(0, 2**16)
scales = st.floats(0.05, 20.0)


def _mlp(seed: int, *, bias: bool, width: int = 12, k: int = 4) -> nn.Sequential:
    torch.manual_seed(seed)  # the model's own init, outside the code under test
    return nn.Sequential(
        nn.Linear(6, width, bias=bias), nn.ReLU(), nn.Linear(width, width, bias=bias),
        nn.ReLU(), nn.Linear(width, k, bias=bias),
    )  # fmt: skip


def _inputs(seed: int, n: int = 40) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))


class _Shifted(nn.Module):
    """``f(x) + c``: the softmax, and so its Jacobian, cannot see ``c``."""

    def __init__(self, model: nn.Module, shift: float) -> None:
        super().__init__()
        self.model, self.shift = model, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) + self.shift


@PROPERTY
@given(seed=seeds, a=scales)
def test_sensitivity_scales_by_a_squared_with_the_outputs(seed, a):
    model, x = _mlp(seed, bias=True), _inputs(seed)
    scaled = nn.Sequential(model, _Scale(a))
    base = output_sensitivity(model, x, generator=torch.Generator().manual_seed(seed))
    big = output_sensitivity(scaled, x, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(big, a**2 * base, rtol=1e-4, atol=1e-12)


class _Scale(nn.Module):
    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * x


@PROPERTY
@given(seed=seeds, a=scales, layer=st.sampled_from([0, 2, 4]))
def test_normalized_loss_ignores_the_scale_of_any_layer(seed, a, layer):
    model, x = _mlp(seed, bias=False), _inputs(seed)
    y = torch.arange(len(x)) % 4
    before = normalized_cross_entropy(model, x, y)
    with torch.no_grad():
        model[layer].weight.mul_(a)
    torch.testing.assert_close(normalized_cross_entropy(model, x, y), before, rtol=1e-5, atol=0)


@PROPERTY
@given(seed=seeds, shift=st.floats(-50.0, 50.0))
def test_softmax_jacobian_ignores_a_constant_added_to_every_logit(seed, shift):
    model, x = _mlp(seed, bias=True), _inputs(seed)
    plain = jacobian_norm(model, x, method="exact", reduction="none")
    shifted = jacobian_norm(_Shifted(model, shift), x, method="exact", reduction="none")
    torch.testing.assert_close(shifted, plain, rtol=1e-4, atol=1e-7)


@PROPERTY
@given(seed=seeds)
def test_ablation_curves_start_at_the_accuracy_and_end_with_every_unit_removed(seed):
    model, x = _mlp(seed, bias=True), _inputs(seed, n=60)
    y = torch.arange(60) % 4
    result = unit_ablation(model, "3", x, y, num_classes=4)  # the second ReLU, 12 units
    with torch.no_grad():
        predicted = model(x).argmax(1)
        hidden = model[:4](x)
        all_removed = model[4](torch.zeros_like(hidden)).argmax(1)
    for row, label in enumerate(result.classes.tolist()):
        members = y == label
        plain = (predicted[members] == label).float().mean()
        empty = (all_removed[members] == label).float().mean()
        for curves in (result.curves, result.curves_reversed):
            torch.testing.assert_close(curves[row, 0], plain)
            torch.testing.assert_close(curves[row, -1], empty)


@PROPERTY
@given(
    curves=st.lists(st.floats(0.0, 1.0), min_size=6, max_size=6),
    reversed_=st.lists(st.floats(0.0, 1.0), min_size=6, max_size=6),
    chance=st.floats(0.0, 1.0),
)
def test_zeta_and_kappa_stay_in_the_unit_interval(curves, reversed_, chance):
    result = ablation_summary(torch.tensor([curves]), torch.tensor([reversed_]), chance=chance)
    assert 0.0 <= float(result.zeta) <= 1.0
    assert 0.0 <= float(result.kappa) <= 1.0
