"""Callbacks that read gapwatch's metrics, and where they would find none yet.

``EarlyStopping`` and ``ModelCheckpoint`` monitor gapwatch metrics like any logged value.
Where one checks before gapwatch has the value (a stream's train probe fills only from the
batches training receives), Lightning's own error says to log the metric; the functions
here fail first, with the numbers and the options that fix it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint


@dataclass(frozen=True)
class Reader:
    """A callback that reads a gapwatch metric, and where it reads it."""

    callback: Callback
    monitor: str
    at_validation: bool = False
    at_train_epoch_end: bool = False
    every_n_train_steps: int | None = None

    @property
    def name(self) -> str:
        """How messages name it: ``EarlyStopping(gapwatch/prediction_changes)``."""
        return f"{type(self.callback).__name__}({self.monitor})"

    def fails_without_value(self, trainer: Trainer, *, at_validation: bool) -> bool:
        """Whether its next check raises when the metric is missing, as Lightning decides it.

        ``ModelCheckpoint`` raises once a validation has run: a check at validation end
        always follows one, and a check at an epoch's end follows the epoch's validation.
        """
        if isinstance(self.callback, EarlyStopping):
            return bool(self.callback.strict)
        if not isinstance(self.callback, ModelCheckpoint):
            return False
        every = trainer.check_val_every_n_epoch
        validates_now = sum(trainer.num_val_batches) > 0 and (
            every is not None and (trainer.current_epoch + 1) % every == 0
        )
        return at_validation or validates_now or trainer.fit_loop.epoch_loop.val_loop._has_run


def refuse_missing(
    trainer: Trainer,
    readers: list[Reader],
    history: list[dict[str, float]],
    *,
    at_validation: bool,
    prefix: str,
    probe_size: int,
    collected: int | None,
) -> None:
    """Fail, naming the fix, where a check would stop the fit for a value not logged yet.

    Only a stream's train probe delays gapwatch's values past the first check: it fills
    from the samples training receives, and a metric such as ``prediction_changes`` needs
    an evaluation before it. Lightning's own error would list other metrics and say to
    log this one. After two evaluations a missing metric is the reader's own (a misspelt
    name, say), which Lightning's message covers.

    Args:
        trainer: Its ``callback_metrics`` hold what the readers will find.
        readers: The readers that check next.
        at_validation: Whether they check at this validation's end (else after this batch).
        history: gapwatch's evaluations so far.
        prefix: The callback's ``prefix``.
        probe_size: The callback's ``probe_size``.
        collected: Samples of the train probe in so far; None once it is complete.
    """
    if len(history) >= 2 or (collected is None and not history):
        return
    for reader in readers:
        if reader.monitor in trainer.callback_metrics or not reader.fails_without_value(
            trainer, at_validation=at_validation
        ):
            continue
        if collected is not None:
            why = f"only {collected} have arrived by this check (step {trainer.global_step})"
        else:
            logged = sorted(prefix + name for name in history[0] if name != "step")
            why = (
                f"all {probe_size} were in at step {int(history[0]['step'])}, where "
                f"gapwatch evaluated for the first time; `{reader.monitor}` needs an earlier "
                "evaluation (if it is not prediction_changes, check its spelling: gapwatch "
                f"logs {logged})"
            )
        raise _no_value_yet(reader, probe_size, why)


def refuse_unfillable(
    trainer: Trainer, readers: Sequence[Reader], *, probe_size: int, batch_size: int | None
) -> None:
    """Fail at setup where a stream's first epoch cannot fill the probe a check needs.

    Only a stream with a length tells this in advance (``trainer.num_training_batches``
    is finite); for one without, :func:`refuse_missing` fails at the first check.

    Args:
        trainer: The fit about to start.
        readers: Every reader of a gapwatch metric.
        probe_size: The callback's ``probe_size``.
        batch_size: The train loader's ``batch_size`` (None: batches of unknown size).
    """
    batches = trainer.num_training_batches
    if batch_size is None or not math.isfinite(batches) or batches * batch_size >= probe_size:
        return
    why = (
        f"its first epoch holds at most {int(batches) * batch_size} "
        f"({int(batches)} batches of {batch_size})"
    )
    for reader in readers:
        if reader.fails_without_value(trainer, at_validation=reader.at_validation):
            raise _no_value_yet(reader, probe_size, why)


def _no_value_yet(reader: Reader, probe_size: int, why: str) -> RuntimeError:
    fix = "`EarlyStopping(strict=False)` to skip the checks until there is a value, "
    if isinstance(reader.callback, ModelCheckpoint):
        fix = ""
    return RuntimeError(
        f"{reader.name} checks before gapwatch has a value of `{reader.monitor}` and would "
        "stop the fit. The train data is a stream, so gapwatch's train probe is the first "
        f"probe_size={probe_size} samples training receives, and {why}. Pass {fix}a "
        "probe_size that the stream delivers before its first check (before its last batch "
        "for prediction changes), or train_stream='reread' for a stream that starts again "
        "when iterated anew (then gapwatch evaluates at step 0)."
    )


#: What gapwatch logs only from a held-out probe (each also with ``_se``).
HELDOUT_ONLY = ("test_loss", "test_acc", "gap", "normalized_test_loss")


def refuse_without_heldout(trainer: Trainer, readers: Sequence[Reader], prefix: str) -> None:
    """Fail at setup where a check would stop the fit on a held-out metric never logged.

    Args:
        trainer: The fit about to start, which gave gapwatch no held-out data.
        readers: Every reader of a gapwatch metric.
        prefix: The callback's ``prefix``.
    """
    for reader in readers:
        name = reader.monitor.removeprefix(prefix).removesuffix("_se")
        if name in HELDOUT_ONLY and reader.fails_without_value(
            trainer, at_validation=reader.at_validation
        ):
            raise RuntimeError(
                f"{reader.name} monitors a held-out metric, but this fit gives gapwatch no "
                "held-out data (no validation loader, `limit_val_batches=0`, or "
                "`heldout='none'`), so it is never logged and the first check would stop "
                f"the fit. Monitor a train-probe metric ({prefix}prediction_changes needs no "
                "held-out data), give the fit validation data, or pass `heldout='test'` "
                "with a `test_dataloader()`."
            )
