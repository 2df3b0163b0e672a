import copy
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
import torchvision
from torch import Tensor, nn

from gapwatch.functional.normalized_loss import (
    normalization_factor,
    normalized_cross_entropy,
)
from tests.conftest import make_mlp

WEIGHTED = (nn.Linear, nn.Conv2d)


def lp_norm(w: Tensor, p: float = 2) -> float:
    """||w||_p of the flattened tensor by the textbook formula, summed in float64.

    In chunks, so that VGG's 1e8 weights never sit in float64 at once.
    """
    chunks = w.detach().flatten().split(1 << 20)
    if p == math.inf:
        return max(chunk.abs().max().item() for chunk in chunks)
    return sum(chunk.double().abs().pow(p).sum().item() for chunk in chunks) ** (1 / p)


def first_layer_norm(weight: Tensor, bias: Tensor | None, p: float = 2) -> float:
    """rho_1 as the authors' code computes it: ``(w_norm**p + b_norm**p)**(1/p)``.

    Section 2 of the paper: the input layer's bias is the weight of a constant input.
    """
    w_norm = lp_norm(weight, p)
    if bias is None:
        return w_norm
    b_norm = lp_norm(bias, p)
    return max(w_norm, b_norm) if p == math.inf else (w_norm**p + b_norm**p) ** (1 / p)


def normalized_copy(model: nn.Module, p: float = 2) -> tuple[nn.Module, float]:
    """Eq. 1 by hand: every weight over its norm, every bias over the norms up to its layer.

    The first layer's norm takes its bias in (``first_layer_norm``).
    """
    normalized, rho = copy.deepcopy(model).eval(), 1.0
    with torch.no_grad():
        for index, layer in enumerate(m for m in normalized.modules() if isinstance(m, WEIGHTED)):
            norm = lp_norm(layer.weight, p)
            if index == 0:
                norm = first_layer_norm(layer.weight, layer.bias, p)
            rho *= norm
            layer.weight /= norm
            if layer.bias is not None:
                layer.bias /= rho
    return normalized, rho


def folded_copy(cnn: nn.Module) -> nn.Module:
    """The eval-mode network with each BatchNorm folded into the conv before it, by hand."""
    layers: list[nn.Module] = []
    with torch.no_grad():
        for module in copy.deepcopy(cnn).children():
            if isinstance(module, nn.BatchNorm2d):
                conv, s = layers[-1], module.weight / (module.running_var + module.eps).sqrt()
                conv.weight *= s[:, None, None, None]
                conv.bias.copy_(s * (conv.bias - module.running_mean) + module.bias)
            else:
                layers.append(module)
    return nn.Sequential(*layers).eval()


def cross_entropy(logits: Tensor, targets: Tensor) -> float:
    return F.cross_entropy(logits.double(), targets).item()


def bias_free_mlp(depth: int = 3) -> nn.Module:
    widths = [64] + [16] * (depth - 1) + [10]
    layers: list[nn.Module] = [nn.Flatten()]
    for fan_in, fan_out in itertools.pairwise(widths):
        layers += [nn.Linear(fan_in, fan_out, bias=False), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


@pytest.fixture
def data(digits) -> tuple[Tensor, Tensor]:
    return digits[0][:300], digits[1][:300]


def test_bias_free_mlp_is_f_over_the_product_of_layer_norms(data):
    x, y = data
    torch.manual_seed(0)
    model = make_mlp(bias=False)
    normalized, rho = normalized_copy(model)
    with torch.no_grad():
        torch.testing.assert_close(normalized(x), model(x) / rho)  # eq. 1 itself
        expected = cross_entropy(normalized(x), y)
    assert normalization_factor(model).item() == pytest.approx(rho, rel=1e-6)
    assert normalized_cross_entropy(model, x, y).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_biases_are_rescaled_by_the_cumulative_norms(mlp, data, scale):
    x, y = data
    normalized, rho = normalized_copy(mlp)
    with torch.no_grad():
        torch.testing.assert_close(normalized(x), mlp(x) / rho)
        expected = cross_entropy(scale * normalized(x), y)
    loss = normalized_cross_entropy(mlp, x, y, scale=scale)
    assert loss.dtype == torch.float32
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_batchnorm_is_folded_into_the_preceding_conv(cnn, data):
    x, y = data
    folded = folded_copy(cnn)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), copy.deepcopy(cnn).eval()(x), rtol=1e-5, atol=1e-5)
    normalized, rho = normalized_copy(folded)
    with torch.no_grad():
        expected = cross_entropy(normalized(x), y)
    assert normalization_factor(cnn).item() == pytest.approx(rho, rel=1e-6)
    assert normalization_factor(folded).item() == pytest.approx(rho, rel=1e-6)
    assert normalized_cross_entropy(cnn, x, y).item() == pytest.approx(expected, abs=1e-6)
    # The BN scale matters: the unfolded conv weights give another rho.
    unfolded = math.prod(lp_norm(m.weight) for m in cnn.modules() if isinstance(m, WEIGHTED))
    assert abs(unfolded / rho - 1) > 0.1


