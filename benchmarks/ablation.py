"""Case 4: unit ablation of resnet18's ``layer4`` against one masked full forward per level.

The naive way to get ``E(n)`` and ``E_r(n)`` is a forward hook that zeroes the removed
channels and one full forward pass of the class's samples per level: ``2 (M + 1)``
passes per class. Running all ``2 * 513`` levels that way takes minutes, so the naive
baseline runs a few evenly spaced levels per order and class and its time is scaled to
all levels (every level costs the same forward pass; the one pass that ranks the channels
is left out, in the baseline's favour). The curves are compared on exactly those levels.
gapwatch runs at its defaults: chunks of ``DEFAULT_BATCH_SIZE`` rows, the callbacks' default.
"""

from __future__ import annotations

from typing import Any

import torch
from common import Sizes, random_images, row, seeded, time_round_robin
from torch import Tensor, nn
from torchvision.models import resnet18

from gapwatch.functional import unit_ablation

LAYER = "layer4"


def _channel_scores(model: nn.Module, inputs: Tensor) -> Tensor:
    """``[N, M]`` L1 norm of every channel of ``LAYER`` per sample, from one hooked pass."""
    seen: list[Tensor] = []
    handle = model.get_submodule(LAYER).register_forward_hook(lambda *args: seen.append(args[2]))
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        handle.remove()
    return seen[0].abs().flatten(2).sum(dim=2)


def _masked_accuracy(model: nn.Module, inputs: Tensor, label: int, removed: Tensor) -> Tensor:
    """Share of ``inputs`` predicted as ``label`` with the ``removed`` channels zeroed."""
    mask = removed.view(1, -1, 1, 1)
    hook = model.get_submodule(LAYER).register_forward_hook(
        lambda *args: args[2].masked_fill(mask, 0.0)
    )
    try:
        with torch.no_grad():
            hits = (model(inputs).argmax(dim=1) == label).sum()
    finally:
        hook.remove()
    return hits.float() / len(inputs)


def rankings(model: nn.Module, inputs: Tensor, targets: Tensor, classes: list[int]) -> Tensor:
    """``[C, 2, M]``: each class's channels, most active first and least active first."""
    scores = _channel_scores(model, inputs)
    ranked = []
    for label in classes:
        score = scores[targets == label].mean(dim=0)
        descending = score.argsort(descending=True, stable=True)  # ties: lower index first
        ranked.append(torch.stack([descending, score.argsort(stable=True)]))
    return torch.stack(ranked)


def naive_points(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    classes: list[int],
    ranked: Tensor,
    levels: Tensor,
) -> Tensor:
    """``[C, 2, L]``: ``E`` and ``E_r`` at ``levels``, one full forward pass per level."""
    points = torch.zeros(len(classes), 2, len(levels))
    for c, label in enumerate(classes):
        members = inputs[targets == label]
        for o, ranking in enumerate(ranked[c]):
            for i, level in enumerate(levels.tolist()):
                removed = torch.zeros(len(ranking), dtype=torch.bool)
                removed[ranking[:level]] = True
                points[c, o, i] = _masked_accuracy(model, members, label, removed)
    return points


def run(sizes: Sizes) -> list[dict[str, Any]]:
    """The speed-up over the scaled naive baseline, and identical curves on its levels."""
    num_probes, num_levels = sizes.pick((256, 4), (32, 2))
    model = seeded(lambda: resnet18(weights=None, num_classes=10))
    probes = random_images(num_probes, (3, 32, 32))
    with torch.no_grad():
        # The net's own predictions as labels: E(0) = 1 and the curves fall from there.
        targets = model(probes).argmax(dim=1)
    classes = torch.unique(targets).tolist()
    units = model.get_submodule(LAYER)[-1].conv2.out_channels
    levels = torch.linspace(0, units, num_levels).round().long()
    ranked = rankings(model, probes, targets, classes)  # untimed: once, not once per level
    timings = time_round_robin(
        {
            "unit_ablation": lambda: unit_ablation(
                model, LAYER, probes, targets, num_classes=10, classes=classes
            ),
            "naive_levels": lambda: naive_points(model, probes, targets, classes, ranked, levels),
        },
        sizes,
    )
    result = timings.results["unit_ablation"]
    both = torch.stack([result.curves, result.curves_reversed], dim=1)[:, :, levels]
    scale = (units + 1) / num_levels
    return [
        row(
            4,
            "unit_ablation",
            f"resnet18, 3x32x32, {LAYER} (M={units}), {num_probes} probes, "
            f"{len(classes)} classes, all {units + 1} levels x 2 orders, defaults",
            metrics={"speedup_vs_naive": scale * timings.ratio("naive_levels", "unit_ablation")},
            targets={"speedup_vs_naive": (">=", 50.0)},
            checks={"identical_curves": torch.equal(both, timings.results["naive_levels"])},
            seconds={k: timings.median(k) for k in timings.seconds},
            note=f"naive timed (and curves compared) on levels {levels.tolist()} of each "
            f"order and class, scaled by {scale:g}; labels: the net's own predictions",
        )
    ]
