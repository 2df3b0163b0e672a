"""What every benchmark case shares: paired timing, result rows, data and small models.

Two CPU cores shared with other jobs make absolute times noisy, so every number reported
is a ratio against a baseline timed in the same run: candidates are run round-robin
(one warm-up each first), and a ratio is the median over rounds of the per-round ratio,
so that a burst of outside load hits both sides of a ratio alike.
"""

from __future__ import annotations

import math
import operator
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock


@dataclass(frozen=True)
class Sizes:
    """Problem sizes and timing effort: the issue's in a full run, tiny ones in ``--quick``.

    Attributes:
        quick: Tiny sizes, for a smoke test.
        repeats: Least number of timed rounds.
        min_seconds: Cheap candidates get more rounds, until a round-robin has taken
            about this long, so that millisecond timings are not one sample of noise.
    """

    quick: bool
    repeats: int
    min_seconds: float = 0.0

    def pick(self, full: Any, quick: Any) -> Any:
        """``quick`` in a quick run, else ``full``."""
        return quick if self.quick else full


@dataclass
class Timings:
    """Wall times of several callables, measured round-robin, and their last results."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)

    def median(self, name: str) -> float:
        """Median seconds of one call of ``name``."""
        return statistics.median(self.seconds[name])

    def ratio(self, numerator: str, denominator: str) -> float:
        """Median over rounds of ``time(numerator) / time(denominator)``."""
        pairs = zip(self.seconds[numerator], self.seconds[denominator], strict=True)
        return statistics.median(a / b for a, b in pairs)


def time_round_robin(
    candidates: dict[str, Callable[[], object]], sizes: Sizes, *, warm_up: bool = True
) -> Timings:
    """Call each candidate once to warm up, then rounds of one call each, in rotating order.

    Args:
        candidates: Named callables to time.
        sizes: ``repeats`` rounds at least, more while they fit in ``min_seconds`` (as
            judged by the warm-up round).
        warm_up: Skip the warm-up round if the candidates ran before.

    Returns:
        The times of every round and the last result of each candidate.
    """
    timings = Timings({name: [] for name in candidates})
    rounds = sizes.repeats
    if warm_up:
        start = time.perf_counter()
        for name, run in candidates.items():
            timings.results[name] = run()
        warm_up_seconds = time.perf_counter() - start
        rounds = max(rounds, min(50, math.floor(sizes.min_seconds / warm_up_seconds)))
    names = list(candidates)
    for turn in range(rounds):
        # Rotate the order, so that no candidate always inherits the allocator and cache
        # state its same predecessor left behind.
        for name in names[turn % len(names) :] + names[: turn % len(names)]:
            run = candidates[name]
            start = time.perf_counter()
            timings.results[name] = run()
            timings.seconds[name].append(time.perf_counter() - start)
    return timings


_OPERATORS = {"<=": operator.le, ">=": operator.ge}


def row(
    case: int,
    name: str,
    setting: str,
    metrics: dict[str, float],
    targets: dict[str, tuple[str, float]],
    checks: dict[str, bool],
    seconds: dict[str, float],
    note: str = "",
) -> dict[str, Any]:
    """One JSON line: measured ratios against their targets, and result checks.

    Args:
        case: Number of the case in the issue.
        name: Short name of the case.
        setting: What was measured (sizes, model).
        metrics: Measured values, mostly ratios.
        targets: ``{metric: (">=" or "<=", bound)}``; each gets a pass/fail.
        checks: Named checks that results agree with the baselines (must all be true).
        seconds: Median seconds per call, for the record.
        note: How a baseline was scaled, or other caveats.

    Returns:
        The row, ready for ``json.dumps``.
    """
    passed = {m: _OPERATORS[op](metrics[m], bound) for m, (op, bound) in targets.items()}
    return {
        "case": case,
        "name": name,
        "setting": setting,
        "metrics": {k: round(v, 4) for k, v in metrics.items()},
        "targets": {m: f"{op} {bound:g}" for m, (op, bound) in targets.items()},
        "pass": passed,
        "checks": checks,
        "seconds": {k: round(v, 5) for k, v in seconds.items()},
        "note": note,
    }


def digits_split(num_probes: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits, standardized: train images and labels, then probe images and labels.

    The probes are the last ``num_probes`` samples of a fixed permutation; the rest trains.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, probe = order[:-num_probes], order[-num_probes:]
    return images[train], labels[train], images[probe], labels[probe]


def random_images(num: int, shape: tuple[int, ...], seed: int = 0) -> Tensor:
    """``[num, *shape]`` standard normal images from a private generator."""
    return torch.randn(num, *shape, generator=torch.Generator().manual_seed(seed))


def seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """``build()`` with its initialization drawn from ``seed``, in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build().eval()


def train_steps(
    model: nn.Module, images: Tensor, labels: Tensor, steps: int, batch: int = 64
) -> nn.Module:
    """``steps`` of SGD with momentum on shuffled mini-batches; the model ends in eval mode."""
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    with torch.random.fork_rng():  # dropout draws on the global RNG
        torch.manual_seed(0)
        for _ in range(steps):
            rows = torch.randint(len(labels), (batch,), generator=generator)
            optimizer.zero_grad()
            F.cross_entropy(model(images[rows]), labels[rows]).backward()
            optimizer.step()
    return model.eval()


def conv_net(outputs: int, *, width: int = 8, in_channels: int = 1) -> nn.Module:
    """Two conv-BN-ReLU layers, average-pooled to 4x4, and a linear head."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(2 * width * 16, outputs),
    )


def cifar_resnet(width: int = 16, num_classes: int = 10) -> nn.Module:
    """A CIFAR-style ResNet-8: a 3x3 stem and three stages of one basic block each."""

    def stage(inplanes: int, planes: int, stride: int) -> nn.Module:
        downsample = None
        if stride != 1 or inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        return nn.Sequential(BasicBlock(inplanes, planes, stride, downsample))

    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        stage(width, width, 1),
        stage(width, 2 * width, 2),
        stage(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    )