def liao_poggio_net() -> nn.Module:
    """The paper's appendix network for digits: two 5x5 convs of 24 filters and a linear
    layer, ReLU, no pooling, only the first layer with a bias."""
    return nn.Sequential(
        nn.Conv2d(1, 24, 5, padding=2),
        nn.ReLU(),
        nn.Conv2d(24, 24, 5, padding=2, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(24 * 64, 10, bias=False),
    )


def authors_rho(model: nn.Module, p: float) -> float:
    """The authors' loop: per layer the norm of its weight; for the first layer
    ``W_norm = (w_norm**p + b_norm**p)**(1/p)``; rho their product."""
    rho = 1.0
    for index, layer in enumerate(m for m in model.modules() if isinstance(m, WEIGHTED)):
        w_norm = layer.weight.detach().double().abs().pow(p).sum().item() ** (1 / p)
        if index == 0 and layer.bias is not None:
            b_norm = layer.bias.detach().double().abs().pow(p).sum().item() ** (1 / p)
            w_norm = (w_norm**p + b_norm**p) ** (1 / p)
        rho *= w_norm
    return rho


@pytest.mark.parametrize("p", [1, 2])
def test_the_first_layers_bias_is_part_of_rho_1_as_in_the_authors_code(data, p):
    x, y = data
    torch.manual_seed(0)
    model = liao_poggio_net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):  # trained a little, so that the bias is not its tiny initial one
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    rho = authors_rho(model, p)
    assert normalization_factor(model, p=p).item() == pytest.approx(rho, rel=1e-6)
    weights_only = math.prod(lp_norm(m.weight, p) for m in model if isinstance(m, WEIGHTED))
    assert rho / weights_only - 1 > 1e-3  # the bias matters: leaving it out is detectably off
    # f / rho is still exactly the network of unit-norm layers: [W_1 b_1] / rho_1, W_k / rho_k.
    with torch.no_grad():
        expected = cross_entropy(model(x) / rho, y)
    assert normalized_cross_entropy(model, x, y, p=p).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("layer", [1, 3, 5])
@pytest.mark.parametrize("factor", [0.02, 50.0])
def test_scaling_one_layer_leaves_the_normalized_loss_unchanged(data, layer, factor):
    x, y = data
    torch.manual_seed(0)
    model = make_mlp(bias=False)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled[layer].weight *= factor
    log_ratio = normalization_factor(scaled, log=True) - normalization_factor(model, log=True)
    assert log_ratio.item() == pytest.approx(math.log(factor), abs=1e-6)
    loss, same = (normalized_cross_entropy(m, x, y).item() for m in (model, scaled))
    assert same == pytest.approx(loss, abs=1e-6)
    with torch.no_grad():
        assert cross_entropy(scaled(x), y) != pytest.approx(cross_entropy(model(x), y), abs=1e-3)


