"""When to evaluate: step 0, every n epochs or steps, early steps, where a monitor reads.

``log_steps`` adds evaluations at the logged steps 1, 2, 4, ..., ``2**(log_steps - 1)``:
the early, bias-dominated phase (Forouzesh et al.: ``bias_fraction`` near one, the
bias-aware prediction not yet meeting the held-out loss) often ends within the first epoch
of a large data set, between step 0 and the first epoch-end evaluation. The points are
log-spaced because that phase changes fastest at the start; ``log_steps`` caps them, so
they cost at most ``log_steps`` evaluations per fit, whatever its length.

``EarlyStopping`` counts a value it has seen before as no improvement, so a gapwatch
metric it monitors must be fresh at every check: with ``val_check_interval=0.5`` it checks
twice an epoch, with ``check_val_every_n_epoch=2`` every other epoch, and with
``every_n_epochs=2`` on gapwatch's side half its checks would find last time's value.
The schedule therefore adds an evaluation at each point where a callback that monitors a
gapwatch metric reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from gapwatch.callbacks._readers import Reader


@dataclass(frozen=True)
class Checks:
    """Where callbacks monitoring a gapwatch metric read it during one fit."""

    readers: tuple[Reader, ...] = ()

    @property
    def at_validation(self) -> bool:
        """Whether a reader checks at validation end."""
        return any(r.at_validation for r in self.readers)

    @property
    def at_train_epoch_end(self) -> bool:
        """Whether a reader checks at the train epoch's end."""
        return any(r.at_train_epoch_end for r in self.readers)

    @property
    def every_n_train_steps(self) -> tuple[int, ...]:
        """The step intervals readers check at."""
        return tuple(r.every_n_train_steps for r in self.readers if r.every_n_train_steps)

    @classmethod
    def of(cls, trainer: Trainer, prefix: str) -> Checks:
        """The checks of the trainer's callbacks whose ``monitor`` carries ``prefix``."""
        readers: list[Reader] = []
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            monitor = getattr(callback, "monitor", None)
            if not isinstance(monitor, str) or not monitor.startswith(prefix):
                continue
            if isinstance(callback, EarlyStopping):
                on_epoch_end = callback._check_on_train_epoch_end
                if on_epoch_end is None:  # as EarlyStopping.setup decides it
                    on_epoch_end = (
                        trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1
                    )
                reader = Reader(callback, monitor, not on_epoch_end, bool(on_epoch_end))
            elif isinstance(callback, ModelCheckpoint):
                on_epoch_end = callback._should_save_on_train_epoch_end(trainer)
                # Saving every n steps, it saves at no epoch end or validation (Lightning's
                # `every_n_epochs` is then 0).
                by_epoch = callback._every_n_epochs >= 1
                steps = callback._every_n_train_steps
                reader = Reader(
                    callback, monitor, by_epoch and not on_epoch_end, by_epoch and on_epoch_end,
                    steps if steps >= 1 else None,
                )  # fmt: skip
            else:  # an unknown reader: fresh values at both places it may read
                reader = Reader(callback, monitor, at_validation=True, at_train_epoch_end=True)
            readers.append(reader)
        return cls(tuple(readers))

    def due(self, trainer: Trainer, batch_idx: int | None) -> list[Reader]:
        """The readers that check after the batch ``batch_idx`` ends, or at validation (None)."""
        if batch_idx is None:
            return [r for r in self.readers if r.at_validation]
        last_batch = trainer.is_last_batch or batch_idx + 1 >= trainer.num_training_batches
        return [
            r
            for r in self.readers
            if (last_batch and r.at_train_epoch_end)
            or (r.every_n_train_steps and trainer.global_step % r.every_n_train_steps == 0)
        ]

    def after_batch(
        self,
        trainer: Trainer,
        batch_idx: int,
        step: int,
        *,
        every_n_epochs: int,
        every_n_train_steps: int | None,
        log_steps: int,
    ) -> bool:
        """Whether the batch that just ended calls for an evaluation.

        It does when it is the last of every ``every_n_epochs``-th epoch (or of any epoch
        whose end a monitor checks at), every ``every_n_train_steps`` optimizer steps (or a
        monitor's), and when the logged ``step`` is one of the early points of ``log_steps``.
        """
        last_batch = trainer.is_last_batch or batch_idx + 1 >= trainer.num_training_batches
        epoch_due = (trainer.current_epoch + 1) % every_n_epochs == 0
        steps = [n for n in (every_n_train_steps, *self.every_n_train_steps) if n]
        return (
            (last_batch and (epoch_due or self.at_train_epoch_end))
            or any(trainer.global_step % n == 0 for n in steps)
            or log_spaced(step, log_steps)
        )


def log_spaced(step: int, log_steps: int) -> bool:
    """Whether ``step`` (on the logged axis) is one of the early points ``1, 2, 4, ...``.

    Args:
        step: The logged step of the evaluation being considered.
        log_steps: How many early points there are: steps ``2**k`` for ``k < log_steps``.

    Returns:
        True for ``step = 2**k`` with ``0 <= k < log_steps``.
    """
    return step > 0 and step & (step - 1) == 0 and int(math.log2(step)) < log_steps
