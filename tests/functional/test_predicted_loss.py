"""gapwatch.functional.predicted_loss: eq. 9's predicted loss and its terms (eqs. 4, 8)."""

import math

import pytest
import torch
from torch import Tensor, nn

from gapwatch.functional.predicted_loss import (
    input_second_moment,
    predicted_test_loss,
    sigma_term,
    softmax_mse,
)
from tests.conftest import make_mlp


def test_predicted_test_loss_by_hand():
    # K = 10, S = 0.02, sigma_x^2 = 1.5, sigma = 0.1, Sigma = 0.3:
    # variance = 0.9 * (0.02 * 1.5 / 0.01 + 0.3) = 0.9 * 3.3 = 2.97.
    assert predicted_test_loss(
        0.02, num_classes=10, input_second_moment=1.5, sigma=0.1, sigma_term=0.3
    ).item() == pytest.approx(math.sqrt(0.5 * 2.97), rel=1e-6)
    with_bias = predicted_test_loss(
        torch.tensor(0.02),
        num_classes=10,
        input_second_moment=torch.tensor(1.5),
        sigma=0.1,
        sigma_term=0.3,
        bias=torch.tensor(0.43),
    )
    assert with_bias.shape == ()
    assert with_bias.dtype == torch.float32
    assert with_bias.item() == pytest.approx(math.sqrt(0.5 * (0.43 + 2.97)), rel=1e-6)


def test_input_second_moment_and_softmax_mse_by_hand():
    assert input_second_moment(torch.tensor([[1.0, -2.0], [3.0, 0.0]])).item() == 3.5
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # softmax: [.5,.5], [.75,.25]
    # ||[.5,.5] - [1,0]||^2 = 0.5 and ||[.75,.25] - [0,1]||^2 = 1.125.
    mse = softmax_mse(logits, torch.tensor([0, 1]))
    assert mse.item() == pytest.approx((0.5 + 1.125) / 2)


def test_sigma_term_matches_hand_written_eq8():
    torch.manual_seed(3)
    model = make_mlp(d_in=12, width=7, k=5)
    first, second, third = (m for m in model if isinstance(m, nn.Linear))

    def ms(t: Tensor) -> float:
        return t.detach().double().square().mean().item()

    gain = 0.5
    g2 = gain * ms(second.weight) * 7  # fan-in of the second layer: width 7
    g3 = gain * ms(third.weight) * 7
    expected = (ms(first.bias) * g2 * g3 + ms(second.bias) * g3 + ms(third.bias)) / 5
    assert sigma_term(model, 5).item() == pytest.approx(expected, rel=1e-6)
    no_bias = make_mlp(d_in=12, width=7, k=5, bias=False)
    assert sigma_term(no_bias, 5).item() == 0.0


def test_sigma_term_uses_conv_fan_in():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(4, 6, (3, 5), groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(6, 3, bias=False)
    )
    conv = model[0]
    conv_bias = conv.bias.detach().double().square().mean().item()
    w = model[3].weight.detach().double().square().mean().item()
    assert sigma_term(model, 3).item() == pytest.approx(conv_bias * 0.5 * w * 6 / 3, rel=1e-6)
    w_conv = conv.weight.detach().double().square().mean().item()
    only_conv = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), conv)
    linear_bias = only_conv[0].bias.detach().double().square().mean().item()
    fan_in = 4 // 2 * 3 * 5
    expected = (linear_bias * 0.5 * w_conv * fan_in + conv_bias) / 3
    assert sigma_term(only_conv, 3).item() == pytest.approx(expected, rel=1e-6)


def test_sigma_term_is_the_output_variance_due_to_biases(device):
    # At x = 0 a random ReLU net's output is driven by its biases alone. With zero-mean,
    # symmetric weights E[relu(z)^2] = E[z^2] / 2 exactly, so E[f_k(0)^2] = K * Sigma
    # when Sigma uses the population moments; the per-net estimates scatter around it.
    k, outputs, estimates = 6, [], []
    for seed in range(400):
        torch.manual_seed(seed)
        net = make_mlp(d_in=8, width=16, k=k)
        for layer in net:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.3)
                nn.init.normal_(layer.bias, std=0.5)
        with torch.no_grad():
            outputs.append(net(torch.zeros(1, 8, device=device))[0].double().square().mean())
        estimates.append(k * sigma_term(net, k).double())
    outputs, estimates = torch.stack(outputs), torch.stack(estimates)
    population = 0.25 * (0.5 * 0.09 * 16) ** 2 + 0.25 * (0.5 * 0.09 * 16) + 0.25
    for values in (outputs, estimates):
        standard_error = values.std() / math.sqrt(len(values))
        assert abs(values.mean() - population) < 4 * standard_error
