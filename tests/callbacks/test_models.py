"""The default suite drops into the models people train, compiled or not.

One real ``Trainer.fit`` per model family on the digits (upsampled to 3x32x32 for the
torchvision models, quantized to 64 token ids for the text models, read row by row for
the LSTM), with ``GeneralizationMonitor()`` and no argument but the batch keys: every
logged value is finite, and the weights are bitwise those of the same fit without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
import torchvision
from lightning.pytorch import LightningModule, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from gapwatch import GeneralizationMonitor
from tests.callbacks.conftest import make_trainer, read_scalars


def _digits(n: int) -> tuple[Tensor, Tensor]:
    data = load_digits()
    images = torch.tensor(data.images[:n], dtype=torch.float32).unsqueeze(1)
    return (images - 4.9) / 6.0, torch.tensor(data.target[:n])


def _rgb32(n: int) -> tuple[Tensor, Tensor]:
    images, labels = _digits(n)
    return F.interpolate(images, size=32, mode="bilinear").repeat(1, 3, 1, 1), labels


def _tokens(n: int) -> tuple[Tensor, Tensor]:
    images, labels = _digits(n)
    return (images * 6.0 + 4.9).round().clamp(0, 16).long().flatten(1), labels


def _rows(n: int) -> tuple[Tensor, Tensor]:
    images, labels = _digits(n)
    return images.squeeze(1), labels  # a sequence of 8 rows of 8 pixels


class _TextClassifier(nn.Module):
    """Token ids -> embedding -> one TransformerEncoder layer -> mean -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(17, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 10)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(1))


class _LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 16, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, rows: Tensor) -> Tensor:
        out, _ = self.rnn(rows)
        return self.head(out[:, -1])


def _vit() -> nn.Module:
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=10,
    )  # fmt: skip
    # torchvision zero-initializes the head, so every output is 0 before the first step:
    # rho is 0 (log_norm_product -inf) and the margin has no scale (NaN) there; a trained
    # head is never all zero.
    nn.init.normal_(vit.heads.head.weight, std=0.02)
    return vit


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.2), nn.Linear(128, 10),
    )  # fmt: skip


FAMILIES: dict[str, tuple[Callable[[], nn.Module], Callable[[int], tuple[Tensor, Tensor]], int]] = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), _rgb32, 32),
    "vgg11": (lambda: torchvision.models.vgg11(num_classes=10), _rgb32, 24),
    "mobilenet_v3_small": (
        lambda: torchvision.models.mobilenet_v3_small(num_classes=10), _rgb32, 32
    ),
    "vit": (_vit, _rgb32, 48),
    "transformer_tokens": (_TextClassifier, _tokens, 96),
    "lstm": (_LSTMClassifier, _rows, 96),
    "mlp": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
            _digits, 96),
    "cnn": (_cnn, _digits, 96),
}  # fmt: skip


class _Classifier(LightningModule):
    def __init__(self, net: nn.Module, compiled: bool) -> None:
        super().__init__()
        self.net = torch.compile(net, backend="aot_eager") if compiled else net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)


def _fit(
    tmp_path, module: LightningModule, train: Dataset, val: Dataset, monitor: Any
) -> dict[str, Tensor]:
    logger = TensorBoardLogger(tmp_path, name="", version="") if monitor else False
    trainer = make_trainer(
        tmp_path,
        callbacks=[monitor] if monitor else [],
        logger=logger,
        max_epochs=1,
        limit_train_batches=2,
    )
    train_loader = DataLoader(train, batch_size=8, shuffle=True)
    trainer.fit(module, train_loader, DataLoader(val, batch_size=16))
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def _check(tmp_path, make: Callable[[], LightningModule], train, val, **keys: str) -> None:
    seed_everything(0, workers=True, verbose=False)
    monitor = GeneralizationMonitor(**keys)
    watched = _fit(tmp_path / "with", make(), train, val, monitor)
    seed_everything(0, workers=True, verbose=False)
    alone = _fit(tmp_path / "without", make(), train, val, None)
    assert watched.keys() == alone.keys()
    changed = [name for name in alone if not torch.equal(watched[name], alone[name])]
    assert not changed, f"the suite changed training: {changed}"
    scalars = read_scalars(tmp_path / "with")
    logged = {tag: values for tag, values in scalars.items() if tag.startswith("gapwatch/")}
    for name in ("test_loss", "sensitivity", "jacobian_norm", "normalized_train_loss"):
        assert f"gapwatch/{name}" in logged
    bad = {tag: v for tag, v in logged.items() if not all(map(math.isfinite, v.values()))}
    assert not bad, f"non-finite values logged: {bad}"
    assert len(monitor.history) == 2


def _split(name: str) -> tuple[Callable[[], nn.Module], Dataset, Dataset]:
    make_net, data, n = FAMILIES[name]
    x, y = data(n)
    cut = n * 3 // 4
    return make_net, TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_default_suite_runs_on_the_family(tmp_path, name):
    make_net, train, val = _split(name)
    _check(tmp_path, lambda: _Classifier(make_net(), compiled=False), train, val)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer_tokens", "resnet18"])
def test_the_default_suite_runs_on_the_compiled_family(tmp_path, name):
    make_net, train, val = _split(name)
    _check(tmp_path, lambda: _Classifier(make_net(), compiled=True), train, val)


def test_a_lightning_module_compiled_as_a_whole(tmp_path):
    make_net, train, val = _split("cnn")

    def make() -> LightningModule:
        return torch.compile(_Classifier(make_net(), compiled=False), backend="aot_eager")

    _check(tmp_path, make, train, val)


# -- an HF-style model: keyword inputs in, an output object with `.logits` out ----------


@dataclass
class _Output:
    logits: Tensor
    hidden_states: Tensor


class _HFStyle(LightningModule):
    """``forward(input_ids, attention_mask)`` returning ``.logits``, trained on dict batches."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(17, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.classifier = nn.Linear(16, 10)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> _Output:
        hidden = self.encoder(self.embeddings(input_ids), src_key_padding_mask=attention_mask == 0)
        weights = attention_mask.unsqueeze(-1).float()
        pooled = (hidden * weights).sum(1) / weights.sum(1)
        return _Output(self.classifier(pooled), hidden)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self(batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(out.logits, batch["labels"])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        out = self(batch["input_ids"], batch["attention_mask"])
        self.log("val_loss", F.cross_entropy(out.logits, batch["labels"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)


class _Encoded(Dataset):
    """``{"input_ids", "attention_mask", "labels"}`` samples; the last 16 ids padded away."""

    def __init__(self, ids: Tensor, labels: Tensor) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        mask = torch.ones(64, dtype=torch.long)
        mask[48:] = 0
        return {"input_ids": self.ids[i], "attention_mask": mask, "labels": self.labels[i]}


def test_an_hf_style_model_on_dict_batches_needs_only_the_target_key(tmp_path, caplog):
    ids, labels = _tokens(96)
    train, val = _Encoded(ids[:72], labels[:72]), _Encoded(ids[72:], labels[72:])
    with caplog.at_level("INFO"):
        _check(tmp_path, _HFStyle, train, val, target_key="labels")
    messages = " ".join(record.message for record in caplog.records)
    assert "the model returns a _Output; gapwatch reads its .logits" in messages
    assert "output sensitivity perturbs the output of 'embeddings'" in messages
