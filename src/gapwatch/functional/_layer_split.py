"""A model cut at one layer into a prefix that runs once and a suffix that runs batched.

Unit ablation (Zhao et al., eq. 1) evaluates the network ``2 (M + 1)`` times per class with
one layer's units masked; everything before that layer gives the same result every time.
This module holds the public cut: :func:`split_model` checks the layer, traces the model
with ``torch.fx`` and cuts the graph after the layer (values that cross the cut, such as
skip connections, become extra suffix inputs), or falls back to a forward hook that
replaces the layer's output (both cuts live in :mod:`gapwatch.functional._layer_cuts`),
and :class:`LayerSplit` runs the parts in chunks on the model's device.
"""

from __future__ import annotations

import difflib
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
from gapwatch.functional._layer_cuts import (
    Prefix,
    Suffix,
    Whole,
    _cut_graph,
    _CutTracer,
    _hook_split,
)

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
