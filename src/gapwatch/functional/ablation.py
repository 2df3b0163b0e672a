"""Cumulative unit ablation and the sparsity of critical units (Zhao et al., eqs. 1-6).

For every class, the units of one layer are ranked by their mean L1 activation on that
class and zeroed cumulatively, most active first (curve ``E``) and least active first
(curve ``E_r``); the turning points of the two curves and the area between them give
the sparsity quantities ``zeta`` and ``kappa``.

Both curves need ``2 (M + 1)`` evaluations per class. Running the whole network for each
would repeat the part before the layer ``2 (M + 1)`` times with identical results, so the
model is split at the layer: the prefix runs once, and only the suffix runs on the
masked activations, all ablation levels of a class stacked into large batches.
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, cast, get_args

import torch
from torch import Tensor, fx, nn

from gapwatch.functional._common import (
    DEFAULT_BATCH_SIZE,
    as_outputs,
    check_batch_size,
    check_choice,
    check_classifier,
    check_float32_model,
    check_inputs,
    check_positive,
    check_targets,
    chunks,
    evaluation,
    model_device,
    model_input,
)

Prefix = Callable[[Tensor], tuple[Tensor, tuple[Tensor, ...]]]
Suffix = Callable[[Tensor, tuple[Tensor, ...]], Tensor]
Whole = Callable[[Tensor], tuple[Tensor, tuple[Tensor, ...], Tensor]]
SplitMethod = Literal["auto", "fx", "hook"]
KappaMethod = Literal["paper", "authors"]
_KAPPA_METHODS = get_args(KappaMethod)


@dataclass(frozen=True)
class AblationResult:
    """Cumulative unit ablation of one layer, class by class.

    Attributes:
        classes: ``[C]`` class ids evaluated, in the order of every per-class field.
        curves: ``[C, M+1]`` ``E(n)``: accuracy on the class after removing its ``n`` most
            active units.
        curves_reversed: ``[C, M+1]`` ``E_r(n)``: the same, least active units first.
        n0: ``[C]`` turning point of ``E`` (eq. 2); the first minimum of ``E`` if ``E``
            never reaches chance.
        n0_r: ``[C]`` turning point of ``E_r`` (eq. 3): its last maximum before ``n = M``.
        zeta_per_class: ``[C]`` eq. 4.
        kappa_per_class: ``[C]`` eq. 5, or the authors' variant (see
            :func:`ablation_summary`).
        zeta: 0-d class mean of ``zeta_per_class`` (eq. 6).
        kappa: 0-d class mean of ``kappa_per_class`` (eq. 6).
    """

    classes: Tensor
    curves: Tensor
    curves_reversed: Tensor
    n0: Tensor
    n0_r: Tensor
    zeta_per_class: Tensor
    kappa_per_class: Tensor
    zeta: Tensor
    kappa: Tensor


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


def ablation_summary(
    curves: Tensor,
    curves_reversed: Tensor,
    *,
    chance: float,
    classes: Tensor | None = None,
    kappa: KappaMethod = "paper",
) -> AblationResult:
    """Turning points and sparsity quantities of given ablation curves (eqs. 2-6).

    ``n0`` (eq. 2) is the first ``n`` with ``E(n) <= chance``. When ``E`` never gets
    there it is the first minimum of ``E``, as in the authors' code: in a chain network
    with the layer fully removed every sample gets the same prediction, so ``E(M)`` is
    0 for every class but one, and only that class, the one an all-zero layer predicts,
    can miss chance. Its ``E`` climbs back to 1 at ``n = M`` only because the empty layer
    predicts it, so the first minimum, the most damage done before that, is its turning
    point; ``M`` (the empty set's infimum read as "all units") would give this class the
    least sparse ``n0`` for an artefact.

    ``n0_r`` (eq. 3) is the *last* maximum of ``E_r`` over ``n = 0..M-1``. Last: the
    paper reads ``M - n0_r`` as the fewest units that, active together, give the best
    accuracy, and a network that fits its class stays at its maximum for a while as the
    least active units go, so the first maximum would be ``n = 0``. Before ``M``: for the
    class an all-zero layer predicts, ``E_r(M) = 1`` is always a maximum and would give
    ``M - n0_r = 0``; the authors' code excludes ``n = M`` likewise and finds the end of
    the real plateau. ``zeta = (n0 + M - n0_r) / 2M`` (eq. 4).

    ``kappa`` chooses between two readings of eq. 5:

    - ``"paper"`` (default), eq. 5 as printed: ``kappa = sum_{n=0..M} |E_r(n) - E(n)| / M``,
      the area enclosed by the two curves, in [0, 1] up to the factor ``(M + 1) / M``.
    - ``"authors"``, the authors' code, which produced the paper's figures:
      ``kappa = sum_{n=0..M} (E_r(n) - E(n)) / (M + 1)``, the signed mean, where
      stretches with ``E > E_r`` subtract. It is ``M / (M + 1)`` times the paper's value
      when ``E_r >= E`` throughout, and can be far smaller (even negative) when the
      curves cross, as they do for untrained networks.

    The printed equation is the default because it is the quantity the paper describes
    (an area, "adjusted to fall in the range from 0 to 1"), what gapwatch has always
    logged, and eq. 7 is refitted to its own family anyway; ``"authors"`` reproduces the
    published numbers. Both quantities are averaged over classes (eq. 6). A class whose
    curves hold a NaN (a model whose outputs went NaN) gets NaN for both.

    Args:
        curves: ``[C, M+1]`` ``E(n)``, most active units removed first.
        curves_reversed: ``[C, M+1]`` ``E_r(n)``, least active units removed first.
        chance: Chance-level accuracy.
        classes: ``[C]`` class ids (default ``0..C-1``).
        kappa: ``"paper"`` or ``"authors"``: which eq. 5, as above.

    Returns:
        The :class:`AblationResult` of these curves.

    Raises:
        ValueError: If the curves' shapes differ or have fewer than two levels, or on an
            unknown ``kappa``.
    """
    check_choice("kappa", kappa, _KAPPA_METHODS)
    if curves.shape != curves_reversed.shape or curves.ndim != 2 or curves.shape[1] < 2:
        raise ValueError(
            "`curves` and `curves_reversed` must both be [C, M+1] with M >= 1, got "
            f"{tuple(curves.shape)} and {tuple(curves_reversed.shape)}."
        )
    m = curves.shape[1] - 1
    reached = curves <= chance
    # argmax/argmin return the first extreme index (torch documents it).
    n0 = torch.where(reached.any(1), reached.int().argmax(1), curves.argmin(1))
    n0_r = (m - 1) - curves_reversed[:, :m].flip(1).argmax(1)
    zeta = (n0 + m - n0_r).float() / (2 * m)
    # Turning points of curves with undefined (NaN) accuracies are undefined too.
    undefined = (curves.isnan() | curves_reversed.isnan()).any(1)
    zeta = zeta.masked_fill(undefined, math.nan)
    difference = curves_reversed - curves
    kappa_per_class = difference.abs().sum(1) / m if kappa == "paper" else difference.mean(1)
    if classes is None:
        classes = torch.arange(curves.shape[0], device=curves.device)
    return AblationResult(
        classes,
        curves,
        curves_reversed,
        n0,
        n0_r,
        zeta,
        kappa_per_class,
        zeta.mean(),
        kappa_per_class.mean(),
    )


def _present_classes(
    targets: Tensor, num_classes: int, classes: Sequence[int] | Tensor | None
) -> list[int]:
    """The requested classes (default all) that have samples; warn about the others."""
    if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"`targets` must lie in [0, {num_classes}); check `num_classes`.")
    wanted = list(range(num_classes)) if classes is None else torch.as_tensor(classes).tolist()
    if not isinstance(wanted, list) or not wanted or len(set(wanted)) != len(wanted):
        raise ValueError("`classes` must be a non-empty list of distinct class ids.")
    if not all(isinstance(c, int) and 0 <= c < num_classes for c in wanted):
        raise ValueError(f"`classes` must be integers in [0, {num_classes}), got {wanted}.")
    counts = torch.bincount(targets, minlength=num_classes).tolist()
    missing = [c for c in wanted if counts[c] == 0]
    if len(missing) == len(wanted):
        raise ValueError(f"None of the classes {missing} has samples in `targets`.")
    if missing:
        warnings.warn(
            f"Classes {missing} have no samples and are skipped; zeta and kappa average "
            "over the other classes.",
            stacklevel=3,
        )
    return [c for c in wanted if counts[c] > 0]


def _ablate_class(
    suffix: Suffix,
    activations: Tensor,
    live: tuple[Tensor, ...],
    label: int,
    num_classes: int,
    batch_size: int | None,
) -> Tensor:
    """``[2, M+1]``: ``E`` and ``E_r`` on the samples of one class (all labelled ``label``)."""
    rank = _ranks(_activity(activations).mean(0))
    hits = _class_hits(suffix, activations, live, rank, label, num_classes, batch_size)
    return hits.view(2, -1).float() / activations.shape[0]


def _activity(activations: Tensor) -> Tensor:
    """``[n, M]``: each unit's L1 activation per sample (summed over a map's positions)."""
    num, units = activations.shape[:2]
    return activations.abs().reshape(num, units, -1).sum(2)


def _ranks(score: Tensor) -> Tensor:
    """``[2, M]``: each unit's position when removing the most (0) or least (1) active first."""
    orders = [score.argsort(descending=True, stable=True), score.argsort(stable=True)]
    return torch.stack(orders).argsort(1)