@pytest.mark.parametrize("p", [1, 3, math.inf])
def test_other_lp_norms_match_the_textbook_formula(cnn, data, p):
    x, y = data
    normalized, rho = normalized_copy(folded_copy(cnn), p=p)
    with torch.no_grad():
        expected = cross_entropy(normalized(x), y)
    assert normalization_factor(cnn, p=p).item() == pytest.approx(rho, rel=1e-6)
    # L_inf-normalized outputs are not small: compare relative to the loss.
    loss = normalized_cross_entropy(cnn, x, y, p=p).item()
    assert loss == pytest.approx(expected, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("p", [2, math.inf])
def test_output_mode_is_the_mean_output_norm_on_reference_inputs(cnn, data, p):
    x, y = data
    reference = x[:20]
    model = copy.deepcopy(cnn).eval()
    with torch.no_grad():
        rho = sum(lp_norm(model(reference[i : i + 1])[0], p) for i in range(20)) / 20
        expected = cross_entropy(model(x) / rho, y)
    factor = normalization_factor(cnn, mode="output", p=p, reference_inputs=reference)
    assert factor.dtype == torch.float64
    assert factor.item() == pytest.approx(rho, rel=1e-6)
    loss = normalized_cross_entropy(cnn, x, y, mode="output", p=p, reference_inputs=reference)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_resnet18_needs_output_mode():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"residual.*mode='output'"):
        normalization_factor(model)
    with pytest.raises(ValueError, match="mode='output'"):
        normalized_cross_entropy(model, x, y)
    loss = normalized_cross_entropy(model, x, y, mode="output", reference_inputs=x[:1])
    with torch.no_grad():
        model.eval()
        expected = cross_entropy(model(x) / lp_norm(model(x[:1])), y)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_vgg11_works_layerwise():
    torch.manual_seed(0)
    # init_weights=False keeps PyTorch's default init and skips VGG's slow second one.
    model = torchvision.models.vgg11(weights=None, num_classes=10, init_weights=False)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    layers = [m for m in model.modules() if isinstance(m, WEIGHTED)]
    log_rho = math.log(first_layer_norm(layers[0].weight, layers[0].bias))
    log_rho += sum(math.log(lp_norm(m.weight)) for m in layers[1:])
    assert len(layers) == 11
    assert normalization_factor(model, log=True).item() == pytest.approx(log_rho, rel=1e-6)
    loss = normalized_cross_entropy(model, x, y)  # in train mode: Dropout must be switched off
    with torch.no_grad():
        expected = cross_entropy(model.eval()(x) / math.exp(log_rho), y)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


