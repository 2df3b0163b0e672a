import copy

import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy

from gapwatch.functional.jacobian import jacobian_norm
from tests import conftest
from tests.conftest import make_cnn, make_mlp


def linear_model(k: int = 10, *, scale: float = 1.0) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    layer = nn.Linear(64, k)
    with torch.no_grad():
        layer.weight.copy_(scale * torch.randn(k, 64, generator=generator) / 8)
        layer.bias.copy_(torch.randn(k, generator=generator))
    return nn.Sequential(nn.Flatten(), layer).to(conftest.DEVICE)


def analytic_linear_norms(model: nn.Module, x: torch.Tensor, output: str) -> torch.Tensor:
    """||(diag p - p p^T) W||_F (softmax) or ||W||_F (logits) per sample, in float64."""
    weight, bias = model[1].weight.double(), model[1].bias.double()
    logits = x.flatten(1).double() @ weight.T + bias
    if output == "logits":
        return weight.norm().expand(x.shape[0])
    p = logits.softmax(dim=1)
    off_diagonal = 1 - torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
    # diag(p) - p p^T, with 1 - p_k summed over the other classes: no cancellation.
    a = torch.diag_embed(p * (p @ off_diagonal)) - p.unsqueeze(2) * p.unsqueeze(1) * off_diagonal
    return (a @ weight).flatten(1).norm(dim=1)


def naive_norms(model: nn.Module, x: torch.Tensor, output: str) -> torch.Tensor:
    """One torch.autograd.functional.jacobian call per sample, on an eval-mode copy."""
    model = copy.deepcopy(model).eval()

    def f(z):
        out = model(z)
        return out.softmax(dim=1) if output == "softmax" else out

    return torch.stack(
        [torch.autograd.functional.jacobian(f, x[i : i + 1]).norm() for i in range(len(x))]
    )


@pytest.fixture(scope="module")
def trained_cnn(digits) -> tuple[nn.Module, torch.Tensor]:
    """A CNN trained for 300 SGD steps on the first 1285 digits; probes: the other 512."""
    images, labels = digits
    order = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():  # init and dropout draw on the global RNG
        torch.manual_seed(0)
        model = make_cnn()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(300):
            batch = torch.randint(0, 1285, (64,), generator=order)
            optimizer.zero_grad()
            cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
    return model.eval(), images[1285:]


@pytest.mark.parametrize("output", ["softmax", "logits"])
def test_exact_matches_the_linear_model_in_closed_form(digits, output):
    model, x = linear_model(), digits[0][:64]
    norms = jacobian_norm(model, x, output=output, method="exact", reduction="none")
    expected = analytic_linear_norms(model, x, output).float()
    torch.testing.assert_close(norms, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        jacobian_norm(model, x, output=output, method="exact"), expected.mean()
    )