def _class_hits(
    suffix: Suffix,
    activations: Tensor,
    live: tuple[Tensor, ...],
    rank: Tensor,
    label: int,
    num_classes: int,
    batch_size: int | None,
) -> Tensor:
    """``[2 (M+1)]``: correct predictions of class ``label``'s rows at every ablation level."""
    num, units = activations.shape[:2]
    levels = units + 1
    # A chunk is a block of ablation steps times a block of samples: the masked copies are
    # a broadcast of the activations against the steps' masks, with no gather. Multiplying
    # by a 0/1 mask is several times faster than `torch.where`, and the same unless a
    # removed unit holds an inf or NaN (which a product would keep as NaN).
    finite = bool(activations.isfinite().all())
    rows = 2 * levels * num if batch_size is None else batch_size
    hits = torch.zeros(2 * levels, dtype=torch.float64, device=activations.device)
    for steps in chunks(2 * levels, max(1, rows // num)):
        step = torch.arange(steps.start, steps.stop, device=activations.device)
        removed = rank[step // levels] < (step % levels)[:, None]
        removed = removed.view(len(step), 1, units, *(1,) * (activations.ndim - 2))
        keep = (~removed).to(activations.dtype)
        for part in chunks(num, min(num, rows)):
            if finite:
                masked = (activations[part] * keep).flatten(0, 1)
            else:
                masked = torch.where(removed, 0.0, activations[part]).flatten(0, 1)
            values = tuple(v[part].repeat(len(step), *(1,) * (v.ndim - 1)) for v in live)
            logits = as_outputs(suffix(masked, values))
            if logits.shape[1] != num_classes:
                check_classifier(logits.shape[1], "unit_ablation")
                raise ValueError(
                    f"The model has {logits.shape[1]} outputs but num_classes={num_classes}."
                )
            # A NaN row has no prediction: its level's accuracy is undefined, not a guess.
            correct = (logits.argmax(1) == label).double()
            correct.masked_fill_(logits.isnan().any(1), math.nan)
            hits[steps] += correct.view(len(step), -1).sum(1)
    return hits


def ablation_in_chunks(
    split: LayerSplit,
    inputs: Tensor,
    targets: Tensor,
    *,
    num_classes: int,
    classes: Sequence[int],
    chance: float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    kappa: KappaMethod = "paper",
) -> AblationResult:
    """Cumulative unit ablation (eqs. 1-6) holding one chunk's activation at a time.

    :func:`ablation_from_activations` needs the layer's activation of every sample at once,
    which grows with the number of samples. Here the prefix runs twice over the inputs,
    ``batch_size`` rows at a time: the first pass sums each class's unit activity (the
    ranking of eq. 1), the second ablates each chunk's rows at every level and counts
    correct predictions per class. Extra memory is bounded by ``batch_size``, not by N.

    Args:
        split: The model split at the ablated layer (:func:`split_model`).
        inputs: ``[N, ...]`` inputs on any device.
        targets: ``[N]`` integer labels.
        num_classes: Number of classes ``K``.
        classes: Class ids to evaluate; each must have samples.
        chance: Chance accuracy for eq. 2 (default ``1 / num_classes``).
        batch_size: Rows per prefix pass, and per suffix call.
        kappa: ``"paper"`` or ``"authors"``; see :func:`ablation_summary`.

    Returns:
        The :class:`AblationResult`, as :func:`ablation_from_activations` gives it up to
        the float rounding of the activity sums.
    """
    check_inputs(inputs, floating=False)
    check_targets(targets, inputs.shape[0])
    check_positive("batch_size", batch_size, integer=True)
    check_choice("kappa", kappa, _KAPPA_METHODS)
    ids = list(classes)
    activity: Tensor | None = None
    for rows in chunks(inputs.shape[0], batch_size):
        activation, _ = split.capture(inputs[rows], batch_size=None)
        labels = targets[rows].to(activation.device)
        part = _activity(activation.float()).double()
        if activity is None:
            activity = part.new_zeros((len(ids), part.shape[1]))
        for i, label in enumerate(ids):
            activity[i] += part[labels == label].sum(0)
    assert activity is not None  # inputs has rows
    ranks = [_ranks(score.float()) for score in activity]
    hits = activity.new_zeros((len(ids), 2 * (activity.shape[1] + 1)))
    for rows in chunks(inputs.shape[0], batch_size):
        activation, live = split.capture(inputs[rows], batch_size=None)
        labels = targets[rows].to(activation.device)
        for i, label in enumerate(ids):
            members = labels == label
            if bool(members.any()):
                values = tuple(v[members] for v in live)
                hits[i] += _class_hits(
                    split.suffix, activation[members].float(), values, ranks[i], label,
                    num_classes, batch_size,
                )  # fmt: skip
    counts = torch.stack([(targets == label).sum() for label in ids]).to(hits)
    curves = (hits / counts[:, None]).float().view(len(ids), 2, -1)
    chance = 1.0 / num_classes if chance is None else chance
    ids_tensor = torch.tensor(ids, device=curves.device)
    return ablation_summary(
        curves[:, 0], curves[:, 1], chance=chance, classes=ids_tensor, kappa=kappa
    )


def ablation_from_activations(
    suffix: Suffix,
    activations: Tensor,
    targets: Tensor,
    *,
    num_classes: int,
    live: Sequence[Tensor] = (),
    classes: Sequence[int] | Tensor | None = None,
    chance: float | None = None,
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    kappa: KappaMethod = "paper",
) -> AblationResult:
    """Cumulative unit ablation (eq. 1) from an already captured layer activation.

    For each class ``j`` the units are ranked by their L1 attribute, ``sum_{x,y} |U(x,y)|``
    averaged over the class's samples (ties broken by unit index), and for every level
    ``n = 0..M`` the ``n`` first units of the descending (``E``) and of the ascending
    (``E_r``) ranking are set to zero. All ``2 (M + 1)`` masked copies of every sample are
    run through ``suffix`` in chunks of at most ``batch_size`` rows (one ablation level
    of one sample is one row); a row counts as correct when its arg-max output is its
    class, and a row with a NaN output makes its level's accuracy NaN. The model must be
    in eval mode, so that BatchNorm does not mix rows. (One sentence of the paper's
    Sec. 3.1 swaps the names; its Sec. 3.2 and eqs. 2-3 fix ``E`` as most-active-first,
    as here.)

    This is the entry point for a caller that already ran the prefix, e.g. a callback
    that also needs the clean logits from the same pass, via :meth:`LayerSplit.run`.

    Args:
        suffix: ``(activation, live) -> logits``, e.g. ``split_model(model, layer).suffix``.
        activations: ``[N, M]`` or ``[N, M, H, W]`` layer outputs; a unit is a feature or
            a channel.
        targets: ``[N]`` integer labels.
        num_classes: Number of classes ``K`` of the model.
        live: Other per-sample suffix inputs (``[N, ...]`` each), repeated per level.
        classes: Class ids to evaluate (default all); classes without samples are
            skipped with a warning.
        chance: Chance accuracy for eq. 2 (default ``1 / num_classes``).
        batch_size: Rows per suffix call: ``DEFAULT_BATCH_SIZE`` (128) unless given;
            ``None``: all ``2 (M + 1) N`` rows at once.
        kappa: ``"paper"`` (eq. 5 as printed) or ``"authors"`` (the authors' signed
            mean); see :func:`ablation_summary`.

    Returns:
        The :class:`AblationResult`; float32 curves on the activations' device.

    Raises:
        ValueError: On activations that are not 2-D or 4-D, labels out of range, classes
            without any sample, a non-positive ``num_classes``, ``chance`` outside
            [0, 1], an unknown ``kappa``, or a model with other than ``num_classes``
            outputs.
        TypeError: On non-integer targets.
    """
    check_inputs(activations, name="activations")
    if activations.ndim not in (2, 4):
        raise ValueError(
            f"`activations` must be [N, F] or [N, C, H, W], got {tuple(activations.shape)}; "
            "pick a layer with a linear or convolutional output."
        )
    check_positive("num_classes", num_classes, integer=True)
    check_batch_size(batch_size)
    check_choice("kappa", kappa, _KAPPA_METHODS)
    chance = 1.0 / num_classes if chance is None else chance
    if not 0.0 <= chance <= 1.0:
        raise ValueError(f"`chance` is an accuracy and must lie in [0, 1], got {chance}.")
    targets = check_targets(targets, activations.shape[0]).to(activations.device)
    classes = _present_classes(targets, num_classes, classes)
    curves = []
    for label in classes:
        members = targets == label
        values = tuple(v[members] for v in live)
        curves.append(
            _ablate_class(
                suffix, activations[members].float(), values, label, num_classes, batch_size
            )
        )
    both = torch.stack(curves)
    ids = torch.tensor(classes, device=both.device)
    return ablation_summary(both[:, 0], both[:, 1], chance=chance, classes=ids, kappa=kappa)


def unit_ablation(
    model: nn.Module,
    layer: str,
    inputs: Tensor,
    targets: Tensor,
    *,
    num_classes: int,
    classes: Sequence[int] | Tensor | None = None,
    chance: float | None = None,
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    method: SplitMethod = "auto",
    kappa: KappaMethod = "paper",
) -> AblationResult:
    """Cumulative unit ablation of ``layer`` and its sparsity quantities (eqs. 1-6).

    ``E(n)`` is the accuracy on class ``j`` (fraction of its samples predicted as ``j``)
    after zeroing the ``n`` units with the largest mean L1 activation on class ``j``;
    ``E_r(n)`` removes the smallest first. See :func:`ablation_from_activations` for the
    ranking and :func:`ablation_summary` for eqs. 2-6. The layer's output is captured
    once and only the network after it is rerun (see :func:`split_model`), batched over
    levels, so the cost is one forward pass plus ``2 (M + 1)`` suffix passes per sample.

    Args:
        model: Classifier mapping inputs to ``[N, K]`` logits; run in eval mode and left
            as found.
        layer: Module path, e.g. ``"features.18"``, ``"layer4"``, ``"3"``; its output must
            be ``[N, F]`` or ``[N, C, H, W]``.
        inputs: ``[N, ...]`` inputs on any device.
        targets: ``[N]`` integer labels.
        num_classes: Number of classes ``K``.
        classes: Class ids to evaluate (default all with at least one sample).
        chance: Chance accuracy for eq. 2 (default ``1 / num_classes``).
        batch_size: Rows per forward call, for the prefix and the suffix passes:
            ``DEFAULT_BATCH_SIZE`` (128) unless given; ``None``: all at once.
        method: How to split the model: ``"auto"``, ``"fx"`` or ``"hook"``.
        kappa: ``"paper"`` (eq. 5 as printed) or ``"authors"`` (the authors' signed
            mean); see :func:`ablation_summary`.

    Returns:
        The :class:`AblationResult`.

    Raises:
        ValueError: On an unknown layer (valid paths are listed), a layer output that is
            not 2-D or 4-D, or the cases of :func:`ablation_from_activations`.
        TypeError: On non-tensor inputs or non-integer targets.
    """
    check_inputs(inputs, floating=False)
    check_targets(targets, inputs.shape[0])
    check_choice("kappa", kappa, _KAPPA_METHODS)
    split = split_model(model, layer, method=method, example_inputs=inputs[:2])
    with evaluation(model), torch.no_grad():
        activations, live = split.capture(inputs, batch_size=batch_size)
        return ablation_from_activations(
            split.suffix,
            activations,
            targets,
            num_classes=num_classes,
            live=live,
            classes=classes,
            chance=chance,
            batch_size=batch_size,
            kappa=kappa,
        )
