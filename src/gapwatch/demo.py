"""A complete small setup to try gapwatch on: scikit-learn's bundled digits and a CNN.

Nothing here downloads anything: ``load_digits`` ships inside scikit-learn (install the
``examples`` extra). The train loader shuffles with its own ``torch.Generator``, the
case that catches callbacks which draw probes by iterating the loader.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


class DigitsDataModule(LightningDataModule):
    """The 1,797 8x8 digits, standardized, split into train and validation sets.

    Args:
        batch_size: Training batch size.
        val_fraction: Share of the samples held out for validation.
        label_noise: Share of training labels replaced by uniformly random classes.
        seed: Seeds the split, the label noise and the shuffle order.
        flatten: Deliver ``[N, 64]`` vectors instead of ``[N, 1, 8, 8]`` images.
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.3,
        label_noise: float = 0.0,
        seed: int = 0,
        flatten: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must lie in (0, 1), got {val_fraction}.")
        if not 0.0 <= label_noise <= 1.0:
            raise ValueError(f"`label_noise` must lie in [0, 1], got {label_noise}.")
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.label_noise = label_noise
        self.seed = seed
        self.flatten = flatten

    def setup(self, stage: str | None = None) -> None:
        """Load, split, standardize with train statistics, and corrupt train labels."""
        from sklearn.datasets import load_digits

        data = load_digits()
        images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
        labels = torch.tensor(data.target, dtype=torch.long)
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(labels), generator=generator)
        n_val = round(self.val_fraction * len(labels))
        val, train = order[:n_val], order[n_val:]
        mean, std = images[train].mean(), images[train].std()
        images = (images - mean) / std
        if self.flatten:
            images = images.flatten(1)
        train_labels = labels[train].clone()
        noisy = torch.rand(len(train), generator=generator) < self.label_noise
        train_labels[noisy] = torch.randint(0, 10, (int(noisy.sum()),), generator=generator)
        self.train_set = TensorDataset(images[train], train_labels)
        self.val_set = TensorDataset(images[val], labels[val])

    def train_dataloader(self) -> DataLoader:
        """Shuffled with a loader-owned generator."""
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator
        )

    def val_dataloader(self) -> DataLoader:
        """The held-out samples in a fixed order."""
        return DataLoader(self.val_set, batch_size=256)


#: name -> (torchvision class name, channels, image size, per-channel mean, per-channel std)
VISION_DATASETS: dict[str, tuple[str, int, int, tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ("MNIST", 1, 28, (0.1307,), (0.3081,)),
    "fashion-mnist": ("FashionMNIST", 1, 28, (0.2860,), (0.3530,)),
    "cifar10": ("CIFAR10", 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


class VisionDataModule(LightningDataModule):
    """MNIST, Fashion-MNIST or CIFAR-10 read from a local directory; never downloaded.

    ``root`` holds the files in torchvision's own layout (``MNIST/raw/...``,
    ``FashionMNIST/raw/...``, ``cifar-10-batches-py/...``). The official test split is the
    held-out set. CIFAR-10's checksums are not verified, so a local copy from any source
    works.

    Args:
        name: ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"``.
        root: Directory with the data set's files.
        batch_size: Training batch size.
        label_noise: Share of training labels replaced by uniformly random classes.
        seed: Seeds the label noise and the shuffle order.
        train_size: Use only the first ``train_size`` training samples (``None``: all).
    """

    def __init__(
        self,
        name: Literal["mnist", "fashion-mnist", "cifar10"],
        root: str,
        batch_size: int = 128,
        label_noise: float = 0.0,
        seed: int = 0,
        train_size: int | None = None,
    ) -> None:
        super().__init__()
        if name not in VISION_DATASETS:
            raise ValueError(f"Unknown data set {name!r}; use one of {sorted(VISION_DATASETS)}.")
        self.name, self.root = name, root
        self.batch_size, self.label_noise, self.seed = batch_size, label_noise, seed
        self.train_size = train_size
        _, self.in_channels, self.image_size, self._mean, self._std = VISION_DATASETS[name]

    def setup(self, stage: str | None = None) -> None:
        """Open both splits from ``root`` and corrupt the requested share of train labels."""
        from torch.utils.data import Subset

        train, test = (self._open(split) for split in (True, False))
        if self.train_size is not None:
            train = Subset(train, range(min(self.train_size, len(train))))
        self.train_set, self.val_set = _NoisyLabels(train, self.label_noise, self.seed), test

    def _open(self, train: bool) -> Any:
        import torchvision
        from torchvision import transforms

        assert self.name is not None  # for the type checker
        cls_name = VISION_DATASETS[self.name][0]
        cls = _local_cifar10() if cls_name == "CIFAR10" else getattr(torchvision.datasets, cls_name)
        transform = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize(self._mean, self._std)]
        )
        try:
            return cls(self.root, train=train, download=False, transform=transform)
        except RuntimeError as error:
            raise FileNotFoundError(
                f"No {cls_name} files below {self.root!r} ({error}). gapwatch never "
                f"downloads: place the data set there in torchvision's layout first."
            ) from None

    def train_dataloader(self) -> DataLoader:
        """Shuffled with a loader-owned generator."""
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator
        )

    def val_dataloader(self) -> DataLoader:
        """The official test split."""
        return DataLoader(self.val_set, batch_size=512)


