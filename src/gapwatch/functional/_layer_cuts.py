"""The two ways to cut a model after one layer: a ``torch.fx`` graph cut and a forward hook.

Unit ablation (Zhao et al., eq. 1) reruns the network on one layer's masked output
``2 (M + 1)`` times per class, so :func:`~gapwatch.functional._layer_split.split_model`
cuts the model there. :func:`_cut_graph` splits a graph traced by :class:`_CutTracer`
into a prefix and a suffix that runs only what follows the layer, handing over the
values that cross the cut (skip connections); :func:`_hook_split` works for any model
by replacing the layer's output with a forward hook, its suffix rerunning the whole
network. Both return the ``(prefix, suffix, whole)`` callables that
:class:`~gapwatch.functional._layer_split.LayerSplit` holds.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, fx, nn

Prefix = Callable[[Tensor], tuple[Tensor, tuple[Tensor, ...]]]
Suffix = Callable[[Tensor, tuple[Tensor, ...]], Tensor]
Whole = Callable[[Tensor], tuple[Tensor, tuple[Tensor, ...], Tensor]]


class _CutTracer(fx.Tracer):
    """Traces through every module except the cut layer and standard torch.nn leaves."""

    def __init__(self, layer: str) -> None:
        super().__init__()
        self.layer = layer

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name == self.layer or super().is_leaf_module(
            m, module_qualified_name
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