def test_norms_stay_accurate_for_confident_predictions(digits):
    """In float32, 1 - p_top rounds to 0 beyond logit margins of 17 and squared gradients
    underflow below 1e-19; the norm, ~1e-24 at a margin of 60, must survive both."""
    model, x = linear_model(scale=30.0), digits[0][:64]
    margins = model(x).topk(2).values.diff(dim=1).abs()
    assert (margins > 40).sum() >= 10
    expected = analytic_linear_norms(model, x, "softmax").float()
    exact = jacobian_norm(model, x, method="exact", reduction="none")
    torch.testing.assert_close(exact, expected, rtol=1e-4, atol=0)
    # Drawing as many rows as there are classes makes the estimate exact.
    estimate = jacobian_norm(model, x, num_projections=10, reduction="none")
    torch.testing.assert_close(estimate, expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("method", ["exact", "projection"])
def test_saturated_and_nan_logits_give_zero_and_nan(digits, method):
    model, x = linear_model(scale=3000.0), digits[0][:64]
    saturated = model(x).softmax(dim=1).amax(dim=1) == 1  # 1 - p_top underflows to 0
    assert saturated.sum() >= 10
    norms = jacobian_norm(model, x, method=method, reduction="none")
    assert torch.isfinite(norms).all()
    assert (norms[saturated] == 0).all()
    with torch.no_grad():
        model[1].bias[0] = float("nan")
    assert jacobian_norm(model, x, method=method).isnan()


@pytest.mark.parametrize("output", ["softmax", "logits"])
def test_exact_matches_a_per_sample_autograd_loop(cnn, digits, output):
    x = digits[0][:24]
    norms = jacobian_norm(cnn, x, output=output, method="exact", reduction="none")
    torch.testing.assert_close(norms, naive_norms(cnn, x, output), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("output", ["softmax", "logits"])
@pytest.mark.parametrize("num_projections", [1, 2])
@pytest.mark.parametrize("confident", [False, True])
def test_projection_estimates_the_squared_norm_without_bias(
    mlp, digits, output, num_projections, confident
):
    # Near-uniform softmax, or a peaked one where the top rows are drawn with certainty.
    model = linear_model(scale=1.5) if confident else mlp
    x = digits[0][:16]
    exact = jacobian_norm(model, x, output=output, method="exact", reduction="none").square()
    repeats = 1000  # one call: each copy of a sample gets its own draw
    estimates = jacobian_norm(
        model,
        x.repeat(repeats, 1, 1, 1),
        output=output,
        num_projections=num_projections,
        generator=torch.Generator().manual_seed(0),
        reduction="none",
    )
    estimates = estimates.square().view(repeats, -1)
    spread = estimates.std(dim=0)
    assert (spread > 0.05 * exact).sum() >= 8, "the estimate should be random here"
    # z-scores of the 16 means; a float32 floor where a sample's estimate is exact.
    z = (estimates.mean(dim=0) - exact) / (spread / repeats**0.5 + 1e-5 * exact)
    assert z.abs().max() < 4.5  # a false alarm has odds below 1e-4 per case


def test_projection_is_exact_when_the_softmax_jacobian_has_rank_one(digits):
    model, x = linear_model(k=2), digits[0][:32]  # K = 2: A = p1 p2 (e1 - e2)(e1 - e2)^T
    exact = jacobian_norm(model, x, method="exact", reduction="none")
    estimate = jacobian_norm(model, x, num_projections=1, reduction="none")
    torch.testing.assert_close(estimate, exact)


def test_projection_is_within_3_percent_for_untrained_and_trained_nets(digits, trained_cnn):
    trained, probes = trained_cnn
    confidence = trained(probes).softmax(dim=1).amax(dim=1).mean()
    assert confidence > 0.9, "the trained net should be confident"
    with torch.random.fork_rng():
        torch.manual_seed(1)
        untrained = make_cnn().eval()
    for model in (untrained, trained):
        exact = jacobian_norm(model, probes, method="exact")
        for seed in range(3):
            estimate = jacobian_norm(model, probes, generator=torch.Generator().manual_seed(seed))
            assert abs(estimate / exact - 1) < 0.03


@pytest.mark.parametrize("method", ["exact", "projection"])
def test_return_outputs_gives_the_model_outputs_of_the_same_pass(digits, method):
    torch.manual_seed(0)
    model, x = make_cnn().eval(), digits[0][:50]
    options = {"method": method, "batch_size": 16, "reduction": "none"}
    alone = jacobian_norm(model, x, generator=torch.Generator().manual_seed(0), **options)
    norms, outputs = jacobian_norm(
        model, x, generator=torch.Generator().manual_seed(0), return_outputs=True, **options
    )
    assert torch.equal(norms, alone)
    assert not outputs.requires_grad
    assert outputs.dtype == torch.float32
    with torch.no_grad():
        plain = torch.cat([model(x[i : i + 16]) for i in range(0, 50, 16)])
    assert torch.equal(outputs, plain)
    mean, _ = jacobian_norm(model, x, method=method, return_outputs=True)
    assert mean.ndim == 0


@pytest.mark.parametrize("method", ["exact", "projection"])
def test_regression_logits_norm_is_the_gradient_norm(digits, method):
    torch.manual_seed(0)
    model = nn.Sequential(make_mlp(k=1), nn.Flatten(0))  # output [N]
    x = digits[0][:16].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x).sum(), x)
    norms = jacobian_norm(model, x.detach(), output="logits", method=method, reduction="none")
    torch.testing.assert_close(norms, grad.flatten(1).norm(dim=1))


@pytest.mark.parametrize("method", ["exact", "projection"])
def test_chunking_does_not_change_the_result(cnn, digits, method):
    x = digits[0][:50]

    def run(batch_size):
        generator = torch.Generator().manual_seed(0)
        return jacobian_norm(
            cnn, x, method=method, batch_size=batch_size, generator=generator, reduction="none"
        )

    torch.testing.assert_close(run(7), run(None))


@pytest.mark.parametrize("method", ["exact", "projection"])
def test_leaves_the_model_and_global_rng_untouched(cnn, digits, untouched, method):
    for parameter in cnn.parameters():
        parameter.grad = torch.ones_like(parameter)
    with untouched(cnn):
        jacobian_norm(cnn, digits[0][:32], method=method)


@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad])
def test_works_inside_inference_mode_and_no_grad(cnn, digits, context):
    expected = jacobian_norm(cnn, digits[0][:32], method="exact")
    with context():
        x = digits[0][:32].clone()  # an inference tensor under inference mode
        assert torch.equal(jacobian_norm(cnn, x, method="exact"), expected)


class DictModel(nn.Module):
    def forward(self, x: torch.Tensor) -> dict:
        return {"scores": x.flatten(1)}  # not where gapwatch looks for logits


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "hutchinson"}, ValueError, "'projection', 'exact'"),
        ({"output": "probs"}, ValueError, "'softmax', 'logits'"),
        ({"reduction": "sum"}, ValueError, "'mean', 'none'"),
        ({"num_projections": 0}, ValueError, "positive integer"),
        ({"num_projections": 1.5}, ValueError, "positive integer"),
        ({"batch_size": 0}, ValueError, "positive integer"),
    ],
)
def test_bad_options_name_the_fix(mlp, digits, kwargs, error, match):
    with pytest.raises(error, match=match):
        jacobian_norm(mlp, digits[0][:4], **kwargs)


def test_softmax_needs_a_classifier_and_a_tensor_output(digits):
    regression = make_mlp(k=1)
    with pytest.raises(ValueError, match="output='logits'"):
        jacobian_norm(regression, digits[0][:4])
    with pytest.raises(TypeError, match="model_attr="):
        jacobian_norm(DictModel(), digits[0][:4])
    with pytest.raises(TypeError, match=r"\.float\(\)"):
        jacobian_norm(regression, digits[1][:4].view(4, 1))
