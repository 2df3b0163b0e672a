import pytest
import torch
import torchvision
from torch import nn

from gapwatch.functional.ablation import (
    UnbatchableSplitError,
    ablation_from_activations,
    ablation_in_chunks,
    split_model,
    unit_ablation,
)
from tests.conftest import make_mlp
from tests.functional.test_ablation_curves import assert_matches_authors

# ---------------------------------------------------------------- independent references


def naive_curves(model, layer, inputs, targets, classes, levels=None):
    """One full forward pass per (class, order, level), the layer's output masked by a hook."""
    module = model.get_submodule(layer)
    curves, seen = {}, []
    model.eval()
    with torch.no_grad():
        for j in classes:
            xs = inputs[targets == j]
            handle = module.register_forward_hook(lambda m, i, out: seen.append(out.clone()))
            model(xs)
            handle.remove()
            a = seen[-1]
            score = (a.abs().sum(dim=(2, 3)) if a.ndim == 4 else a.abs()).mean(0)
            orders = [
                torch.sort(score, descending=True, stable=True).indices,
                torch.sort(score, stable=True).indices,
            ]
            for o, order in enumerate(orders):
                for n in range(a.shape[1] + 1) if levels is None else levels(a.shape[1]):

                    def mask(m, i, out, removed=order[:n]):
                        out = out.clone()
                        out[:, removed] = 0
                        return out

                    handle = module.register_forward_hook(mask)
                    curves[j, o, n] = (model(xs).argmax(1) == j).float().mean().item()
                    handle.remove()
    return curves


def assert_matches_naive(result, reference):
    assert reference
    for (j, o, n), expected in reference.items():
        row = result.classes.tolist().index(j)
        got = (result.curves if o == 0 else result.curves_reversed)[row, n].item()
        assert got == pytest.approx(expected, abs=1e-6), (j, o, n)


