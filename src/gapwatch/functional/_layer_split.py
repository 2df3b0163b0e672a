"""A model cut at one layer into a prefix that runs once and a suffix that runs batched.

Unit ablation (Zhao et al., eq. 1) evaluates the network ``2 (M + 1)`` times per class with
one layer's units masked; everything before that layer gives the same result every time.
This module holds the cut: :func:`split_model` traces the model with ``torch.fx`` and cuts
the graph after the layer (values that cross the cut, such as skip connections, become
extra suffix inputs), or falls back to a forward hook that replaces the layer's output,
and :class:`LayerSplit` runs the parts in chunks on the model's device.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import Tensor, fx, nn

from gapwatch.functional._common import (
    DEFAULT_BATCH_SIZE,
    as_outputs,
    check_batch_size,
    check_choice,
    check_float32_model,
    check_inputs,
    chunks,
    evaluation,
    model_device,
    model_input,
)

Prefix = Callable[[Tensor], tuple[Tensor, tuple[Tensor, ...]]]
Suffix = Callable[[Tensor, tuple[Tensor, ...]], Tensor]
Whole = Callable[[Tensor], tuple[Tensor, tuple[Tensor, ...], Tensor]]
SplitMethod = Literal["auto", "fx", "hook"]


@dataclass(frozen=True)
class LayerSplit:
    """A model cut at one layer: ``model(x) == suffix(*prefix(x))`` in eval mode.

    ``prefix(x)`` returns the layer's output and the other values the rest of the network
    still needs (skip connections crossing the cut), each with one row per sample of
    ``x``. ``suffix(activation, live)`` maps them to the model's output; it may be called
    with any rows of them, e.g. the same sample repeated under different masks.

    Attributes:
        model: The model that was split; prefix and suffix share its modules.
        layer: Path of the layer the model was cut at.
        method: ``"fx"``: a traced graph cut in two, the suffix runs only what follows the
            layer. ``"hook"``: a forward hook on the layer; the live value is the input
            itself and the suffix reruns the whole model with the layer's output replaced.
        prefix: ``x -> (activation, live)``.
        suffix: ``(activation, live) -> output``.
        whole: ``x -> (activation, live, output)``: the prefix's values and the model's
            output from one pass of the whole model.
    """

    model: nn.Module
    layer: str
    method: Literal["fx", "hook"]
    prefix: Prefix
    suffix: Suffix
    whole: Whole

    def capture(
        self, inputs: Tensor, *, batch_size: int | None = DEFAULT_BATCH_SIZE
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Run the prefix over ``inputs`` in chunks, on the model's device, in eval mode.

        Args:
            inputs: ``[N, ...]`` inputs on any device.
            batch_size: Rows per forward call: ``DEFAULT_BATCH_SIZE`` (128) unless given;
                ``None``: all at once.

        Returns:
            ``(activation, live)``: the layer's output ``[N, ...]`` and the live values,
            float tensors on the model's device.

        Raises:
            ValueError: If the layer's output is not ``[N, F]`` or ``[N, C, H, W]``.
            UnbatchableSplitError: If a live value is not a tensor with one row per sample
                (e.g. a batch size read off the input and reused after the layer); the
                traced suffix cannot be batched then, use ``method="hook"``.
        """
        activation, live, _ = self._run(inputs, batch_size, whole=False)
        return activation, live

    def run(
        self,
        inputs: Tensor,
        *,
        batch_size: int | None = DEFAULT_BATCH_SIZE,
        keep: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
        """Run the whole model and keep what :meth:`capture` returns, from one pass.

        For a caller that needs the model's outputs anyway: the prefix does not run twice.

        Args:
            inputs: ``[N, ...]`` inputs on any device.
            batch_size: Rows per forward call: ``DEFAULT_BATCH_SIZE`` (128) unless given;
                ``None``: all at once.
            keep: ``[N]`` booleans: keep the activation and live values of these rows only
                (memory then grows with the rows kept, not with ``N``). Default: all.

        Returns:
            ``(activation, live, outputs)``: as :meth:`capture` for the kept rows, and the
            model's checked float32 ``[N, K]`` outputs for every row.

        Raises: as :meth:`capture`.
        """
        activation, live, outputs = self._run(inputs, batch_size, whole=True, keep=keep)
        assert outputs is not None  # for the type checker
        return activation, live, outputs

    def _run(
        self, inputs: Tensor, batch_size: int | None, *, whole: bool, keep: Tensor | None = None
    ) -> tuple[Tensor, tuple[Tensor, ...], Tensor | None]:
        check_inputs(inputs, floating=False)
        check_float32_model(self.model)
        check_batch_size(batch_size)
        device = model_device(self.model, inputs.device)
        parts, outputs = [], []
        with evaluation(self.model), torch.no_grad():
            for rows in chunks(inputs.shape[0], batch_size):
                x = cast(Tensor, model_input(inputs[rows], device))
                if whole:
                    activation, live, output = self.whole(x)
                    outputs.append(as_outputs(output).float())
                else:
                    activation, live = self.prefix(x)
                _check_batched(self.layer, x.shape[0], activation, live)
                if keep is not None:
                    kept = keep[rows].to(device)
                    activation, live = activation[kept], tuple(v[kept] for v in live)
                parts.append((activation, live))
        activation = torch.cat([a for a, _ in parts])
        live = tuple(torch.cat(values) for values in zip(*(v for _, v in parts), strict=True))
        return activation, live, torch.cat(outputs) if whole else None


class UnbatchableSplitError(ValueError):
    """A traced split whose live values cannot be repeated per ablation level."""


def _check_batched(layer: str, n: int, activation: object, live: tuple[object, ...]) -> None:
    if not isinstance(activation, Tensor) or activation.ndim not in (2, 4):
        got = tuple(activation.shape) if isinstance(activation, Tensor) else type(activation)
        raise ValueError(
            f"Layer {layer!r} returns {got}; unit ablation needs a layer whose output is "
            "[N, F] (features) or [N, C, H, W] (channels). Pick another layer."
        )
    if not all(isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == n for v in live):
        raise UnbatchableSplitError(
            f"The model reuses a value after {layer!r} that is not a per-sample tensor "
            "(e.g. `n = x.shape[0]` before the layer), so the traced suffix cannot be "
            "batched over ablation levels; use method='hook'."
        )


class _CutTracer(fx.Tracer):
    """Traces through every module except the cut layer and standard torch.nn leaves."""

    def __init__(self, layer: str) -> None:
        super().__init__()
        self.layer = layer

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name == self.layer or super().is_leaf_module(
            m, module_qualified_name
        )


def _ablatable_layers(model: nn.Module) -> list[str]:
    """Paths of submodules that run as modules (not containers, not inside torch.nn leaves)."""
    opaque: list[str] = []
    paths = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in opaque):
            continue
        if fx.Tracer().is_leaf_module(module, name):
            opaque.append(name)
        if not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            paths.append(name)
    return paths


