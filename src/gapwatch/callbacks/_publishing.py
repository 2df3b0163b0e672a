"""Where an evaluation's results go: loggers, monitors, TensorBoard's extras, the hparams."""

from __future__ import annotations

import math
import textwrap
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from gapwatch.callbacks._distributed import gather_shards
from gapwatch.callbacks._proxy import Proxy


def publish(
    trainer: Trainer,
    metrics: dict[str, float],
    step: int,
    prefix: str,
    *,
    warn: bool,
) -> bool:
    """Log ``metrics`` to every logger and put them where monitors read them.

    ``log_metrics`` places a point at any step (``self.log`` cannot before the first
    optimizer step); ``trainer.callback_metrics`` is what ``EarlyStopping`` and
    ``ModelCheckpoint`` read, as Lightning's ``LearningRateMonitor`` also relies on.

    Returns:
        Whether a value was not finite (warned about once, if ``warn``).
    """
    named = {prefix + name: value for name, value in metrics.items()}
    bad = sorted(name for name, value in named.items() if not math.isfinite(value))
    if bad and warn:
        rank_zero_warn(f"gapwatch: non-finite values at step {step} for {bad}; logged as is.")
    for logger in trainer.loggers:
        logger.log_metrics(named, step=step)
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in named.items()})
    return bool(bad)


def record(
    trainer: Trainer,
    metrics: dict[str, float],
    step: int,
    prefix: str,
    history: list[dict[str, float]],
    *,
    warn: bool,
) -> bool:
    """``publish`` ``metrics``, then append them to ``history``; the first time, say what is logged.

    Returns:
        Whether a value was not finite (as ``publish``).
    """
    first = not history
    bad = publish(trainer, metrics, step, prefix, warn=warn)
    history.append({"step": float(step), **metrics})
    if first:
        names = ", ".join(sorted(metrics))
        rank_zero_info(textwrap.fill(f"gapwatch logs {prefix}{{{names}}}", width=100))
    return bad


def artifacts(trainer: Trainer, proxies: Sequence[Proxy]) -> dict[str, object]:
    """Every proxy's artifacts, with per-sample values from every process.

    A histogram of this process's shard alone would show a subsample of the probe. The
    ablation curves are per class and stay this process's classes.
    """
    found = {k: v for p in proxies for k, v in p.artifacts().items()}
    if trainer.world_size > 1:
        for name in sorted(found):  # the same order on every process
            value = found[name]
            if isinstance(value, Tensor):
                found[name] = gather_shards(trainer, value)
    return found


def settings(
    callback: object, names: Sequence[str], proxies: Sequence[Proxy], prefix: str
) -> dict[str, Any]:
    """The primitive settings of a callback and its proxies, for the hparams entry."""
    found = {name: getattr(callback, name) for name in names}
    for proxy in proxies:
        owner = type(proxy).__name__.removesuffix("Proxy").lower()
        found |= {
            f"{owner}.{name}": value
            for name, value in vars(proxy).items()
            if not name.startswith("_") and isinstance(value, (bool, int, float, str))
        }
    return {prefix + name: value for name, value in found.items()}


class Stopwatch:
    """What monitoring costs one fit: the seconds of its timed blocks, since the fit began."""

    def __init__(self) -> None:
        self.fit_started, self.seconds = time.perf_counter(), 0.0

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Count the block's wall time as monitoring's, even when it raises."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - started

    def cost(self, evaluations: int) -> str:
        """The fit-end line: see ``cost``."""
        return cost(self.seconds, self.fit_started, evaluations)


def cost(seconds: float, fit_started: float, evaluations: int) -> str:
    """What monitoring cost a fit: its seconds and their share of the fit's wall time."""
    total = time.perf_counter() - fit_started
    share = seconds / total if total > 0 else math.nan
    return (
        f"gapwatch took {seconds:.1f} s of the fit's {total:.1f} s ({share:.1%}), "
        f"{evaluations} evaluations and the set-up."
    )
