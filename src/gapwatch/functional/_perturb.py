"""Where the perturbation proxies act: the inputs, or the output of a named module.

Token ids and raw image bytes have no Gaussian neighbourhood, and keyword inputs
(``input_ids`` with an ``attention_mask``) cannot be perturbed as one tensor. For them
the sensitivity and the Jacobian norm perturb the output of a module instead
(``perturb_at="<module path>"``): noise is added to that output, or that output becomes
the variable the Jacobian is taken against, through a forward hook that is removed
afterwards. The rest of the network is then the function measured, ``g`` in
``f(x) = g(h(x))`` with ``h`` the named module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from gapwatch.functional._common import chunks, evaluation, model_device, model_input
from gapwatch.functional._inputs import KeywordInputs, call_model


def named_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path`` (dots or slashes), or an error naming ``perturb_at``."""
    if not isinstance(path, str) or not path:
        raise TypeError(f"`perturb_at` must be a module path (a non-empty string), got {path!r}.")
    try:
        return model.get_submodule(path.replace("/", "."))
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name][:8]
        raise ValueError(
            f"`perturb_at={path!r}` names no submodule of {type(model).__name__}; module "
            f"paths start {names}."
        ) from None


def default_perturb_at(model: nn.Module, inputs: Any) -> str | None:
    """Where a perturbation acts by default: ``None`` (the inputs) for floating tensors.

    For integer or keyword inputs it is the first ``nn.Embedding`` (in the order the
    model registers its modules) with one output row per input, the token embedding of a
    text model (a position embedding's rows are shared by the inputs); failing that, the
    first module to finish, in one forward pass over the inputs, with a floating-point
    output of one row per input (for a model that converts uint8 images itself, its
    first layer after the conversion, e.g. the first convolution).

    Args:
        model: The model.
        inputs: A few inputs (two or more) on the model's device.

    Returns:
        The module path, or ``None`` to perturb the inputs.

    Raises:
        ValueError: If no module qualifies.
    """
    if isinstance(inputs, Tensor) and inputs.is_floating_point():
        return None
    finished: list[str] = []

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if (
                isinstance(output, Tensor)
                and output.is_floating_point()
                and output.ndim > 0
                and output.shape[0] == inputs.shape[0]
            ):
                finished.append(name)

        return hook

    named = [(name, module) for name, module in model.named_modules() if name]
    handles = [module.register_forward_hook(record(name)) for name, module in named]
    try:
        with evaluation(model), torch.no_grad():  # eval: no BatchNorm buffer moves
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    for name, module in named:
        if isinstance(module, nn.Embedding) and name in finished:
            return name
    if not finished:
        raise ValueError(
            f"The inputs are {_kind(inputs)} and gapwatch found no module with a "
            "floating-point output to perturb instead; pass `perturb_at=` with a module path."
        )
    return finished[0]


def check_module_output(model: nn.Module, inputs: Any, path: str) -> None:
    """Raise, naming ``perturb_at``, unless the module at ``path`` takes a perturbation."""
    with evaluation(model), torch.no_grad():
        forward_perturbed(model, inputs, path, lambda h: h)


@contextmanager
def replaced_output(
    model: nn.Module, path: str, replace: Callable[[Tensor], Tensor], batch: int
) -> Iterator[None]:
    """Within the block, the module at ``path`` returns ``replace(its output)``.

    The module must return one floating tensor ``[batch, ...]`` and run once per forward
    pass, so that the replacement acts on one well-defined variable, row by row (a
    position embedding, whose output is shared by the rows, is not one).
    """
    module = named_module(model, path)
    calls = [0]

    def hook(module: nn.Module, args: Any, output: Any) -> Tensor:
        if not isinstance(output, Tensor) or not output.is_floating_point():
            got = output.dtype if isinstance(output, Tensor) else type(output).__name__
            raise TypeError(
                f"`perturb_at={path!r}` must name a module that returns one floating-point "
                f"tensor, but it returns {got}; name another module (e.g. the embedding)."
            )
        if output.ndim == 0 or output.shape[0] != batch:
            raise ValueError(
                f"`perturb_at={path!r}` must name a module whose output has one row per "
                f"input ({batch}), but it returns shape {tuple(output.shape)}; name another "
                "module (e.g. the token embedding)."
            )
        calls[0] += 1
        if calls[0] > 1:
            raise ValueError(
                f"`perturb_at={path!r}` names a module that runs more than once per forward "
                "pass; name a module that runs once (a shared embedding is not one)."
            )
        return replace(output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def forward_perturbed(
    model: nn.Module, inputs: Any, path: str, replace: Callable[[Tensor], Tensor]
) -> Any:
    """``model(inputs)`` with the output ``h`` of the module at ``path`` made ``replace(h)``."""
    with replaced_output(model, path, replace, inputs.shape[0]):
        return call_model(model, inputs)


def module_output_squares(
    model: nn.Module, inputs: Any, path: str, batch_size: int | None
) -> tuple[Tensor, Tensor]:
    """Per row, the float64 sum of squares of the module's output and its number of entries.

    Eq. 9's second moment of the perturbed variable, ``E[h^2]``, is the ratio of their
    sums; the caller sets eval mode and no-grad.
    """
    seen: list[tuple[Tensor, int]] = []

    def keep(output: Tensor) -> Tensor:
        seen.append((output.detach().double().square().flatten(1).sum(1), output[0].numel()))
        return output

    device = model_device(model, inputs.device)
    for rows in chunks(inputs.shape[0], batch_size):
        forward_perturbed(model, model_input(inputs[rows], device), path, keep)
    squares = torch.cat([part for part, _ in seen])
    counts = torch.cat([torch.full_like(part, float(n)) for part, n in seen])
    return squares, counts


def _kind(inputs: Any) -> str:
    if isinstance(inputs, KeywordInputs):
        return f"keyword inputs ({', '.join(inputs)})"
    return str(inputs.dtype) if isinstance(inputs, Tensor) else type(inputs).__name__


def check_perturbable(model: nn.Module, inputs: Any, perturb_at: str | None) -> None:
    """Raise, naming ``perturb_at`` and a module to give it, if the inputs cannot be perturbed.

    Floating tensors are perturbed in place (``perturb_at=None``); anything else needs a
    module whose output is perturbed instead.
    """
    if perturb_at is not None:
        named_module(model, perturb_at)
        return
    if isinstance(inputs, Tensor) and inputs.is_floating_point():
        return
    if not isinstance(inputs, (Tensor, KeywordInputs)):
        return  # check_inputs names the type
    suggestion = ""
    for name, module in model.named_modules():
        if name and isinstance(module, nn.Embedding):
            suggestion = f" (here the embedding: `perturb_at={name!r}`)"
            break
    raise TypeError(
        f"The inputs are {_kind(inputs)}, which cannot be perturbed in place; pass "
        f"`perturb_at=` with the path of the module whose output to perturb instead"
        f"{suggestion}, or convert floating-point inputs with `.float()`."
    )
