"""Finding the held-out loader leaves training as it would be without gapwatch.

Lightning builds the validation loaders at the first validation (or the sanity check) and
never calls ``setup("test")`` during fit. A ``val_dataloader`` or ``setup("test")`` that
draws from the global random streams (a ``random_split`` without a generator, a random
subsample) must see them move exactly when they would without gapwatch.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import seed_everything
from torch.utils.data import DataLoader, Subset, random_split

from gapwatch import GeneralizationMonitor
from gapwatch.demo import DigitsClassifier, DigitsDataModule

from .conftest import make_trainer


class _RandomHeldOut(DigitsDataModule):
    """A validation subsample and a test split drawn from the global streams, as users write."""

    def val_dataloader(self) -> DataLoader:
        keep = torch.randperm(len(self.val_set))[:200]
        return DataLoader(Subset(self.val_set, keep.tolist()), batch_size=100)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage == "test":
            self.test_set, _ = random_split(self.val_set, [0.6, 0.4])

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=100)


def _weights(tmp_path, callbacks, **options) -> list[torch.Tensor]:
    seed_everything(0, verbose=False)
    model = DigitsClassifier(width=8)
    make_trainer(tmp_path, callbacks=callbacks, max_epochs=2, **options).fit(
        model, datamodule=_RandomHeldOut()
    )
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    ("heldout", "options"),
    [("val", {"check_val_every_n_epoch": 2}), ("test", {})],
    ids=["val-loader-built-late", "setup-test"],
)
def test_the_held_out_loader_moves_no_global_stream(tmp_path, heldout, options):
    monitor = GeneralizationMonitor(probe_size=64, heldout=heldout, ablation=False)
    watched = _weights(tmp_path, [monitor], **options)
    alone = _weights(tmp_path, [], **options)
    assert all(torch.equal(a, b) for a, b in zip(watched, alone, strict=True))
    assert len(monitor._probes.heldout) == 64
