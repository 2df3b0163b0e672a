"""The checks of a probe callback's own options, when it is constructed.

A bad value fails at construction, naming the option, before any fit starts.
"""

from __future__ import annotations

from typing import Any

from gapwatch.functional._common import check_choice, check_positive


def check_options(
    *,
    every_n_epochs: Any,
    every_n_train_steps: Any,
    log_steps: Any,
    probe_size: Any,
    batch_size: Any,
    figures_every_n_evaluations: Any,
    heldout: Any,
    train_stream: Any,
    seed: Any,
    prefix: Any,
) -> None:
    """Raise a ``ValueError`` or ``TypeError`` that names the first bad option."""
    check_positive("every_n_epochs", every_n_epochs, integer=True)
    if every_n_train_steps is not None:
        check_positive("every_n_train_steps", every_n_train_steps, integer=True)
    if isinstance(log_steps, bool) or not isinstance(log_steps, int) or log_steps < 0:
        raise ValueError(
            "`log_steps` must be a non-negative integer (0: no early points; 8: steps 1, "
            f"2, 4, ..., 128), got {log_steps!r}."
        )
    check_positive("probe_size", probe_size, integer=True)
    check_positive("batch_size", batch_size, integer=True)
    if isinstance(figures_every_n_evaluations, bool) or figures_every_n_evaluations < 0:
        raise ValueError(
            "`figures_every_n_evaluations` must be a non-negative integer (0: no figures), "
            f"got {figures_every_n_evaluations!r}."
        )
    check_choice("heldout", heldout, ("val", "test", "none"))
    check_choice("train_stream", train_stream, ("batches", "reread"))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an integer, got {seed!r}.")
    if not isinstance(prefix, str):
        raise TypeError(f"`prefix` must be a string, got {type(prefix).__name__}.")
