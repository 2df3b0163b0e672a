"""Saving and restoring every global random stream around gapwatch's work."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states


@contextmanager
def isolated_rng() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's global streams (CUDA too) on any exit.

    Lightning's ``isolate_rng`` restores them only when its block ends normally; an
    exception or a ``KeyboardInterrupt`` inside an evaluation would leave training with
    the streams the evaluation moved.
    """
    states = _collect_rng_states(include_cuda=True)
    try:
        yield
    finally:
        _set_rng_states(states)
