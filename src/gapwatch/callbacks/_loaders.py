"""Finding the user's train and held-out loaders, as Lightning would build them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader

from gapwatch.callbacks._rng import isolated_rng


def first_loader(loaders: Any, role: str) -> DataLoader:
    """The single DataLoader behind ``loaders`` (the first one if there are several)."""
    if isinstance(loaders, DataLoader):
        return loaders
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, Sequence) and loaders and isinstance(loaders[0], DataLoader):
        if len(loaders) > 1:
            rank_zero_warn(f"gapwatch draws the {role} probe from the first of your loaders.")
        return loaders[0]
    raise TypeError(
        f"gapwatch needs a torch DataLoader for the {role} data, got {type(loaders).__name__}."
    )


def validation_loader(trainer: Trainer) -> DataLoader | None:
    """The first validation loader, or None where Lightning will not validate."""
    if trainer.limit_val_batches == 0:
        return None
    loaders = trainer.val_dataloaders
    if loaders is None:
        # Without a sanity check Lightning builds them at the first validation. gapwatch
        # builds its own now, with the global streams put back, so that Lightning's call
        # (and whatever a `val_dataloader` draws) comes where it would without gapwatch.
        source = trainer.fit_loop.epoch_loop.val_loop._data_source
        if not source.is_defined():
            return None  # a `validation_step` without a loader: Lightning skips validation
        with isolated_rng():
            loaders = source.dataloader()
    if loaders is None or (isinstance(loaders, Sequence) and not loaders):
        return None
    return first_loader(loaders, "validation")


def test_loader(trainer: Trainer, pl_module: LightningModule) -> DataLoader:
    """The first test loader of the datamodule or the module, set up for testing if needed.

    Lightning's documented ``setup(stage)`` pattern builds the test set only when
    ``stage == "test"``; during fit it does not exist yet.
    """
    # Lightning sets `datamodule` on the trainer at run time but does not declare it.
    datamodule = trainer.datamodule  # type: ignore[attr-defined]
    source = datamodule if datamodule is not None else pl_module
    if not is_overridden("test_dataloader", source):
        raise ValueError(
            "`heldout='test'` needs a `test_dataloader()` on the datamodule or the "
            "LightningModule; define one or use `heldout='val'`."
        )
    # Lightning never sets up for testing during fit: whatever that draws from the global
    # streams (a `random_split` without a generator) must not move training's.
    with isolated_rng():
        try:
            loaders = source.test_dataloader()
        except AttributeError:
            source.setup("test")
            loaders = source.test_dataloader()
    return first_loader(loaders, "test")
