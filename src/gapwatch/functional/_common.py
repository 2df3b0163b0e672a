"""Plumbing shared by every proxy: argument checks, chunking, isolation.

A proxy runs inside somebody else's training job, so everything here serves one rule:
leave the model and the global random state exactly as they were found. The random
draws live in :mod:`gapwatch.functional._draws`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from gapwatch.functional._inputs import Inputs, KeywordInputs, call_model, logits_of

#: Rows per forward pass when a caller gives no ``batch_size``: every functional proxy's
#: default and the callbacks'. A row is one input, one noisy input, one loop point or one
#: masked copy, whatever the proxy feeds the model. Chunks of all rows at once are slower
#: on the CPU, not faster: glibc's malloc maps every block over 32 MiB fresh from the
#: kernel at each allocation, so large chunks pay page faults on every activation (512-row
#: chunks of a CIFAR ResNet-8 took twice as long as 128-row ones, and an exact Jacobian of
#: 512 CIFAR-shaped inputs in one chunk 1.8x as long as in chunks of 128; see
#: benchmarks/README.md). On a GPU a chunk is then the size of a common training batch, so
#: the extra memory is about a training step's, and it grows with the chunk, not with the
#: probes. ``batch_size=None`` still means all rows in one chunk.
DEFAULT_BATCH_SIZE = 128


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raise a ``ValueError`` naming the valid options if ``value`` is not one of them."""
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"Unknown {name} {value!r}; use one of {options}.")


def check_positive(name: str, value: float, *, integer: bool = False, finite: bool = True) -> None:
    """Raise a ``ValueError`` unless ``value`` is a positive number (an integer, finite).

    ``finite=False`` admits ``math.inf``, for a norm's order.
    """
    kind = int if integer else (int, float)
    valid = not isinstance(value, bool) and isinstance(value, kind) and value > 0
    if not valid or (finite and not math.isfinite(value)):
        if integer:
            what = "a positive integer"
        else:
            what = "a positive, finite number" if finite else "a positive number or math.inf"
        raise ValueError(f"`{name}` must be {what}, got {value!r}.")


def check_batch_size(batch_size: int | None) -> None:
    """``batch_size`` is ``None`` (everything at once) or a positive integer."""
    if batch_size is not None:
        check_positive("batch_size", batch_size, integer=True)


def check_inputs(
    inputs: Any, *, min_samples: int = 1, name: str = "inputs", floating: bool = True
) -> Tensor:
    """Validate a batch of inputs: a tensor ``[N, ...]`` with ``N >= min_samples``.

    Args:
        inputs: The batch.
        min_samples: Fewest rows the caller needs.
        name: The argument's name, for messages.
        floating: Require floating point: proxies that perturb or differentiate the
            inputs do; the others also take integer inputs (token ids, uint8 images that
            the model converts itself) as they are.

    Returns:
        The same tensor, for chaining.
    """
    if isinstance(inputs, KeywordInputs) and not floating:
        if inputs.shape[0] < min_samples:
            raise ValueError(
                f"`{name}` has {inputs.shape[0]} samples; this proxy needs at least {min_samples}."
            )
        return inputs  # type: ignore[return-value]
    if isinstance(inputs, KeywordInputs):
        raise TypeError(
            f"`{name}` are keyword inputs ({', '.join(inputs)}), which cannot be perturbed or "
            "differentiated in place; pass `perturb_at=` naming the module whose output to "
            "perturb (e.g. the token embedding)."
        )
    if not isinstance(inputs, Tensor):
        raise TypeError(
            f"`{name}` must be a torch.Tensor of shape [N, ...], got {type(inputs).__name__}."
        )
    if inputs.ndim < 2:
        raise ValueError(
            f"`{name}` must have a batch dimension and at least one feature dimension "
            f"([N, ...]); got shape {tuple(inputs.shape)}. For a single sample use "
            f"`x.unsqueeze(0)`."
        )
    if floating and not inputs.is_floating_point():
        raise TypeError(
            f"`{name}` must be a floating-point tensor, got {inputs.dtype}; "
            f"convert it with `.float()`."
        )
    if inputs.shape[0] < min_samples:
        raise ValueError(
            f"`{name}` has {inputs.shape[0]} samples; this proxy needs at least {min_samples}."
        )
    return inputs


def check_targets(targets: Any, num_samples: int) -> Tensor:
    """Validate integer class labels ``[N]`` that match ``num_samples`` inputs."""
    if not isinstance(targets, Tensor) or targets.ndim != 1:
        got = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(f"`targets` must be a 1-D tensor of class indices, got {got}.")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(
            f"`targets` must hold integer class indices, got {targets.dtype}; "
            f"classification proxies do not apply to regression targets."
        )
    if targets.shape[0] != num_samples:
        raise ValueError(
            f"`targets` has {targets.shape[0]} entries but there are {num_samples} inputs."
        )
    return targets