class Untraceable(nn.Module):
    """The wrapped network behind data-dependent control flow, which torch.fx cannot trace."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        if x.abs().sum() > 0:
            return self.body(x)
        return self.body(x) + 1


def test_untraceable_models_fall_back_to_registration_order(cnn, data):
    x, y = data
    wrapped = Untraceable(cnn)
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(wrapped)
    assert normalization_factor(wrapped).item() == pytest.approx(
        normalization_factor(cnn).item(), rel=1e-12
    )
    loss = normalized_cross_entropy(wrapped, x, y).item()
    assert loss == pytest.approx(normalized_cross_entropy(cnn, x, y).item(), abs=1e-7)


def test_huge_weights_give_a_finite_log_rho_and_loss(data):
    x, y = data
    torch.manual_seed(0)
    model = bias_free_mlp(depth=12)
    huge = copy.deepcopy(model)
    with torch.no_grad():
        for layer in (m for m in huge.modules() if isinstance(m, nn.Linear)):
            layer.weight *= 1e30
        assert not huge(x).isfinite().all()  # f itself overflows float32
    log_rho = normalization_factor(huge, log=True)
    expected = normalization_factor(model, log=True) + 12 * math.log(1e30)
    assert log_rho.item() == pytest.approx(expected.item(), rel=1e-9)
    assert normalization_factor(huge).item() == math.inf  # past 1e308, as documented
    loss = normalized_cross_entropy(huge, x, y)
    assert loss.item() == pytest.approx(normalized_cross_entropy(model, x, y).item(), abs=1e-6)
    # From finite logits, f / rho underflows to zero: the loss is ln K, not NaN.
    with torch.no_grad():
        logits = model(x) * 1e30
    from_logits = normalized_cross_entropy(huge, x, y, logits=logits)
    assert from_logits.item() == pytest.approx(math.log(10), abs=1e-6)


def test_precomputed_logits_give_the_same_loss(cnn, data):
    x, y = data
    with torch.no_grad():
        logits = copy.deepcopy(cnn).eval()(x)
    for kwargs in ({}, {"mode": "output", "reference_inputs": x[:10]}):
        own = normalized_cross_entropy(cnn, x, y, **kwargs).item()
        reused = normalized_cross_entropy(cnn, x, y, logits=logits, **kwargs).item()
        assert reused == pytest.approx(own, abs=1e-6)


def test_grouped_conv_transpose_folds_per_output_channel():
    torch.manual_seed(0)
    convt, bn = nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    model = nn.Sequential(convt, bn, nn.ReLU(), nn.Flatten(), nn.Linear(600, 5))
    s = bn.weight / (bn.running_var + bn.eps).sqrt()
    folded_bias = s * (convt.bias - bn.running_mean) + bn.bias  # the first layer's, in rho_1
    total = folded_bias.pow(2).sum().item()
    for channel in range(6):  # output channel g * 3 + j reads input channels 2g, 2g + 1
        group, j = divmod(channel, 3)
        total += (s[channel] * convt.weight[2 * group : 2 * group + 2, j]).pow(2).sum().item()
    rho = math.sqrt(total) * lp_norm(model[4].weight)
    assert normalization_factor(model).item() == pytest.approx(rho, rel=1e-6)
    x, y = torch.randn(16, 4, 8, 8), torch.randint(0, 5, (16,))
    with torch.no_grad():
        expected = cross_entropy(model.eval()(x) / rho, y)
    assert normalized_cross_entropy(model, x, y).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("affine", [True, False])
def test_lone_batchnorm_is_a_diagonal_layer(data, affine):
    x, y = data
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(64, affine=affine)
    model = nn.Sequential(nn.Flatten(), bn, *list(make_mlp())[1:]).eval()
    with torch.no_grad():
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
        if affine:
            bn.weight.normal_(), bn.bias.normal_()
    s = (bn.weight if affine else 1) / (bn.running_var + bn.eps).sqrt()
    shift = (bn.bias if affine else 0) - s * bn.running_mean  # diag(s) x + shift
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    rho = first_layer_norm(s, shift) * math.prod(lp_norm(m.weight) for m in linears)
    assert normalization_factor(model).item() == pytest.approx(rho, rel=1e-6)
    with torch.no_grad():
        expected = cross_entropy(model(x) / rho, y)
    assert normalized_cross_entropy(model, x, y).item() == pytest.approx(expected, abs=1e-6)


class SharedPaths(nn.Module):
    """Two paths merge, but both run through every weighted layer: still a chain."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.first(x.flatten(1))
        return self.second(torch.relu(h) + 0.5 * h).view(x.size(0), -1)


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Linear(64, 8), nn.Linear(64, 8)
        self.head = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        return self.head(torch.cat([self.left(x).relu(), self.right(x).relu()], dim=1))


def test_a_bare_linear_layer_is_one_layer(data):
    x, y = data
    torch.manual_seed(0)
    model = nn.Linear(64, 10)
    flat = x.flatten(1)
    rho = first_layer_norm(model.weight, model.bias)
    assert normalization_factor(model).item() == pytest.approx(rho, rel=1e-6)
    with torch.no_grad():
        expected = cross_entropy(model(flat) / rho, y)
    assert normalized_cross_entropy(model, flat, y).item() == pytest.approx(expected, abs=1e-6)


def test_merging_paths_through_the_same_layers_form_a_chain(data):
    x, y = data
    torch.manual_seed(0)
    model = SharedPaths()
    rho = first_layer_norm(model.first.weight, model.first.bias) * lp_norm(model.second.weight)
    assert normalization_factor(model).item() == pytest.approx(rho, rel=1e-6)
    with torch.no_grad():
        expected = cross_entropy(model(x) / rho, y)
    assert normalized_cross_entropy(model, x, y).item() == pytest.approx(expected, abs=1e-6)


def test_non_homogeneous_modules_warn_once_and_use_f_over_rho(data):
    x, y = data
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    rho = first_layer_norm(model[1].weight, model[1].bias) * lp_norm(model[3].weight)
    with pytest.warns(UserWarning, match=r"not positively homogeneous \(Tanh\)"):
        assert normalization_factor(model).item() == pytest.approx(rho, rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = normalized_cross_entropy(model, x, y).item()
    with torch.no_grad():
        assert loss == pytest.approx(cross_entropy(model(x) / rho, y), abs=1e-6)


def test_leaves_the_model_untouched(cnn, data, untouched):
    x, y = data
    cnn(x[:8]).sum().backward()  # non-trivial .grad fields to protect
    with untouched(cnn):
        normalization_factor(cnn)
        normalization_factor(cnn, mode="output", reference_inputs=x[:5])
        normalized_cross_entropy(cnn, x, y)
        normalized_cross_entropy(cnn, x, y, mode="output", reference_inputs=x[:5])


def test_works_inside_inference_mode(cnn, data):
    x, y = data
    expected = normalized_cross_entropy(cnn, x, y), normalization_factor(cnn, log=True)
    with torch.inference_mode():
        got = normalized_cross_entropy(cnn, x, y), normalization_factor(cnn, log=True)
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])


