"""Where the first evaluation's time goes: probe drawing, each proxy's setup, step 0.

The first evaluation is everything the suite does in ``on_train_start``: draw the probe
sets, ask the model for its number of outputs, set every proxy up (unit ablation picks
its layer with a hooked forward pass and traces the model to split it there; the
normalized loss traces the model to find its layers, or runs its reference inputs) and
evaluate at step 0. Each part is timed by wrapping the callable that does it, on the
callback instance or in the module that calls it, so the code measured is the code
that runs. Parts nest: ``default_layer`` and ``split_model`` are inside
``AblationProxy.setup``; ``other`` is what the named parts leave of the total.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import gapwatch.callbacks._setup as setup
import gapwatch.callbacks.unit_ablation as unit_ablation
from gapwatch.callbacks.base import ProbeCallback

#: Module-level callables timed where they are called: (module, name, label).
_MODULE_PARTS: tuple[tuple[ModuleType, str, str], ...] = (
    (setup, "draw_probe", "draw_probes"),
    (setup, "_num_outputs", "num_outputs"),
    (unit_ablation, "default_layer", "default_layer"),
    (unit_ablation, "split_model", "split_model"),
)
#: Labels nested inside another part, left out of the sum that gives ``other``.
NESTED = ("default_layer", "split_model")


def stopwatch(spent: dict[str, float], name: str, run: Callable) -> Callable:
    """``run``, adding the seconds of every call to ``spent[name]``."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return run(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start

    return timed


@contextmanager
def timed_first_evaluation(callback: ProbeCallback) -> Iterator[dict[str, float]]:
    """Time ``callback``'s first evaluation and its parts, while the block runs a fit.

    Yields:
        A dict that, after the block, holds seconds per part and ``first_evaluation``.
    """
    spent: dict[str, float] = {}
    # A part the code no longer calls by that name is simply not reported.
    saved = [(m, name, getattr(m, name)) for m, name, _ in _MODULE_PARTS if hasattr(m, name)]
    labels = {name: label for _, name, label in _MODULE_PARTS}
    for module, name, original in saved:
        setattr(module, name, stopwatch(spent, labels[name], original))
    for proxy in callback.proxies:
        proxy.setup = stopwatch(spent, f"{type(proxy).__name__}.setup", proxy.setup)
    evaluate, start = callback._evaluate, callback.on_train_start

    def first(*args: Any, **kwargs: Any) -> Any:
        # Only the evaluation inside on_train_start is step 0's.
        callback._evaluate = stopwatch(spent, "step0_evaluation", evaluate)
        try:
            return stopwatch(spent, "first_evaluation", start)(*args, **kwargs)
        finally:
            callback._evaluate = evaluate

    callback.on_train_start = first
    try:
        yield spent
    finally:
        for module, name, original in saved:
            setattr(module, name, original)
        vars(callback).pop("on_train_start", None)
        for proxy in callback.proxies:
            vars(proxy).pop("setup", None)
    named = sum(v for k, v in spent.items() if k != "first_evaluation" and k not in NESTED)
    spent["other"] = spent.get("first_evaluation", 0.0) - named
