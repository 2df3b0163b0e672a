"""The demo's models: small CNNs and MLPs for 8x8 digits or 28x28 / 32x32 images."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch import LightningModule
from torch import Tensor, nn


def digits_cnn(
    width: int = 16,
    *,
    in_channels: int = 1,
    image_size: int = 8,
    batch_norm: bool = True,
    dropout: float = 0.25,
) -> nn.Module:
    """A small ReLU CNN for square images, ``[N, 1, 8, 8]`` digits by default.

    Its last hidden layer, the one unit ablation picks, is module ``"5"``.
    """

    def norm(channels: int) -> nn.Module:
        return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()

    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        norm(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        norm(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(2 * width * (image_size // 2) ** 2, 10),
    )


def digits_mlp(
    width: int = 64, depth: int = 2, init_scale: float = 1.0, *, in_features: int = 64
) -> nn.Module:
    """A ReLU MLP for flattened images; ``init_scale`` multiplies every initial weight."""
    layers: list[nn.Module] = [nn.Flatten()]
    d_in = in_features
    for _ in range(depth):
        layers += [nn.Linear(d_in, width), nn.ReLU()]
        d_in = width
    layers.append(nn.Linear(d_in, 10))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(init_scale)
    return model


class DigitsClassifier(LightningModule):
    """Cross-entropy training of a digits model with SGD and momentum.

    Args:
        arch: ``"cnn"`` (BatchNorm, Dropout) or ``"mlp"``.
        width: Channels (CNN) or hidden units (MLP).
        in_channels: Image channels (1 for digits and MNIST, 3 for CIFAR-10).
        image_size: Image height and width (8 for digits).
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty.
    """

    def __init__(
        self,
        arch: Literal["cnn", "mlp"] = "cnn",
        width: int = 16,
        in_channels: int = 1,
        image_size: int = 8,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if arch == "cnn":
            self.net = digits_cnn(width, in_channels=in_channels, image_size=image_size)
        else:
            self.net = digits_mlp(width, in_features=in_channels * image_size**2)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, 10]``."""
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """One cross-entropy step."""
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Held-out loss and accuracy."""
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        """SGD with momentum."""
        return torch.optim.SGD(
            self.parameters(),
            lr=self.hparams["lr"],
            momentum=self.hparams["momentum"],
            weight_decay=self.hparams["weight_decay"],
        )