@pytest.mark.parametrize("mode", ["layerwise", "output"])
def test_batch_size_chunks_give_the_same_answer(cnn, data, mode):
    x, y = data
    kwargs = {"mode": mode, "reference_inputs": x[:30]}
    whole = normalized_cross_entropy(cnn, x, y, **kwargs)
    chunked = normalized_cross_entropy(cnn, x, y, batch_size=7, **kwargs)
    assert chunked.item() == pytest.approx(whole.item(), abs=1e-7)
    ref = normalization_factor(cnn, mode="output", reference_inputs=x[:30], batch_size=7)
    assert ref.item() == pytest.approx(
        normalization_factor(cnn, mode="output", reference_inputs=x[:30]).item(), rel=1e-6
    )


def test_bad_input_names_the_fix(mlp, data):
    x, y = data
    shared = nn.Linear(64, 64)
    no_stats = nn.Sequential(nn.Linear(64, 10), nn.BatchNorm1d(10, track_running_stats=False))
    cases = [
        (lambda: normalization_factor(mlp, mode="spectral"), r"mode.*'layerwise', 'output'"),
        (lambda: normalization_factor(mlp, p=0), "`p` must be a positive"),
        (lambda: normalized_cross_entropy(mlp, x, y, p=-1.0), "`p` must be a positive"),
        (lambda: normalized_cross_entropy(mlp, x, y, scale=0.0), "`scale` must be a positive"),
        (lambda: normalization_factor(mlp, mode="output"), "pass `reference_inputs=`"),
        (lambda: normalized_cross_entropy(make_mlp(k=1), x, y), r"K >= 2"),
        (lambda: normalized_cross_entropy(mlp, x, y, logits=torch.zeros(300, 1)), r"K >= 2"),
        (lambda: normalized_cross_entropy(mlp, x, y, logits=torch.zeros(299, 10)), "`logits`"),
        (lambda: normalized_cross_entropy(mlp, x, y, logits=torch.zeros(300)), "`logits`"),
        (lambda: normalization_factor(TwoBranches()), r"bypasses .*mode='output'"),
        (lambda: normalization_factor(nn.Sequential(shared, shared)), "more than once"),
        (lambda: normalization_factor(no_stats), "track_running_stats=False"),
        (lambda: normalization_factor(nn.Sequential(nn.Flatten())), "no nn.Linear"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(TypeError, match="integer class indices"):
        normalized_cross_entropy(mlp, x, y.float())


def test_precomputed_log_rho_and_logits_give_the_same_loss(cnn, digits):
    from gapwatch.functional.normalized_loss import normalization_factor, normalized_cross_entropy

    x, y = digits[0][:64], digits[1][:64]
    cnn.eval()
    with torch.no_grad():
        logits = cnn(x)
    log_rho = normalization_factor(cnn, log=True)
    direct = normalized_cross_entropy(cnn, x, y)
    reused = normalized_cross_entropy(cnn, x, y, logits=logits, log_rho=log_rho)
    assert torch.allclose(direct, reused, rtol=1e-6)
    # log_rho really is used: a different factor gives a different loss.
    assert not torch.allclose(
        normalized_cross_entropy(cnn, x, y, logits=logits, log_rho=log_rho - 5), reused
    )


def test_a_zero_output_is_normalized_to_zero_not_nan(digits):
    # A zero-initialized head (torchvision's ViT) outputs 0 everywhere: rho = 0 in output mode.
    x, y = (t.cpu() for t in digits)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    nn.init.zeros_(model[3].weight)
    nn.init.zeros_(model[3].bias)
    loss = normalized_cross_entropy(model, x[:50], y[:50], mode="output", reference_inputs=x[:8])
    assert loss.item() == pytest.approx(math.log(10))