def as_outputs(out: Any) -> Tensor:
    """Check what a model returned and bring it to ``[N, K]`` (a ``[N]`` output is ``K = 1``).

    The logits are the output itself, its ``.logits`` or ``["logits"]``, or the first
    element of a tuple (:func:`~gapwatch.functional._inputs.logits_of`).
    """
    out = logits_of(out)
    if not isinstance(out, Tensor):
        raise TypeError(
            f"The model returned {type(out).__name__}, but gapwatch needs the logits [N, K] (or "
            "a regression output [N] / [N, 1]): a tensor, an object with `.logits`, a mapping "
            "with 'logits' or a tuple whose first element is the logits. "
            "With a gapwatch callback, pass `model_attr=` naming the submodule that returns "
            "the logits, or override the callback's `get_model` to return a module that does "
            "(e.g. `nn.Sequential(model, PickLogits())`, with a module picking the logits out)."
        )
    if out.ndim == 1:
        return out.unsqueeze(1)
    if out.ndim != 2:
        raise ValueError(
            f"The model output has shape {tuple(out.shape)}; gapwatch needs [N, K] logits "
            "or a regression output [N] / [N, 1]."
        )
    return out


def check_classifier(num_outputs: int, what: str) -> None:
    """Raise if a proxy that needs class probabilities meets a one-output (regression) model."""
    if num_outputs < 2:
        raise ValueError(
            f"{what} needs class scores (K >= 2 outputs) but the model has one output. "
            "For regression models use `output_sensitivity` or "
            "`jacobian_norm(output='logits')`."
        )


def check_float32_model(model: nn.Module) -> None:
    """Raise, naming the fix, if the model's floating parameters are not all float32.

    Proxies feed float32 inputs and compute in float32 (inside a mixed-precision loop
    too, with autocast off); a model converted to another dtype would fail on them.
    """
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    others = sorted(str(dtype) for dtype in dtypes - {torch.float32})
    if others:
        raise ValueError(
            f"gapwatch computes its proxies in float32, but the model has {', '.join(others)} "
            "parameters (e.g. from Trainer(precision='bf16-true', '16-true' or '64-true')). "
            "Use precision='bf16-mixed' or '16-mixed', which keep the weights in float32, "
            "or keep the model in float32."
        )


def model_device(model: nn.Module, default: torch.device | None = None) -> torch.device:
    """The device of the model's first parameter or buffer (``default`` if it has none)."""
    for tensor in model.parameters():
        return tensor.device
    for buffer in model.buffers():
        return buffer.device
    return default if default is not None else torch.device("cpu")


def chunks(num_samples: int, batch_size: int | None) -> Iterator[slice]:
    """Slices of at most ``batch_size`` rows that cover ``range(num_samples)`` in order."""
    step = num_samples if batch_size is None else batch_size
    for start in range(0, num_samples, max(step, 1)):
        yield slice(start, min(start + step, num_samples))


def forward_chunks(
    model: nn.Module, inputs: Inputs, batch_size: int | None
) -> Iterator[tuple[slice, Inputs, Tensor]]:
    """Run ``model`` over ``inputs`` chunk by chunk on the model's device.

    Inputs may live on another device (a probe set kept on the CPU, say); each chunk is
    moved over on its own, so memory grows with ``batch_size``, not with ``N``.

    Yields:
        ``(rows, x, outputs)``: the slice of ``inputs``, the chunk on the model's device
        (see :func:`model_input`), and the checked ``[n, K]`` float32 outputs.
    """
    device = model_device(model, inputs.device)
    for rows in chunks(inputs.shape[0], batch_size):
        x = model_input(inputs[rows], device)
        yield rows, x, as_outputs(call_model(model, x)).float()


def model_input(inputs: Inputs, device: torch.device) -> Inputs:
    """``inputs`` on ``device``: floating point as float32, the proxies' dtype; others as given.

    Integer inputs keep their dtype: an embedding takes int64 ids, and a model that
    converts uint8 images itself would compute garbage on their float values. Keyword
    inputs move tensor by tensor, floating ones as float32.
    """
    if isinstance(inputs, KeywordInputs):
        return inputs.to(device=device, dtype=torch.float32)
    if inputs.is_floating_point():
        return inputs.to(device=device, dtype=torch.float32)
    return inputs.to(device=device)


@contextmanager
def evaluation(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode, without autocast, and restore every submodule's flag.

    Eval mode is what keeps BatchNorm from updating its running statistics and Dropout
    from drawing on the global RNG; the flags are restored one by one because a user may
    have frozen parts of the model in eval mode on purpose.
    """
    flags = [(module, module.training) for module in model.modules()]
    device_type = model_device(model).type
    try:
        model.eval()
        # Proxies are float32 by contract, even inside a bf16-mixed training loop.
        with torch.autocast(device_type=device_type, enabled=False):
            yield model
    finally:
        for module, flag in flags:
            module.training = flag


@contextmanager
def gradients_enabled() -> Iterator[None]:
    """Allow autograd even inside ``torch.inference_mode()`` or ``torch.no_grad()``.

    Lightning validates under inference mode, which ``torch.enable_grad()`` alone does not
    lift. Tensors made inside inference mode still cannot enter autograd: clone them
    inside this context first.
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield
