import math

import pytest
import torch
from torch import Tensor, nn

from gapwatch.functional.predicted_loss import predicted_test_loss, sigma_term, softmax_mse
from gapwatch.functional.sensitivity import output_sensitivity


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Recorder(nn.Module):
    """Passes inputs through ``model`` and keeps every batch it was called with."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(x.clone())
        return self.model(x)


def naive_sensitivity(model, x, noisy_inputs, num_draws, *, after_softmax=False):
    """Eq. 2 pair by pair, from the exact noisy inputs the function fed to the model."""
    per_pair = []
    for i in range(x.shape[0]):
        clean = model(x[i : i + 1])[0]
        for d in range(num_draws):
            noisy = model(noisy_inputs[i * num_draws + d : i * num_draws + d + 1])[0]
            if after_softmax:
                per_pair.append(noisy.softmax(0) - clean.softmax(0))
            else:
                per_pair.append((noisy - clean).mean())
    values = torch.stack(per_pair).double()
    return values.var(dim=0, unbiased=False).mean()


@pytest.mark.parametrize("after_softmax", [False, True])
def test_matches_naive_loop_on_the_same_noise(cnn, digits, after_softmax):
    x, num_draws = digits[0][:25], 4
    cnn.eval()
    with torch.no_grad():
        clean = cnn(x)
        recorder = Recorder(cnn)
        # Given clean outputs, every call the model sees is a noisy one.
        s = output_sensitivity(
            recorder,
            x,
            sigma=0.3,
            num_draws=num_draws,
            batch_size=16,
            generator=seeded(),
            clean_outputs=clean,
            after_softmax=after_softmax,
        )
        noisy_inputs = torch.cat(recorder.seen)
        # The noisy rows are input-major: row p is a draw around input p // num_draws.
        eps = noisy_inputs - x.repeat_interleave(num_draws, dim=0)
        assert eps.std().item() == pytest.approx(0.3, rel=0.05)
        expected = naive_sensitivity(cnn, x, noisy_inputs, num_draws, after_softmax=after_softmax)
    torch.testing.assert_close(s.double(), expected, rtol=1e-4, atol=0)
    if after_softmax:
        # Eq. 2 taken literally after the softmax vanishes; the per-entry version does not.
        with torch.no_grad():
            shift = cnn(noisy_inputs).softmax(1) - clean.softmax(1).repeat_interleave(num_draws, 0)
        literal = shift.mean(1).double().var(unbiased=False)
        assert literal < 1e-14
        assert s > 1e6 * literal


def test_linear_model_matches_closed_form(digits, device):
    # f(x) = W x: mean over outputs of W eps has variance sigma^2 ||W^T 1||^2 / K^2.
    x = digits[0][:400]
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10, bias=False)).to(device)
    sigma, num_draws = 0.2, 50
    w = model[1].weight.detach().double()
    exact = sigma**2 * w.sum(0).square().sum() / 10**2
    s = output_sensitivity(model, x, sigma=sigma, num_draws=num_draws, generator=seeded())
    # The variance of n Gaussian values has standard error ~ S sqrt(2 / n): 0.3 % here.
    standard_error = exact * math.sqrt(2 / (400 * num_draws))
    assert abs(s.double() - exact) < 4 * standard_error


def test_eq10_for_deep_relu_nets_with_standard_normal_weights(device):
    # Eq. 10 averages over networks: S = D/K (H/2)^M sigma^2 for M hidden ReLU layers.
    d_in, width, depth, k, sigma = 16, 32, 2, 4, 0.01
    x = torch.randn(64, d_in, generator=seeded(1)).to(device)
    generator = seeded(2)
    values = []
    for seed in range(200):
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Linear(d_in, width, bias=False),
            nn.ReLU(),
            nn.Linear(width, width, bias=False),
            nn.ReLU(),
            nn.Linear(width, k, bias=False),
        )
        for layer in net[::2]:
            nn.init.normal_(layer.weight)
        net.to(device)
        values.append(output_sensitivity(net, x, sigma=sigma, num_draws=8, generator=generator))
    values = torch.stack(values).double()
    predicted = d_in / k * (width / 2) ** depth * sigma**2
    # Spread over networks dominates; 4 standard errors (about 11 % here).
    standard_error = values.std() / math.sqrt(len(values))
    assert abs(values.mean() - predicted) < 4 * standard_error


def test_scales_with_the_square_of_the_last_layer(mlp, digits):
    x = digits[0][:200]
    before = output_sensitivity(mlp, x, num_draws=3, generator=seeded())
    with torch.no_grad():
        mlp[-1].weight.mul_(-3.0)
        mlp[-1].bias.mul_(-3.0)
    after = output_sensitivity(mlp, x, num_draws=3, generator=seeded())
    torch.testing.assert_close(after, 9.0 * before, rtol=1e-4, atol=0)


def test_regression_output_is_k_equals_one(digits, device):
    x = digits[0][:300]
    torch.manual_seed(0)
    column = nn.Sequential(nn.Flatten(), nn.Linear(64, 1)).to(device)
    flat = nn.Sequential(column, nn.Flatten(0))  # the same model returning [N]
    s_column = output_sensitivity(column, x, sigma=0.1, num_draws=20, generator=seeded())
    s_flat = output_sensitivity(flat, x, sigma=0.1, num_draws=20, generator=seeded())
    torch.testing.assert_close(s_column, s_flat)
    exact = 0.1**2 * column[1].weight.detach().double().square().sum()
    assert abs(s_flat.double() - exact) < 4 * exact * math.sqrt(2 / 6000)


def test_chunking_and_clean_outputs_do_not_change_the_value(cnn, digits):
    x = digits[0][:50]
    counter = Recorder(cnn)
    whole = output_sensitivity(counter, x, num_draws=3, generator=seeded())
    counter.seen.clear()
    # The CPU normal stream is identical whether drawn at once or in pieces holding a
    # multiple of 16 values (64 pixels per image here), so all runs see the same noise.
    chunked = output_sensitivity(counter, x, num_draws=3, batch_size=7, generator=seeded())
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=0)
    assert max(len(batch) for batch in counter.seen) == 7
    assert sum(len(batch) for batch in counter.seen) == 50 + 150  # clean + noisy
    counter.seen.clear()
    cnn.eval()
    with torch.no_grad():
        clean = cnn(x)
    cnn.train()
    reused = output_sensitivity(counter, x, num_draws=3, generator=seeded(), clean_outputs=clean)
    torch.testing.assert_close(reused, whole, rtol=1e-5, atol=0)
    assert sum(len(batch) for batch in counter.seen) == 150  # the noisy forward only


def test_leaves_model_and_global_rng_untouched(cnn, digits, untouched):
    with untouched(cnn):
        output_sensitivity(cnn, digits[0][:64], num_draws=2, batch_size=20)
        sigma_term(cnn, 10)


def test_works_inside_inference_mode(mlp, digits):
    x = digits[0][:100]
    expected = output_sensitivity(mlp, x, generator=seeded())
    with torch.inference_mode():
        inside = output_sensitivity(mlp, x, generator=seeded())
    torch.testing.assert_close(inside, expected)


def test_bad_input_names_the_fix(mlp, digits):
    x = digits[0][:10]
    with pytest.raises(ValueError, match="sigma"):
        output_sensitivity(mlp, x, sigma=0.0)
    with pytest.raises(ValueError, match="num_draws"):
        output_sensitivity(mlp, x, num_draws=0)
    with pytest.raises(ValueError, match="K >= 2"):
        output_sensitivity(nn.Sequential(nn.Flatten(), nn.Linear(64, 1)), x, after_softmax=True)
    with pytest.raises(ValueError, match=r"\[10, K\]"):
        output_sensitivity(mlp, x, clean_outputs=torch.zeros(9, 10))
    with pytest.raises(ValueError, match="model's own outputs"):
        output_sensitivity(mlp, x, clean_outputs=torch.zeros(10, 3))
    with pytest.raises(TypeError, match="PickLogits"):
        output_sensitivity(nn.Sequential(mlp, TupleOut()), x)
    with pytest.raises(ValueError, match="regression"):
        predicted_test_loss(0.1, num_classes=1, input_second_moment=1.0, sigma=0.1)
    with pytest.raises(ValueError, match="non-negative"):
        predicted_test_loss(-0.1, num_classes=10, input_second_moment=1.0, sigma=0.1)
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        softmax_mse(torch.zeros(2, 2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        sigma_term(nn.ReLU(), 10)


class TupleOut(nn.Module):
    """Returns its logits where gapwatch does not look: second in a tuple."""

    def forward(self, x: Tensor) -> tuple[str, Tensor]:
        return "features", x
