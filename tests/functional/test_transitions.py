import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from gapwatch.functional.transitions import transitions
from tests.conftest import make_mlp


def naive_transitions(model, images, num_points):
    """Eq. 1 point by point: full ReLU codes (output > 0) from forward hooks, one run per point."""
    model = copy.deepcopy(model).eval()
    seen = []
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.register_forward_hook(lambda m, i, output: seen.append(output > 0))
    counts = []
    for x in images:
        width = x.shape[-1]
        codes = []
        for i in range(num_points):
            shift, fraction = divmod(i * width, num_points)
            a = torch.roll(x, shift, dims=-1)
            b = torch.roll(x, shift + 1, dims=-1)
            z = torch.lerp(a, b, torch.tensor(fraction / num_points, device=x.device))
            seen.clear()
            with torch.no_grad():
                model(z.unsqueeze(0))
            codes.append(torch.cat([s.flatten() for s in seen]).long())
        total = 0
        for i in range(num_points):
            total += int((codes[i] - codes[(i + 1) % num_points]).abs().sum())
        counts.append(total)
    return counts


def single_pixel_model(activation, bias):
    """One unit reading the pixel (row 2, column 0) of a [1, 4, W] image."""
    linear = nn.Linear(4 * 6, 1)
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[0, 2 * 6] = 1.0
        linear.bias.fill_(bias)
    return nn.Sequential(nn.Flatten(), linear, activation)


def test_matches_naive_reference_on_cnn(cnn, digits):
    images = digits[0][:3]
    got = transitions(cnn, images, reduction="none")
    expected = naive_transitions(cnn, images, num_points=64)
    assert got.tolist() == expected
    assert min(expected) > 0


def test_matches_naive_reference_on_mlp_with_uneven_sampling(digits):
    torch.manual_seed(1)
    mlp = make_mlp()
    images = digits[0][10:14]
    got = transitions(mlp, images, num_points=20, reduction="none")  # 20 is not a multiple of 8
    expected = naive_transitions(mlp, images, num_points=20)
    assert got.tolist() == expected
    assert min(expected) > 0


@pytest.mark.parametrize(
    "activation", [nn.ReLU(), nn.LeakyReLU(0.1), nn.PReLU(), nn.Tanh(), nn.Sigmoid()]
)
@pytest.mark.parametrize("num_points", [6, 48, 53])
def test_single_unit_flips_once_per_cyclic_change_of_its_pixel(activation, num_points, device):
    # As the image rolls, the unit sees row 2's columns in cyclic order, linearly
    # interpolated: its pre-activation x - 0.3 changes sign exactly once between two
    # neighbouring columns of different binary value, and never otherwise.
    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 2, (20, 1, 4, 6), generator=generator).float().to(device)
    row = images[:, 0, 2]
    expected = (row != row.roll(1, dims=-1)).sum(-1).float()
    assert expected.max() >= 4
    model = single_pixel_model(activation, bias=-0.3).to(device)
    torch.testing.assert_close(
        transitions(model, images, num_points=num_points, reduction="none"), expected
    )


@pytest.mark.parametrize(
    ("activation", "row", "expected"),
    [
        # region index [0, 2, 1, 0, 0, 2]: |0-2| + |2-1| + |1-0| + 0 + |0-2| + |2-0| = 8
        (nn.ReLU6(), [-1.0, 7.0, 3.0, -2.0, -1.0, 9.0], 8.0),
        # Hardtanh(-1, 1): the same region indices [0, 2, 1, 0, 0, 2]
        (nn.Hardtanh(), [-1.5, 7.0, 0.5, -2.0, -1.2, 9.0], 8.0),
    ],
)
@pytest.mark.parametrize("num_points", [6, 48])
def test_three_region_units_count_the_l1_distance_of_region_indices(
    activation, row, expected, num_points, device
):
    # With num_points = W neighbouring points are integer shifts, so -1 -> 7 is one jump
    # 0 -> 2 and must count 2, as the dense path crossing both boundaries does.
    images = torch.zeros(1, 1, 4, 6)
    images[0, 0, 2] = torch.tensor(row)
    model = single_pixel_model(activation, bias=0.0).to(device)
    assert transitions(model, images.to(device), num_points=num_points).item() == expected


def test_inplace_relu_gives_the_same_count(cnn, digits):
    inplace = copy.deepcopy(cnn)
    for module in inplace.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = True
    images = digits[0][:8]
    torch.testing.assert_close(
        transitions(inplace, images, reduction="none"), transitions(cnn, images, reduction="none")
    )


@pytest.mark.parametrize("batch_size", [1, 7, 64, 65, 1000])
def test_chunking_gives_the_same_counts(cnn, digits, batch_size):
    images = digits[0][:5]
    torch.testing.assert_close(
        transitions(cnn, images, batch_size=batch_size, reduction="none"),
        transitions(cnn, images, reduction="none"),
    )


def test_reduction_none_and_mean(cnn, digits):
    images = digits[0][:6]
    counts = transitions(cnn, images, num_points=16, reduction="none")
    assert counts.shape == (6,)
    assert counts.dtype == torch.float32
    assert torch.equal(counts, counts.round())
    mean = transitions(cnn, images, num_points=16)
    assert mean.ndim == 0
    torch.testing.assert_close(mean, counts.mean())


def test_leaves_the_model_untouched(cnn, digits, untouched):
    images = digits[0][:4].clone()
    with untouched(cnn):
        transitions(cnn, images, batch_size=50)
    assert torch.equal(images, digits[0][:4])


def test_works_inside_inference_mode(cnn, digits):
    images = digits[0][:4]
    expected = transitions(cnn, images)
    with torch.inference_mode():
        assert transitions(cnn, images).item() == expected.item()


class Exploding(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_hooks_are_removed_after_an_exception():
    model = nn.Sequential(nn.Flatten(), nn.ReLU(), nn.ReLU6(), Exploding())
    with pytest.raises(RuntimeError, match="boom"):
        transitions(model, torch.randn(2, 1, 4, 4))
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert all(m.training for m in model.modules())


class FunctionalRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        return F.relu(self.linear(x.flatten(1)))


IMAGES = (3, 1, 8, 8)


@pytest.mark.parametrize(
    ("make_model", "shape", "kwargs", "match"),
    [
        (make_mlp, (3, 64), {}, "image inputs.*horizontal translations"),
        (make_mlp, (3, 8, 8), {}, r"\[N, C, H, W\]"),
        (make_mlp, IMAGES, {"num_points": 7}, "at least the image width 8"),
        (make_mlp, IMAGES, {"num_points": 0}, "`num_points` must be a positive integer"),
        (make_mlp, IMAGES, {"num_points": 16.0}, "`num_points` must be a positive integer"),
        (make_mlp, IMAGES, {"batch_size": 0}, "`batch_size` must be a positive integer"),
        (make_mlp, IMAGES, {"reduction": "sum"}, "use one of 'mean', 'none'"),
        (FunctionalRelu, IMAGES, {}, r"F\.relu"),
        (nn.Flatten, IMAGES, {}, "no activation module"),
    ],
)
def test_bad_input_names_the_fix(make_model, shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        transitions(make_model(), torch.zeros(shape), **kwargs)


def test_deterministic_and_independent_of_other_images(cnn, digits):
    images = digits[0][:6]
    counts = transitions(cnn, images, num_points=16, reduction="none")
    assert torch.equal(counts, transitions(cnn, images, num_points=16, reduction="none"))
    assert torch.equal(counts[2:3], transitions(cnn, images[2:3], num_points=16, reduction="none"))
