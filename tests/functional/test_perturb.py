"""Perturbing a module's output (``perturb_at``) against the same computation done by hand."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn
from torch.func import jacrev

from gapwatch.functional import RowSeeds, jacobian_norm, output_sensitivity
from gapwatch.functional._inputs import KeywordInputs
from gapwatch.functional._perturb import default_perturb_at
from gapwatch.functional.sensitivity import noise_response


class _Text(nn.Module):
    """Token ids -> embedding -> masked mean -> MLP; HF-style keyword call and output."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.head = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def rest(self, h: Tensor, mask: Tensor) -> Tensor:
        """Everything after the embedding: the function ``perturb_at='embed'`` measures."""
        weights = mask.unsqueeze(-1).float()
        return self.head((h * weights).sum(1) / weights.sum(1))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.rest(self.embed(input_ids), attention_mask))


def _tokens(n: int = 12) -> KeywordInputs:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 20, (n, 5), generator=generator)
    mask = torch.ones(n, 5, dtype=torch.long)
    mask[::3, 3:] = 0  # padding that the mean leaves out
    return KeywordInputs({"input_ids": ids, "attention_mask": mask})


def test_sensitivity_at_the_embedding_is_the_noise_response_of_the_rest():
    torch.manual_seed(0)
    model, inputs = _Text().eval(), _tokens()
    seeds = torch.arange(100, 100 + len(inputs))
    got = noise_response(
        model, inputs, sigma=0.3, num_draws=2, generator=RowSeeds(seeds), perturb_at="embed"
    )
    with torch.no_grad():
        h, mask = model.embed(inputs["input_ids"]), inputs["attention_mask"]
        clean = model.rest(h, mask)
        rows = torch.arange(len(inputs)).repeat_interleave(2)
        streams = torch.arange(2).repeat(len(inputs))
        noise = RowSeeds(seeds).draw(rows, h.shape[1:], torch.device("cpu"), streams=streams)
        noisy = model.rest(h[rows] + 0.3 * noise, mask[rows])
    expected = (noisy.double() - clean[rows].double()).mean(1, keepdim=True)
    torch.testing.assert_close(got, expected)
    variance = output_sensitivity(
        model, inputs, sigma=0.3, num_draws=2, generator=RowSeeds(seeds), perturb_at="embed"
    )
    assert variance.item() == pytest.approx(expected.var(unbiased=False).item(), rel=1e-5)


@pytest.mark.parametrize("output", ["logits", "softmax"])
def test_jacobian_at_the_embedding_is_the_jacobian_of_the_rest(output):
    torch.manual_seed(0)
    model, inputs = _Text().eval(), _tokens(6)
    got = jacobian_norm(
        model, inputs, output=output, method="exact", reduction="none", perturb_at="embed"
    )
    h = model.embed(inputs["input_ids"]).detach()
    for i in range(len(inputs)):

        def f(hi: Tensor, i: int = i) -> Tensor:
            out = model.rest(hi.unsqueeze(0), inputs["attention_mask"][i : i + 1])[0]
            return out.softmax(0) if output == "softmax" else out

        expected = jacrev(f)(h[i]).norm()
        assert got[i].item() == pytest.approx(expected.item(), rel=1e-4)


def test_integer_inputs_without_perturb_at_name_the_embedding():
    model = nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.Linear(20, 3))
    ids = torch.randint(0, 20, (4, 5))
    with pytest.raises(TypeError, match=r"`perturb_at='0'`"):
        output_sensitivity(model, ids)
    with pytest.raises(TypeError, match=r"`perturb_at='0'`"):
        jacobian_norm(model, ids)
    with pytest.raises(ValueError, match=r"`perturb_at='body'` names no submodule"):
        jacobian_norm(model, ids, perturb_at="body")
    assert output_sensitivity(model, ids, perturb_at="0").item() > 0


def test_default_perturb_at():
    images = torch.randint(0, 255, (2, 1, 4, 4), dtype=torch.uint8)

    class Bytes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(self.conv(x.float() / 255).flatten(1))

    assert default_perturb_at(Bytes(), images) == "conv"
    assert default_perturb_at(Bytes(), images.float()) is None
    assert default_perturb_at(_Text(), _tokens(2)) == "embed"


def test_a_module_that_returns_no_tensor_is_refused_naming_perturb_at():
    model = nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.Linear(20, 3))

    class Pick(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.rnn, self.fc = nn.Embedding(20, 4), nn.LSTM(4, 4), nn.Linear(4, 3)

        def forward(self, ids: Tensor) -> Tensor:
            out, _ = self.rnn(self.embed(ids))
            return self.fc(out[:, -1])

    class Positions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.position, self.token = nn.Embedding(5, 4), nn.Embedding(20, 4)
            self.fc = nn.Linear(4, 3)

        def forward(self, ids: Tensor) -> Tensor:
            at = self.position(torch.arange(ids.shape[1]).unsqueeze(0))  # shared by the rows
            return self.fc((self.token(ids) + at).mean(1))

    ids = torch.randint(0, 20, (3, 5))
    with pytest.raises(TypeError, match=r"`perturb_at='rnn'` must name a module that returns"):
        output_sensitivity(Pick(), ids, perturb_at="rnn")
    with pytest.raises(ValueError, match=r"`perturb_at='position'` .* one row per input \(3\)"):
        jacobian_norm(Positions(), ids, perturb_at="position")
    assert jacobian_norm(Positions(), ids, perturb_at="token").item() > 0
    assert default_perturb_at(Positions(), ids) == "token"
    assert jacobian_norm(model, ids, perturb_at="0").item() >= 0


def test_finding_the_module_moves_no_batchnorm_buffer():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    images = torch.randint(0, 255, (4, 1, 4, 4), dtype=torch.uint8)

    class Bytes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x.float() / 255)

    assert default_perturb_at(Bytes(), images) == "net.0"
    assert model.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