def spread(units):
    """A few levels of a wide layer: both ends, early levels and a deterministic spread."""
    return sorted({0, 1, 2, 3, units // 3, units // 2, 2 * units // 3, units - 1, units})


def subset(inputs, targets, classes, per_class):
    rows = torch.cat([torch.nonzero(targets == j)[:per_class, 0] for j in classes])
    return inputs[rows], targets[rows]


@pytest.fixture(scope="module")
def trained_mlp(digits):
    """An MLP trained briefly on digits, so that curves start high and fall."""
    torch.manual_seed(0)
    model = make_mlp()
    x, y = digits
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


class Residual(nn.Module):
    """Skip connections that cross every cut, and a constant read after the layer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(64, 16)
        self.body = nn.Sequential(nn.ReLU(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 10)
        self.register_buffer("shift", torch.linspace(-1, 1, 10))

    def forward(self, x):
        x = x.flatten(1)
        h = self.stem(x)
        return self.head(self.body(h) + h) + x[:, :10] + self.shift


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        return self.net(x) if x.sum() > -1e9 else -self.net(x)


class BatchSizeReused(nn.Module):
    """Reads the batch size before the layer and reuses it after: not batchable by fx."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 64, 10)

    def forward(self, x):
        n = x.shape[0]
        return self.head(self.conv(x).reshape(n, -1))


# ---------------------------------------------------------------- eqs. 2-6 by hand


def test_a_trained_mlp_matches_the_authors_quantities(trained_mlp, digits):
    x, y = subset(*digits, classes=range(10), per_class=10)
    paper = unit_ablation(trained_mlp, "3", x, y, num_classes=10)
    authors = unit_ablation(trained_mlp, "3", x, y, num_classes=10, kappa="authors")
    assert torch.equal(paper.curves, authors.curves)
    m = paper.curves.shape[1] - 1
    # The class the emptied layer predicts has E_r(M) = 1, and there n0_r < M regardless.
    degenerate = (paper.curves_reversed[:, -1] == 1).nonzero().flatten().tolist()
    assert len(degenerate) == 1
    assert paper.n0_r[degenerate[0]].item() < m
    refs = assert_matches_authors(authors, chance=0.1)
    kappas = [r["kappa_authors"] for r in refs]
    assert authors.kappa_per_class.tolist() == pytest.approx(kappas, abs=1e-6)
    kappas = [r["kappa_paper"] for r in refs]
    assert paper.kappa_per_class.tolist() == pytest.approx(kappas, abs=1e-6)


# ---------------------------------------------------------------- an analytic suffix


def test_identity_suffix_gives_analytic_curves():
    # Logits are the activations themselves: every unit is 1, the own class's unit 3.
    targets = torch.tensor([0, 1, 2, 1])
    activations = torch.ones(4, 3) + 2 * nn.functional.one_hot(targets, 3)
    expected = {  # worked out by hand; an all-zero output predicts class 0
        0: ([1, 0, 0, 1], [1, 1, 1, 1]),
        1: ([1, 0, 0, 0], [1, 1, 1, 0]),
        2: ([1, 0, 0, 0], [1, 1, 1, 0]),
    }
    for batch_size in (None, 1, 5):
        result = ablation_from_activations(
            lambda a, live: a, activations, targets, num_classes=3, batch_size=batch_size
        )
        for j, (forward, backward) in expected.items():
            assert result.curves[j].tolist() == forward
            assert result.curves_reversed[j].tolist() == backward


# ---------------------------------------------------------------- against the naive loop


def test_mlp_matches_naive_reference(trained_mlp, digits):
    x, y = subset(*digits, classes=range(10), per_class=8)
    result = unit_ablation(trained_mlp, "3", x, y, num_classes=10)
    assert result.curves.shape == (10, 33)
    assert_matches_naive(result, naive_curves(trained_mlp, "3", x, y, range(10)))
    assert (result.curves[:, 0] > 0.5).float().mean() > 0.8  # trained: E(0) is high
    assert 0 <= result.zeta.item() <= 1
    assert 0 <= result.kappa.item() <= 1


def test_cnn_matches_naive_reference_and_leaves_model_untouched(cnn, digits, untouched):
    x, y = subset(*digits, classes=[1, 4, 7], per_class=5)
    with untouched(cnn):
        result = unit_ablation(cnn, "5", x, y, num_classes=10, classes=[1, 4, 7], batch_size=64)
    assert result.classes.tolist() == [1, 4, 7]
    assert result.curves.shape == (3, 17)
    assert_matches_naive(result, naive_curves(cnn, "5", x, y, [1, 4, 7]))


@pytest.fixture(scope="module")
def torchvision_models():
    torch.manual_seed(0)
    vgg = torchvision.models.vgg11(weights=None, num_classes=3)
    # The 25088x4096 classifier would dominate the run time; the split, which is what is
    # tested here, does not depend on its width.
    vgg.classifier = nn.Linear(512 * 7 * 7, 3)
    return {"vgg11": vgg, "resnet18": torchvision.models.resnet18(weights=None, num_classes=3)}


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("resnet18", "layer4"),
        ("resnet18", "layer4.1.conv1"),  # the block's skip connection crosses the cut
        ("vgg11", "features.18"),
    ],
)
def test_torchvision_models_match_naive_reference(torchvision_models, name, layer):
    model = torchvision_models[name]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 2, 0, 2])
    assert split_model(model, layer).method == "fx"
    result = unit_ablation(model, layer, x, y, num_classes=3, classes=[0, 2], batch_size=256)
    assert_matches_naive(result, naive_curves(model, layer, x, y, [0, 2], levels=spread))


def test_endpoints_are_plain_and_fully_ablated_accuracy(trained_mlp, digits):
    x, y = subset(*digits, classes=range(10), per_class=10)
    result = unit_ablation(trained_mlp, "2", x, y, num_classes=10)
    with torch.no_grad():
        plain = trained_mlp(x).argmax(1) == y
        handle = trained_mlp[2].register_forward_hook(lambda m, i, out: torch.zeros_like(out))
        ablated = trained_mlp(x).argmax(1) == y
        handle.remove()
    for row, j in enumerate(result.classes.tolist()):
        for curve in (result.curves, result.curves_reversed):
            assert curve[row, 0].item() == pytest.approx(plain[y == j].float().mean().item())
            assert curve[row, -1].item() == pytest.approx(ablated[y == j].float().mean().item())


