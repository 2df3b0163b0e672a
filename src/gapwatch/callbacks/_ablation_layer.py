"""Which layer unit ablation ablates: Zhao et al.'s default, and the one it refuses."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gapwatch.functional._common import evaluation

# Modules whose output is not a layer of units worth ablating.
_PASS_THROUGH = (
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.modules.dropout._DropoutNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.batchnorm._NormBase,
)


def default_layer(model: nn.Module, inputs: Tensor) -> str:
    """The layer Zhao et al. would ablate: the last hidden layer before the classifier.

    One forward pass records the order in which modules finish. The classifier is the
    last ``nn.Linear`` to run; the choice is the last module to finish before it that
    runs once, outputs ``[N, F]`` or ``[N, C, H, W]``, does not contain the classifier
    and is not a pass-through (pooling, flatten, dropout, normalization). For a
    ``conv -> BN -> ReLU`` stack that is the ReLU, so removing a unit zeroes its
    activated map; for torchvision's ResNets it is the last residual stage.

    Args:
        model: The classifier.
        inputs: A few probe inputs on the model's device.

    Returns:
        The module path.

    Raises:
        ValueError: If the model has no ``nn.Linear`` classifier or no layer before it.
    """
    finished: list[tuple[str, int]] = []
    calls: dict[str, int] = {}

    def record(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            ndim = output.ndim if isinstance(output, Tensor) else -1
            finished.append((name, ndim))

        return hook

    named = [(name, m) for name, m in model.named_modules() if name]
    handles = [m.register_forward_hook(record(name)) for name, m in named]
    try:
        with evaluation(model), torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(named)
    linears = [i for i, (name, _) in enumerate(finished) if isinstance(modules[name], nn.Linear)]
    if not linears:
        raise ValueError(
            "gapwatch found no nn.Linear classifier to place the ablation layer before; "
            "pass `layer=` with the module path to ablate."
        )
    classifier = finished[linears[-1]][0]
    for name, ndim in reversed(finished[: linears[-1]]):
        module = modules[name]
        if (
            calls[name] == 1
            and ndim in (2, 4)
            and not isinstance(module, _PASS_THROUGH)
            and not classifier.startswith(f"{name}.")
        ):
            return name
    raise ValueError(
        f"gapwatch found no layer before the classifier {classifier!r} to ablate; "
        "pass `layer=` with a module path."
    )


def refuse_output_layer(model: nn.Module, layer: str, inputs: Tensor) -> None:
    """Raise if ``layer``'s output is the model's: ablating logits measures nothing of Zhao's."""
    seen: list[Any] = []
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        return  # split_model names the valid paths
    handle = module.register_forward_hook(lambda _m, _a, output: seen.append(output))
    try:
        with evaluation(model), torch.no_grad():
            output = model(inputs)
    finally:
        handle.remove()
    if any(out is output for out in seen):
        raise ValueError(
            f"`layer={layer!r}` is the model's output layer: ablating its units removes "
            "classes, not hidden units. Pick a hidden layer before the classifier, or leave "
            "`layer=None` to take the last one."
        )
