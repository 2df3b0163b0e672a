"""Fixtures shared by all tests: real data, small models, and the non-interference guard.

``pytest --device cuda`` (or ``GAPWATCH_TEST_DEVICE=cuda``) runs the device-aware tests on
that device: the ``digits``, ``mlp`` and ``cnn`` fixtures and ``make_mlp``/``make_cnn`` live
there, and ``tests/callbacks/conftest.py`` trains on the matching Lightning accelerator.
Tests that are CPU-specific (the CPU profiler's memory, CPU bitwise determinism, DDP on
gloo) build their own CPU models and stay on the CPU.
"""

from __future__ import annotations

import os
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

#: The device that device-aware tests run on, set once by ``pytest_configure``.
DEVICE = torch.device("cpu")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default=None,
        help="torch device for the device-aware tests, e.g. 'cuda' or 'cuda:1' "
        "(default: $GAPWATCH_TEST_DEVICE, else 'cpu').",
    )


def resolve_device(name: str) -> torch.device:
    """The ``torch.device`` for ``name``; a ``pytest.UsageError`` naming the fix if unusable.

    A CUDA request on a machine without CUDA must stop the run at once: skipping every
    device test instead would report a green run that tested nothing on the GPU.
    """
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise pytest.UsageError(
            f"--device / GAPWATCH_TEST_DEVICE: {name!r} is not a torch device ({error}); "
            "use 'cpu' or 'cuda' (optionally 'cuda:N')."
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError(
                f"--device {name} was asked for, but torch.cuda.is_available() is False on "
                f"this machine (torch {torch.__version__}, CUDA build "
                f"{torch.version.cuda or 'none'}); run on a GPU machine or use --device cpu."
            )
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise pytest.UsageError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible; "
                "use an index below that."
            )
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise pytest.UsageError(
            f"--device {name}: the test suite supports 'cpu' and 'cuda' devices only."
        )
    return device


def pytest_configure(config: pytest.Config) -> None:
    global DEVICE
    name = config.getoption("--device") or os.environ.get("GAPWATCH_TEST_DEVICE") or "cpu"
    DEVICE = resolve_device(name)
    if DEVICE.type == "cuda":
        # Lightning's deterministic=True turns on torch.use_deterministic_algorithms, which
        # cuBLAS only honours with a fixed workspace (set before the first cuBLAS call).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # Tests compare results bitwise between runs and to float32 tolerance with
        # references: deterministic cuDNN kernels, and no TF32 (10-bit mantissa) convolutions.
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        # Subprocesses (the benchmarks, DDP runs) inherit the choice.
        os.environ["GAPWATCH_TEST_DEVICE"] = str(DEVICE)


def pytest_report_header(config: pytest.Config) -> str:
    name = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu"
    return f"gapwatch test device: {DEVICE} ({name})"


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device of the device-aware tests (``--device``, default CPU)."""
    return DEVICE


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
    return images.to(DEVICE), torch.tensor(data.target, dtype=torch.long).to(DEVICE)


def make_mlp(d_in: int = 64, width: int = 32, k: int = 10, *, bias: bool = True) -> nn.Module:
    """A ReLU MLP over flattened inputs, on the test device."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(d_in, width, bias=bias),
        nn.ReLU(),
        nn.Linear(width, width, bias=bias),
        nn.ReLU(),
        nn.Linear(width, k, bias=bias),
    ).to(DEVICE)


def make_cnn(k: int = 10, *, channels: int = 8) -> nn.Module:
    """A small CNN for ``[N, 1, 8, 8]`` inputs with BatchNorm and Dropout, on the test device."""
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
    ).to(DEVICE)


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
            model(torch.randn(32, 1, 8, 8).to(DEVICE) * 2 + 0.5)
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
