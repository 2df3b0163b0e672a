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


@dataclass(frozen=True)
class Checks:
    """Where callbacks monitoring a gapwatch metric read it during one fit."""

    at_validation: bool = False
    at_train_epoch_end: bool = False
    every_n_train_steps: tuple[int, ...] = ()
    readers: tuple[str, ...] = ()

    @classmethod
    def of(cls, trainer: Trainer, prefix: str) -> Checks:
        """The checks of the trainer's callbacks whose ``monitor`` carries ``prefix``."""
        validation = epoch_end = False
        steps: list[int] = []
        readers: list[str] = []
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            monitor = getattr(callback, "monitor", None)
            if not isinstance(monitor, str) or not monitor.startswith(prefix):
                continue
            readers.append(f"{type(callback).__name__}({monitor})")
            if isinstance(callback, EarlyStopping):
                on_epoch_end = callback._check_on_train_epoch_end
                if on_epoch_end is None:  # as EarlyStopping.setup decides it
                    on_epoch_end = (
                        trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1
                    )
            elif isinstance(callback, ModelCheckpoint):
                if callback._every_n_train_steps >= 1:
                    steps.append(callback._every_n_train_steps)
                on_epoch_end = callback._should_save_on_train_epoch_end(trainer)
            else:  # an unknown reader: fresh values at both places it may read
                validation = True
                on_epoch_end = True
            validation |= not on_epoch_end
            epoch_end |= bool(on_epoch_end)
        return cls(validation, epoch_end, tuple(steps), tuple(readers))

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
