import pytest
import torch
import torchvision
from torch import nn

from gapwatch.functional.ablation import split_model, unit_ablation


@pytest.mark.parametrize("method", ["fx", "hook"])
def test_run_gives_the_outputs_and_the_capture_from_one_pass(method):
    # The suffix starts with an in-place ReLU: it must not rewrite the kept activation.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).eval()
    x = torch.randn(20, 4)
    rows: list[int] = []
    model[0].register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[0]))
    split = split_model(model, "0", method=method)
    activation, live, outputs = split.run(x, batch_size=7)
    assert rows == [7, 7, 6], "the layer ran more than once per sample"
    captured, captured_live = split.capture(x, batch_size=7)
    assert (activation < 0).any(), "the ReLU after the layer clipped the kept activation"
    assert torch.equal(activation, captured)
    assert all(torch.equal(a, b) for a, b in zip(live, captured_live, strict=True))
    with torch.no_grad():
        # Chunk by chunk, as `run` computes: a matmul over 20 rows may round differently.
        assert torch.equal(outputs, torch.cat([model(x[i : i + 7]) for i in range(0, 20, 7)]))
    keep = torch.arange(20) % 3 == 0  # rows in every chunk, and a chunk end
    kept, kept_live, all_outputs = split.run(x, batch_size=7, keep=keep)
    assert torch.equal(kept, captured[keep])
    assert all(torch.equal(a, b[keep]) for a, b in zip(kept_live, captured_live, strict=True))
    assert torch.equal(all_outputs, outputs)


def test_bad_layer_lists_valid_paths():
    model = torchvision.models.resnet18(weights=None)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"Did you mean 'layer4'.*layer3\.1, layer4, layer4\.0"):
        unit_ablation(model, "layer5", x, y, num_classes=1000)
    with pytest.raises(ValueError, match="Valid paths: 0, 1, 2"):
        split_model(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)), "fc")


def test_layer_output_must_be_2d_or_4d():
    model = nn.Sequential(nn.Flatten(), nn.Unflatten(1, (4, 16)), nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(ValueError, match=r"\[N, F\].*\[N, C, H, W\]"):
        unit_ablation(model, "1", torch.randn(3, 64), torch.tensor([0, 1, 2]), num_classes=3)


def test_layer_used_twice_is_rejected():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 4)

        def forward(self, x):
            return self.layer(self.layer(x))

    for method in ("fx", "hook"):
        with pytest.raises(ValueError, match="exactly once"):
            unit_ablation(
                Twice(),
                "layer",
                torch.randn(2, 4),
                torch.tensor([0, 1]),
                num_classes=4,
                method=method,
            )
