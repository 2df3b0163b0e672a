"""How a model is called and read: keyword inputs and the outputs that hold the logits."""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from gapwatch.functional import normalization_factor
from gapwatch.functional._common import as_outputs, forward_chunks
from gapwatch.functional._inputs import KeywordInputs, cat_inputs, describe_output


def test_keyword_inputs_select_rows_of_every_tensor():
    batch = KeywordInputs({"a": torch.arange(10).view(5, 2), "b": torch.arange(5.0)})
    assert len(batch) == 5
    assert batch.shape[0] == 5
    assert torch.equal(batch[1:3]["a"], torch.tensor([[2, 3], [4, 5]]))
    assert torch.equal(batch[torch.tensor([True, False, True, False, False])]["b"],
                       torch.tensor([0.0, 2.0]))  # fmt: skip
    assert torch.equal(cat_inputs([batch[:2], batch[2:]])["a"], batch["a"])
    assert batch.to(dtype=torch.float64)["a"].dtype == torch.int64  # ids stay ids
    assert sorted(dict(batch)) == ["a", "b"]
    with pytest.raises(ValueError, match="share their first"):
        KeywordInputs({"a": torch.zeros(3, 1), "b": torch.zeros(4)})


@pytest.mark.parametrize(
    ("wrap", "what"),
    [
        (lambda z: z, None),
        (lambda z: (z, z.sum()), "first element"),
        (lambda z: {"logits": z, "hidden": z}, "'logits' entry"),
        (lambda z: OrderedDict(loss=None, logits=z), "'logits' entry"),
        (lambda z: SimpleNamespace(logits=z, hidden_states=None), ".logits"),
    ],
)
def test_the_logits_are_found_in_what_models_commonly_return(wrap, what):
    z = torch.randn(4, 3)
    assert torch.equal(as_outputs(wrap(z)), z)
    read = describe_output(wrap(z))
    assert read is None if what is None else what in read


class _KeywordModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc = nn.Embedding(9, 4), nn.Linear(4, 2)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        h = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        return {"logits": self.fc(h.sum(1))}


def test_keyword_inputs_are_chunked_and_passed_by_name():
    model = _KeywordModel()
    ids = torch.randint(0, 9, (7, 3))
    mask = torch.ones(7, 3, dtype=torch.long)
    batch = KeywordInputs({"input_ids": ids, "attention_mask": mask})
    outputs = torch.cat([out for _, _, out in forward_chunks(model, batch, 3)])
    torch.testing.assert_close(outputs, model(ids, mask)["logits"])
    # Output normalization on keyword reference inputs: the mean output norm.
    rho = normalization_factor(model, mode="output", reference_inputs=batch)
    assert rho.item() == pytest.approx(outputs.norm(dim=1).mean().item(), rel=1e-5)