# ---------------------------------------------------------------- the split itself


@pytest.mark.parametrize(
    ("name", "layer", "num_live"),
    [("resnet18", "layer4", 0), ("resnet18", "layer3.0.bn2", 1), ("vgg11", "features.18", 0)],
)
def test_split_reproduces_the_model(torchvision_models, name, layer, num_live):
    model = torchvision_models[name].eval()
    x = torch.randn(2, 3, 32, 32)
    split = split_model(model, layer)
    activation, live = split.capture(x)
    assert len(live) == num_live
    with torch.no_grad():
        assert torch.equal(split.suffix(activation, live), model(x))


@pytest.mark.parametrize(("factory", "layer"), [(Residual, "stem"), (Residual, "body.1")])
def test_fx_and_hook_agree(factory, layer, digits):
    torch.manual_seed(0)
    model = factory()
    x, y = subset(*digits, classes=range(10), per_class=3)
    traced = unit_ablation(model, layer, x, y, num_classes=10, method="fx")
    hooked = unit_ablation(model, layer, x, y, num_classes=10, method="hook")
    torch.testing.assert_close(traced.curves, hooked.curves, rtol=0, atol=1e-6)
    torch.testing.assert_close(traced.curves_reversed, hooked.curves_reversed, rtol=0, atol=1e-6)
    assert_matches_naive(traced, naive_curves(model, layer, x, y, range(10)))


def test_fx_and_hook_agree_on_cnn(cnn, digits):
    x, y = subset(*digits, classes=range(10), per_class=2)
    traced = unit_ablation(cnn, "3", x, y, num_classes=10, method="fx")
    hooked = unit_ablation(cnn, "3", x, y, num_classes=10, method="hook")
    assert split_model(cnn, "3").method == "fx"
    torch.testing.assert_close(traced.curves, hooked.curves, rtol=0, atol=1e-6)


def test_untraceable_model_falls_back_to_hook(digits):
    torch.manual_seed(0)
    model = Untraceable()
    x, y = subset(*digits, classes=range(10), per_class=2)
    assert split_model(model, "net.2").method == "hook"
    with pytest.raises(Exception, match="control flow"):
        split_model(model, "net.2", method="fx")
    result = unit_ablation(model, "net.2", x, y, num_classes=10)
    assert_matches_naive(result, naive_curves(model, "net.2", x, y, range(10)))


def test_unbatchable_live_value_falls_back_to_hook(digits):
    torch.manual_seed(0)
    model = BatchSizeReused()
    x, y = subset(*digits, classes=range(10), per_class=2)
    assert split_model(model, "conv").method == "fx"  # nothing tried: nothing found
    assert split_model(model, "conv", example_inputs=x[:2]).method == "hook"
    with pytest.raises(UnbatchableSplitError):
        split_model(model, "conv", method="fx", example_inputs=x[:2])
    with pytest.raises(UnbatchableSplitError, match="method='hook'"):
        unit_ablation(model, "conv", x, y, num_classes=10, method="fx")
    result = unit_ablation(model, "conv", x, y, num_classes=10)
    assert_matches_naive(result, naive_curves(model, "conv", x, y, range(10)))


# ---------------------------------------------------------------- contract


def test_batch_size_and_inference_mode_give_the_same_answer(cnn, digits):
    x, y = subset(*digits, classes=[0, 3], per_class=9)
    whole = unit_ablation(cnn, "5", x, y, num_classes=10, classes=[0, 3])
    for batch_size in (4, 40):  # smaller than a class, and several levels per chunk
        chunked = unit_ablation(
            cnn, "5", x, y, num_classes=10, classes=[0, 3], batch_size=batch_size
        )
        assert torch.equal(whole.curves, chunked.curves)
        assert torch.equal(whole.curves_reversed, chunked.curves_reversed)
    with torch.inference_mode():
        inside = unit_ablation(cnn, "5", x, y, num_classes=10, classes=[0, 3], batch_size=40)
    assert torch.equal(whole.curves, inside.curves)


