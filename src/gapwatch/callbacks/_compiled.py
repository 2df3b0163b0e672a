"""Looking through ``torch.compile``: the callbacks evaluate the uncompiled module.

A compiled module (``torch.compile(net)``, an ``OptimizedModule`` around ``_orig_mod``)
shares its parameters and buffers with the module it wraps, but hides that module's
layers behind ``_orig_mod.`` in every module path, does not see forward hooks added
after it compiled (dynamo does not guard on them), cannot be traced by ``torch.fx``, and
refuses the double backward of compiled graphs with donated buffers. The proxies
therefore run the same module uncompiled, eagerly: the same weights and the same
numbers up to compiler rounding, no recompilation of the training graph, and the module
paths of the uncompiled model (``"net.0"``, not ``"net._orig_mod.0"``).

For the block of :func:`uncompiled` every ``OptimizedModule`` child is replaced in its
parent by its ``_orig_mod``, and a LightningModule that Lightning compiled
(``trainer.fit(torch.compile(model))``) gets its original ``forward`` back; both are put
back afterwards, so training runs compiled as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn


def _optimized_type() -> type | None:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - torch without dynamo
        return None
    return OptimizedModule


@contextmanager
def uncompiled(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with every ``torch.compile`` wrapper inside it looked through, for the block.

    Args:
        model: The module the proxies evaluate, compiled or not.

    Yields:
        The module to evaluate: ``model`` itself, or its ``_orig_mod`` if it is compiled.
    """
    optimized = _optimized_type()
    root: nn.Module = model
    while optimized is not None and isinstance(root, optimized):
        root = root._orig_mod  # type: ignore[assignment]
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    forwards: list[tuple[nn.Module, Any]] = []
    try:
        found = optimized is not None
        while found:  # a compiled module may hold compiled modules
            found = False
            for parent in list(root.modules()):
                for name, child in list(parent._modules.items()):
                    if child is not None and isinstance(child, optimized):  # type: ignore[arg-type]
                        parent._modules[name] = child._orig_mod  # type: ignore[assignment]
                        swapped.append((parent, name, child))
                        found = True
        for module in root.modules():
            context = getattr(module, "_compiler_ctx", None)
            if isinstance(context, dict) and "forward" in vars(module):
                forwards.append((module, vars(module)["forward"]))
                module.forward = context["original_forward"]  # type: ignore[method-assign]
        yield root
    finally:
        for module, forward in reversed(forwards):
            module.forward = forward  # type: ignore[method-assign]
        for parent, name, child in reversed(swapped):
            parent._modules[name] = child
