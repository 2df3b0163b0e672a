import torch
import torchvision
from torch import nn

from gapwatch.functional.normalized_loss import layerwise_obstacle
from tests.conftest import make_mlp


class _Encoder(nn.Module):
    """Token ids and a mask -> embedding, transformer layer, masked mean, linear (HF-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(17, 16)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
        self.classifier = nn.Linear(16, 10)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(self.embeddings(input_ids), src_key_padding_mask=attention_mask == 0)
        weights = attention_mask.unsqueeze(-1).float()
        # The hidden states are returned beside the logits, as HF models do.
        return self.classifier((hidden * weights).sum(1) / weights.sum(1)), hidden


def test_layerwise_obstacle_names_what_breaks_the_product_of_norms() -> None:
    assert layerwise_obstacle(make_mlp()) is None
    saturating = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    assert "Tanh" in layerwise_obstacle(saturating)
    # The modules that are no factor of rho are named before any shape of the graph.
    reason = layerwise_obstacle(_Encoder())
    assert "Embedding" in reason
    assert "MultiheadAttention" in reason
    assert "bypasses" in layerwise_obstacle(torchvision.models.resnet18(num_classes=10))
