"""How far training has moved the weights: relative Frobenius distance from a reference.

Jiang et al. (2020, "Fantastic Generalization Measures") found the distance of the weights
from their initialization, ``||W - W_0||_F`` summed over layers, among the measures that
predict generalization best. gapwatch reports it relative to the reference's norm,

    ``d = sqrt(sum_l ||W_l - W0_l||_F^2) / sqrt(sum_l ||W0_l||_F^2)``,

over every trainable parameter (biases and normalization weights included), so that it is
comparable across widths and depths: 0 at the reference, 1 when the change is as large as
the starting weights.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """Detached copies of ``model``'s trainable parameters, by name, where they live.

    Memory: one copy of the trainable parameters, on their device.
    """
    return {
        name: parameter.detach().clone()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def squared_distances(model: nn.Module, reference: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(sum ||W - W0||^2, sum ||W0||^2)`` over the parameters in ``reference``, float64.

    Raises:
        ValueError: If ``model`` lacks a parameter of ``reference`` or its shape changed.
    """
    parameters = dict(model.named_parameters())
    moved: list[Tensor] = []
    start: list[Tensor] = []
    for name, initial in reference.items():
        current = parameters.get(name)
        if current is None or current.shape != initial.shape:
            raise ValueError(
                f"parameter {name!r} of the reference weights is missing from the model or "
                "changed shape; take the reference again (a new fit does) after changing "
                "the model's layers."
            )
        moved.append((current.detach() - initial).double().square().sum())
        start.append(initial.double().square().sum())
    # One transfer for all layers: a `.cpu()` per layer would wait on the device each time.
    if not moved:
        return torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    totals = torch.stack([torch.stack(moved).sum(), torch.stack(start).sum()]).cpu()
    return totals[0], totals[1]


def distance_from_init(model: nn.Module, reference: dict[str, Tensor]) -> float:
    """Relative Frobenius distance of ``model``'s weights from ``reference`` (a snapshot).

    Args:
        model: The network now.
        reference: From :func:`snapshot`, taken at the start of training.

    Returns:
        ``||W - W0||_F / ||W0||_F`` over all trainable parameters; NaN if ``W0`` is zero.
    """
    moved, start = squared_distances(model, reference)
    return math.sqrt(float(moved) / float(start)) if float(start) > 0 else math.nan