def _check_layer(model: nn.Module, layer: str) -> None:
    paths = _ablatable_layers(model)
    if layer in paths:
        return
    shallow = [p for p in paths if p.count(".") <= 1]
    more = f" and {len(paths) - len(shallow)} deeper ones" if len(shallow) < len(paths) else ""
    close = difflib.get_close_matches(layer, paths, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(
        f"{layer!r} is not a layer of {type(model).__name__}.{hint} Valid paths: "
        f"{', '.join(shallow)}{more} (as in `model.named_modules()`)."
    )


def _cut_graph(model: nn.Module, graph: fx.Graph, layer: str) -> tuple[Prefix, Suffix, Whole]:
    nodes = list(graph.nodes)
    cuts = [n for n in nodes if n.op == "call_module" and n.target == layer]
    if len(cuts) != 1:
        raise ValueError(
            f"Layer {layer!r} runs {len(cuts)} times in model.forward; unit ablation needs "
            "a layer that runs exactly once."
        )
    (cut,) = cuts
    # Everything not downstream of the cut belongs to the prefix, which runs once; of it,
    # the input-dependent values the suffix reads must be handed over (and repeated per
    # ablation level), while constants are simply recomputed in the suffix.
    downstream: set[fx.Node] = set()
    from_input: set[fx.Node] = set()
    for node in nodes:
        parents = node.all_input_nodes
        if node.op == "placeholder" or any(p in from_input for p in parents):
            from_input.add(node)
        if any(p is cut or p in downstream for p in parents):
            downstream.add(node)
    if nodes[-1] not in downstream:
        raise ValueError(f"The output of the model does not depend on layer {layer!r}.")
    live = [
        n
        for n in nodes
        if n in from_input
        and n is not cut
        and n not in downstream
        and any(u in downstream for u in n.users)
    ]

    prefix_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in nodes[:-1]:
        if node not in downstream:
            env[node] = prefix_graph.node_copy(node, env.__getitem__)
    prefix_graph.output((env[cut], tuple(env[n] for n in live)))

    suffix_graph = fx.Graph()
    env = {n: suffix_graph.placeholder(n.name) for n in [cut, *live]}
    for node in nodes:
        if node in downstream or (node not in from_input and node not in env):
            env[node] = suffix_graph.node_copy(node, env.__getitem__)
    prefix, suffix = fx.GraphModule(model, prefix_graph), fx.GraphModule(model, suffix_graph)
    for part in (prefix, suffix):
        part.graph.eliminate_dead_code()
        part.recompile()

    def whole(x: Tensor) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
        activation, values = prefix(x)
        # Copies: an in-place op after the layer (ReLU(inplace=True)) would alter them.
        output = suffix(activation.clone(), *(v.clone() for v in values))
        return activation, values, output

    return prefix, lambda activation, values: suffix(activation, *values), whole


def _hook_split(model: nn.Module, layer: str) -> tuple[Prefix, Suffix, Whole]:
    module = model.get_submodule(layer)

    def run(x: Tensor, replacement: Tensor | None) -> tuple[Tensor, Tensor]:
        seen: list[Tensor] = []

        def hook(_: nn.Module, __: object, output: Tensor) -> Tensor | None:
            # Clone: an in-place op after the layer (ReLU(inplace=True)) would alter it.
            if replacement is None:
                seen.append(output.clone() if isinstance(output, Tensor) else output)
            else:
                seen.append(replacement)
            return replacement

        handle = module.register_forward_hook(hook)
        try:
            out = model(x)
        finally:
            handle.remove()
        if len(seen) != 1:
            raise ValueError(
                f"Layer {layer!r} ran {len(seen)} times in one forward pass; unit ablation "
                "needs a layer that runs exactly once."
            )
        return seen[0], out

    def whole(x: Tensor) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
        activation, output = run(x, None)
        return activation, (x,), output

    return (
        lambda x: whole(x)[:2],
        lambda activation, live: run(live[0], activation)[1],
        whole,
    )


def split_model(
    model: nn.Module,
    layer: str,
    *,
    method: SplitMethod = "auto",
    example_inputs: Tensor | None = None,
) -> LayerSplit:
    """Cut ``model`` at ``layer`` into a prefix that runs once and a batched suffix.

    With ``"fx"`` the model is traced by ``torch.fx`` (keeping ``layer`` and standard
    ``torch.nn`` modules opaque) and the graph is cut after the layer; values computed
    before the layer and used after it (residual connections) become extra suffix inputs.
    Tracing happens in eval mode, so the split reproduces the eval-mode forward pass.
    ``"hook"`` works for any model, including ones with data-dependent control flow that
    do not trace, but its suffix reruns the whole network. ``"auto"`` traces and falls
    back to the hook when tracing fails or, tried on ``example_inputs``, when the traced
    suffix cannot be batched (a value such as the batch size read before the layer and
    reused after it).

    Args:
        model: The network; prefix and suffix share its modules and parameters.
        layer: Module path as in ``model.named_modules()``, e.g. ``"features.18"``,
            ``"layer4"``, ``"3"``.
        method: ``"auto"``, ``"fx"`` or ``"hook"``.
        example_inputs: A few inputs to try the split on (any device); the layer's output
            is then also checked to be ``[N, F]`` or ``[N, C, H, W]``.

    Returns:
        The :class:`LayerSplit`.

    Raises:
        ValueError: If ``layer`` is not a module path of ``model`` (the message lists the
            valid ones), runs other than once per forward pass, or (with
            ``example_inputs``) outputs another shape.
        UnbatchableSplitError: With ``method="fx"``, if the traced suffix cannot be
            batched on ``example_inputs``.
    """
    check_choice("method", method, ("auto", "fx", "hook"))
    if not isinstance(layer, str):
        raise TypeError(f"`layer` must be a module path string, got {type(layer).__name__}.")
    _check_layer(model, layer)
    with evaluation(model):
        if method != "hook":
            try:
                graph = _CutTracer(layer).trace(model)
            except Exception:
                # Typically data-dependent control flow; only an explicit "fx" insists.
                if method == "fx":
                    raise
            else:
                split = LayerSplit(model, layer, "fx", *_cut_graph(model, graph, layer))
                try:
                    if example_inputs is not None:
                        split.capture(example_inputs)
                    return split
                except UnbatchableSplitError:
                    if method == "fx":
                        raise
        split = LayerSplit(model, layer, "hook", *_hook_split(model, layer))
        if example_inputs is not None:
            split.capture(example_inputs)  # checks the layer's output shape
        return split
