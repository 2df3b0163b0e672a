"""Case 1: output sensitivity against one plain forward pass over the same probes."""

from __future__ import annotations

from typing import Any

import torch
from common import Sizes, digits_split, random_images, row, seeded, time_round_robin
from torch import Tensor, nn

from gapwatch.demo import digits_cnn
from gapwatch.functional import DEFAULT_BATCH_SIZE, output_sensitivity


def untrained_cnns(num_probes: int) -> list[tuple[str, nn.Module, Tensor]]:
    """The demo CNN on digits (1x8x8) and on CIFAR-shaped noise (3x32x32), with probes."""
    *_, digits, _ = digits_split(num_probes)
    return [
        ("digits CNN, 1x8x8", seeded(digits_cnn), digits),
        (
            "digits CNN (width 8), 3x32x32",
            seeded(lambda: digits_cnn(8, in_channels=3, image_size=32)),
            random_images(num_probes, (3, 32, 32)),
        ),
    ]


def run(sizes: Sizes) -> list[dict[str, Any]]:
    """S with and without the clean outputs given, in units of one forward pass."""
    num_probes = sizes.pick(512, 64)
    return [
        _measure(f"{name}, {num_probes} probes", model, probes, sizes)
        for name, model, probes in untrained_cnns(num_probes)
    ]


def _measure(setting: str, model: nn.Module, probes: Tensor, sizes: Sizes) -> dict[str, Any]:
    with torch.no_grad():
        # In S's own chunks: on several threads a convolution's rounding can depend on the
        # batch size, and the check asks for the very outputs S would compute itself.
        clean = torch.cat([model(part) for part in probes.split(DEFAULT_BATCH_SIZE)])

    def sensitivity(clean_outputs: Tensor | None = None) -> Tensor:
        generator = torch.Generator().manual_seed(0)
        return output_sensitivity(model, probes, generator=generator, clean_outputs=clean_outputs)

    def forward() -> Tensor:
        with torch.no_grad():
            return model(probes)

    timings = time_round_robin(
        {"forward": forward, "S": sensitivity, "S_clean_given": lambda: sensitivity(clean)},
        sizes,
    )
    return row(
        1,
        "output_sensitivity",
        setting,
        metrics={
            "S_vs_forward": timings.ratio("S", "forward"),
            "S_clean_given_vs_forward": timings.ratio("S_clean_given", "forward"),
        },
        targets={"S_vs_forward": ("<=", 2.4), "S_clean_given_vs_forward": ("<=", 1.2)},
        checks={
            "same_S_with_clean_given": torch.equal(
                timings.results["S"], timings.results["S_clean_given"]
            )
        },
        seconds={k: timings.median(k) for k in timings.seconds},
        note="'about one forward pass' read as <= 1.2",
    )