def test_reuses_a_captured_activation(trained_mlp, digits):
    x, y = subset(*digits, classes=range(10), per_class=4)
    split = split_model(trained_mlp, "2")
    activation, live = split.capture(x, batch_size=7)
    logits = split.suffix(activation, live)
    torch.testing.assert_close(logits, trained_mlp(x), rtol=0, atol=0)
    reused = ablation_from_activations(split.suffix, activation, y, num_classes=10, live=live)
    direct = unit_ablation(trained_mlp, "2", x, y, num_classes=10)
    assert torch.equal(reused.curves, direct.curves)


class InfiniteUnit(nn.Module):
    """Adds +inf to unit 0 of its input: a layer output no mask should multiply."""

    def forward(self, x):
        return x + torch.tensor([float("inf"), 0.0, 0.0])


@pytest.mark.parametrize("method", ["fx", "hook"])
def test_a_removed_inf_unit_is_zeroed_not_turned_into_nan(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), InfiniteUnit(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([[1.0, 2.0, -1.0], [-1.0, -1.0, 1.0]]))
    x = torch.randn(12, 2)
    y = torch.zeros(12, dtype=torch.long)
    result = unit_ablation(model, "1", x, y, num_classes=2, classes=[0], method=method)
    # Unit 0 ranks first (the largest mean |U|): E removes it at level 1, E_r at level 3.
    assert torch.isfinite(result.curves).all()
    assert torch.isfinite(result.curves_reversed).all()
    assert_matches_naive(result, naive_curves(model, "1", x, y, [0]))


def test_classes_without_samples_are_skipped_with_a_warning(trained_mlp, digits):
    x, y = subset(*digits, classes=[2, 5], per_class=4)
    with pytest.warns(UserWarning, match="no samples"):
        result = unit_ablation(trained_mlp, "2", x, y, num_classes=10)
    assert result.classes.tolist() == [2, 5]
    with pytest.warns(UserWarning, match=r"\[7\]"):
        chosen = unit_ablation(trained_mlp, "2", x, y, num_classes=10, classes=[5, 7])
    assert chosen.classes.tolist() == [5]
    torch.testing.assert_close(chosen.curves[0], result.curves[1])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"targets": torch.zeros(4)}, TypeError, "integer class indices"),
        ({"targets": torch.tensor([0, 1, 2, 10])}, ValueError, "num_classes"),
        ({"num_classes": 0}, ValueError, "positive integer"),
        ({"chance": 1.5}, ValueError, r"\[0, 1\]"),
        ({"classes": [0, 0]}, ValueError, "distinct"),
        ({"classes": [11]}, ValueError, r"\[0, 10\)"),
        ({"method": "trace"}, ValueError, "'fx'"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"kappa": "mean"}, ValueError, r"Unknown kappa 'mean'; use one of 'paper', 'authors'"),
        ({"num_classes": 5, "classes": [0, 1]}, ValueError, "has 10 outputs but num_classes=5"),
    ],
)
def test_bad_input_names_the_fix(trained_mlp, kwargs, error, match):
    arguments = {
        "layer": "2",
        "inputs": torch.randn(4, 1, 8, 8),
        "targets": torch.tensor([0, 1, 2, 3]),
        "num_classes": 10,
    }
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        unit_ablation(trained_mlp, **arguments)


def test_ablation_in_chunks_equals_the_whole_capture(trained_mlp, digits):
    x, y = subset(*digits, classes=range(10), per_class=30)
    whole = unit_ablation(trained_mlp, "2", x, y, num_classes=10, batch_size=None)
    split = split_model(trained_mlp, "2")
    chunked = ablation_in_chunks(split, x, y, num_classes=10, classes=range(10), batch_size=37)
    torch.testing.assert_close(chunked.curves, whole.curves)
    torch.testing.assert_close(chunked.curves_reversed, whole.curves_reversed)
    torch.testing.assert_close(chunked.zeta, whole.zeta)
    torch.testing.assert_close(chunked.kappa, whole.kappa)
