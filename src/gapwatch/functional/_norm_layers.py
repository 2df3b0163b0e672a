"""The factors of Liao-Poggio's ``rho``: which layers' norms the product runs over (eq. 1).

``f = rho f~`` holds with ``rho = rho_1 ... rho_K`` only for a chain of linear,
convolutional and BatchNorm layers with positively homogeneous modules between them.
This module finds those layers in forward order (from the ``torch.fx`` graph, checking
that every one lies on every input-output path, or from registration order for a model
that does not trace), folds each eval-mode BatchNorm into the conv/linear that feeds it,
and names what breaks the factorization (:func:`layerwise_obstacle`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

_WEIGHTED = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Modules that break f(c W_k) = c f(W_k): saturating or smooth activations, and
# normalizations that divide by a statistic of their input.
_NOT_HOMOGENEOUS = (
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,  # ReLU6 included
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Softplus,
    nn.Softsign,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LogSigmoid,
    nn.Softmax,
    nn.LogSoftmax,
    nn.GLU,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LocalResponseNorm,
)
_OUTPUT_MODE_HINT = (
    "Use mode='output' (Liao-Poggio appendix H), which normalizes by the norm of the "
    "model's output on reference inputs."
)


@dataclass(frozen=True)
class _Layer:
    """One factor ``rho_k``: a conv/linear with its BatchNorm folded in, or a lone BatchNorm."""

    weighted: str | None
    batchnorm: str | None

    @staticmethod
    def of(name: str, module: nn.Module) -> _Layer:
        """The layer of a conv/linear without BatchNorm, or of a lone BatchNorm."""
        return _Layer(name, None) if isinstance(module, _WEIGHTED) else _Layer(None, name)


def _layers(model: nn.Module) -> list[_Layer]:
    """The factors of ``rho`` in forward order, checked to form a chain when ``model`` traces."""
    graph = None
    # A bare nn.Linear would trace into F.linear and hide its weight; it is a chain anyway.
    if next(model.children(), None) is not None:
        try:
            graph = torch.fx.symbolic_trace(model).graph
        except Exception:  # tracing runs user code, which can fail in any way
            graph = None
    layers = _registered_layers(model) if graph is None else _traced_layers(model, graph)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear, nn.Conv or BatchNorm layer to normalize. "
            + _OUTPUT_MODE_HINT
        )
    return layers


def _registered_layers(model: nn.Module) -> list[_Layer]:
    """Fallback for untraceable models: a BatchNorm folds into the leaf registered before it."""
    layers: list[_Layer] = []
    after_weighted = False
    for name, module in model.named_modules():
        if next(module.children(), None) is not None:
            continue
        if isinstance(module, _BATCHNORM) and after_weighted:
            layers[-1] = _Layer(layers[-1].weighted, name)
        elif isinstance(module, (*_WEIGHTED, *_BATCHNORM)):
            layers.append(_Layer.of(name, module))
        after_weighted = isinstance(module, _WEIGHTED)
    return layers


def _traced_layers(model: nn.Module, graph: torch.fx.Graph) -> list[_Layer]:
    """Layers from the traced graph; raises unless every one lies on every input-output path.

    Each node carries the layers found on every path from the input to it and those found
    on some path; a residual or parallel branch makes the two differ at the output.
    """
    modules = dict(model.named_modules())
    layers: dict[str, _Layer] = {}
    called: set[str] = set()
    on_every: dict[torch.fx.Node, frozenset[str]] = {}
    on_some: dict[torch.fx.Node, frozenset[str]] = {}
    every: frozenset[str]
    some: frozenset[str]
    for node in graph.nodes:
        parents = [arg for arg in node.all_input_nodes if arg in on_every]
        if node.op == "placeholder":
            every = some = frozenset()
        elif not parents or _is_metadata(node):
            continue  # does not depend on the input signal, like a bias
        else:
            every = frozenset.intersection(*(on_every[arg] for arg in parents))
            some = frozenset.union(*(on_some[arg] for arg in parents))
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, (*_WEIGHTED, *_BATCHNORM)):
            if node.target in called:
                raise ValueError(
                    f"{type(model).__name__} calls `{node.target}` more than once (shared "
                    "weights), so its norm does not factor out of f once. " + _OUTPUT_MODE_HINT
                )
            called.add(node.target)
            source = node.args[0]
            if isinstance(module, _BATCHNORM) and _folds_into(source, modules):
                layers[source.target] = _Layer(source.target, node.target)
            else:
                layers[node.target] = _Layer.of(node.target, module)
                every, some = every | {node.target}, some | {node.target}
        on_every[node], on_some[node] = every, some
    output = next(node for node in reversed(graph.nodes) if node.op == "output")
    bypassed = [name for name in layers if name not in on_every.get(output, frozenset())]
    if bypassed:
        raise ValueError(
            f"{type(model).__name__} is not a chain of layers: some path from the input to the "
            f"output bypasses `{bypassed[0]}` (a residual or parallel branch, or an unused "
            "layer), so the product of layer norms does not factor out of f (eq. 1). "
            + _OUTPUT_MODE_HINT
        )
    return list(layers.values())


def _is_metadata(node: torch.fx.Node) -> bool:
    """``x.shape``, ``x.size()``, ``x.dim()``: they carry no signal, so they join no path."""
    return (node.op == "call_method" and node.target in ("size", "dim")) or (
        node.op == "call_function" and node.target is getattr
    )


def _folds_into(source: object, modules: dict[str, nn.Module]) -> bool:
    """Whether a BatchNorm fed by ``source`` folds into it: a conv/linear with no other user."""
    return (
        isinstance(source, torch.fx.Node)
        and source.op == "call_module"
        and isinstance(modules[cast(str, source.target)], _WEIGHTED)
        and len(source.users) == 1
    )


# Layers whose weights scale f but are not factors of rho, or that break homogeneity.
_NOT_FACTORED = (nn.Embedding, nn.EmbeddingBag, nn.RNNBase, nn.MultiheadAttention)


def layerwise_obstacle(model: nn.Module) -> str | None:
    """Why ``mode="layerwise"`` would not give the normalized network for ``model``.

    The product of layer norms normalizes f exactly (eq. 1) only for a chain of linear,
    convolutional and BatchNorm layers with positively homogeneous activations between
    them. Residual or parallel branches, shared weights, embeddings (whose weight scales
    f but is no factor of rho), recurrent or attention layers and saturating activations
    each break that; ``mode="output"`` (appendix H) applies to any of them.

    Args:
        model: The classifier.

    Returns:
        A sentence naming the obstacle, or ``None`` where layerwise normalization is exact
        as far as the model's modules and traced graph show.
    """
    # Modules first: they are the obstacle a user can act on, while the traced graph of a
    # model that returns hidden states beside its logits "bypasses" the output layer too.
    found = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if isinstance(m, _NOT_HOMOGENEOUS + _NOT_FACTORED)
        }
    )
    if found:
        return (
            f"{type(model).__name__} contains {', '.join(found)}, which the product of layer "
            "norms does not factor out of f."
        )
    try:
        _layers(model)
    except ValueError as error:
        return str(error).removesuffix(_OUTPUT_MODE_HINT).strip()
    return None