class _NoisyLabels(torch.utils.data.Dataset):
    """A view of a classification data set with a fixed share of labels randomized."""

    def __init__(self, base: Any, share: float, seed: int, num_classes: int = 10) -> None:
        self.base = base
        generator = torch.Generator().manual_seed(seed)
        noisy = torch.rand(len(base), generator=generator) < share
        random_labels = torch.randint(0, num_classes, (len(base),), generator=generator)
        self.replacement = torch.where(noisy, random_labels, -1).tolist()

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.base[index]
        replacement = self.replacement[index]
        return image, label if replacement < 0 else replacement


def _local_cifar10() -> type:
    from torchvision.datasets import CIFAR10

    class LocalCIFAR10(CIFAR10):
        # Only presence is checked: a local copy need not match the download's md5.
        def _check_integrity(self) -> bool:
            files = [name for name, _ in self.train_list + self.test_list]
            return all((self._folder / name).is_file() for name in files)

        def _load_meta(self) -> None:
            with open(self._folder / self.meta["filename"], "rb") as file:
                self.classes = pickle.load(file, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

        @property
        def _folder(self) -> Path:
            return Path(self.root) / self.base_folder

    return LocalCIFAR10


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


def format_table(history: list[dict[str, float]], names: list[str]) -> str:
    """A markdown table of ``names`` (columns) at every evaluation in ``history`` (rows)."""
    header = "| step | " + " | ".join(names) + " |"
    rule = "|---:|" + "---:|" * len(names)
    rows = [
        f"| {int(row['step'])} | "
        + " | ".join(f"{row[n]:.4g}" if n in row else "" for n in names)
        + " |"
        for row in history
    ]
    return "\n".join([header, rule, *rows])


def main(argv: list[str] | None = None) -> None:
    """Train a CNN on digits with the full gapwatch suite; write logs and a report."""
    import argparse

    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import EarlyStopping
    from lightning.pytorch.loggers import TensorBoardLogger

    from gapwatch import GeneralizationMonitor

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument(
        "--data", choices=["digits", *VISION_DATASETS], default="digits", help="data set"
    )
    parser.add_argument("--data-dir", help="local directory of a torchvision data set")
    parser.add_argument("--train-size", type=int, help="use only this many training samples")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--arch", choices=["cnn", "mlp"], default="cnn")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--label-noise", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu, auto, ...")
    parser.add_argument("--logdir", type=Path, default=Path("gapwatch_runs"))
    parser.add_argument("--patience", type=int, default=5)
    args = parser.parse_args(argv)

    seed_everything(args.seed, verbose=False)
    data: LightningDataModule
    if args.data == "digits":
        data, shape = DigitsDataModule(label_noise=args.label_noise, seed=args.seed), (1, 8)
    else:
        if args.data_dir is None:
            parser.error(f"--data {args.data} needs --data-dir (gapwatch never downloads)")
        vision = VisionDataModule(
            args.data, args.data_dir, label_noise=args.label_noise, seed=args.seed,
            train_size=args.train_size,
        )  # fmt: skip
        data, shape = vision, (vision.in_channels, vision.image_size)
    model = DigitsClassifier(
        arch=args.arch, width=args.width, in_channels=shape[0], image_size=shape[1]
    )
    monitor = GeneralizationMonitor(transitions=True, max_images=16)
    stopper = EarlyStopping(
        monitor="gapwatch/normalized_train_loss", min_delta=1e-6, patience=args.patience
    )
    logger = TensorBoardLogger(args.logdir, name=args.data)
    trainer = Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        logger=logger,
        callbacks=[monitor, stopper],
        enable_checkpointing=False,
        log_every_n_steps=10,
    )
    trainer.fit(model, datamodule=data)
    if not trainer.is_global_zero:
        return
    names = [
        "test_loss", "test_acc", "train_acc", "gap", "sensitivity", "predicted_test_loss",
        "predicted_test_loss_bias", "bias_fraction", "jacobian_norm",
        "normalized_train_loss", "normalized_test_loss", "log_norm_product",
        "ablation_zeta", "ablation_kappa", "transitions",
    ]  # fmt: skip
    table = format_table(monitor.history, names)
    report = Path(logger.log_dir) / "report.md"
    stop = f"stopped early at epoch {stopper.stopped_epoch}" if stopper.stopped_epoch else "ran"
    report.write_text(
        f"# gapwatch on {args.data} ({args.arch}, width {args.width})\n\n"
        f"Training {stop} after {trainer.current_epoch} epochs.\n\n{table}\n"
    )
    print(f"\n{table}\n")
    print(f"TensorBoard logs: {logger.log_dir}")
    print(f"Report:           {report}")
    print(f"Open them with:   tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
