"""Fixtures shared by all tests: real data, small models, and the non-interference guard."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import gapwatch

# Two cores are shared by pytest-xdist workers: one intra-op thread each avoids thrashing.
torch.set_num_threads(1)


_PACKAGE = Path(gapwatch.__file__).resolve().parent


def own_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """The messages of ``caught`` that gapwatch raised: its own words or its own code.

    Dependencies deprecate things on their own schedule; a test that counted every warning
    would fail on the day a new release adds one, so only gapwatch's count.
    """
    return [
        str(w.message)
        for w in caught
        if str(w.message).startswith("gapwatch")
        or Path(w.filename).resolve().is_relative_to(_PACKAGE)
    ]


@pytest.fixture(scope="session")
def digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled digits as ``[1797, 1, 8, 8]`` standardized images and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    images = (images - images.mean()) / images.std()
    return images, torch.tensor(data.target, dtype=torch.long)


def make_mlp(d_in: int = 64, width: int = 32, k: int = 10, *, bias: bool = True) -> nn.Module:
    """A ReLU MLP over flattened inputs."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(d_in, width, bias=bias),
        nn.ReLU(),
        nn.Linear(width, width, bias=bias),
        nn.ReLU(),
        nn.Linear(width, k, bias=bias),
    )


def make_cnn(k: int = 10, *, channels: int = 8) -> nn.Module:
    """A small CNN for ``[N, 1, 8, 8]`` inputs with BatchNorm and Dropout in it."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.BatchNorm2d(2 * channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(2 * channels * 16, 32),
        nn.ReLU(),
        nn.Linear(32, k),
    )


@pytest.fixture
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return make_mlp()


@pytest.fixture
def cnn() -> nn.Module:
    """A CNN in train mode whose BatchNorm buffers hold non-trivial statistics."""
    torch.manual_seed(0)
    model = make_cnn()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, 1, 8, 8) * 2 + 0.5)
    return model


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "training": [m.training for m in model.modules()],
        "grad": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "rng": torch.random.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


@pytest.fixture
def untouched() -> Callable[[nn.Module], AbstractContextManager[None]]:
    """``with untouched(model): ...`` fails if the block changed the model or the global RNG.

    Checked: every parameter and buffer bitwise (BatchNorm running statistics included),
    every submodule's training flag, every ``.grad`` and ``requires_grad``, and the global
    CPU (and CUDA) random state.
    """

    @contextmanager
    def guard(model: nn.Module) -> Iterator[None]:
        before = _snapshot(model)
        yield
        after = _snapshot(model)
        for name, value in before["state"].items():
            assert torch.equal(value, after["state"][name]), f"{name} changed"
        assert before["training"] == after["training"], "a training flag changed"
        for old, new in zip(before["grad"], after["grad"], strict=True):
            assert (old is None) == (new is None), ".grad was set or cleared"
            assert old is None or torch.equal(old, new), ".grad changed"
        assert before["requires_grad"] == after["requires_grad"], "requires_grad changed"
        assert torch.equal(before["rng"], after["rng"]), "the global CPU RNG was used"
        if before["cuda_rng"] is not None:
            for old, new in zip(before["cuda_rng"], after["cuda_rng"], strict=True):
                assert torch.equal(old, new), "the global CUDA RNG was used"

    return guard
