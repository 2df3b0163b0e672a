"""Probes are what the user's loaders yield: their samplers, streams, transforms and dtypes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch import LightningDataModule, seed_everything
from torch import Tensor, nn
from torch.func import jacrev
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    SubsetRandomSampler,
    TensorDataset,
)

from gapwatch import (
    GeneralizationMonitor,
    JacobianNorm,
    NormalizedLoss,
    OutputSensitivity,
    Transitions,
)
from gapwatch.callbacks._drawing import eligible_indices
from gapwatch.demo import DigitsClassifier, DigitsDataModule
from gapwatch.functional import RowSeeds, predicted_test_loss
from gapwatch.functional.predicted_loss import softmax_mse

from .conftest import make_trainer


def _digits() -> tuple[Tensor, Tensor]:
    data = DigitsDataModule()
    data.setup()
    x = torch.cat([data.train_set.tensors[0], data.val_set.tensors[0]])
    y = torch.cat([data.train_set.tensors[1], data.val_set.tensors[1]])
    return x, y


class _Recorded(Dataset):
    """Digits that remember which rows were read, and refuse to read the ``broken`` ones."""

    def __init__(self, broken: frozenset[int] = frozenset()) -> None:
        self.x, self.y = _digits()
        self.broken = broken
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if index in self.broken:
            raise OSError(f"cannot read sample {index}")
        self.reads.append(index)
        return self.x[index], self.y[index]


class _SplitBySampler(LightningDataModule):
    """One dataset split into train and validation rows by SubsetRandomSampler."""

    def __init__(self, broken: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.dataset = _Recorded(broken)
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(0))
        self.val_rows = sorted(set(order[:500].tolist()) - broken)
        self.train_rows = sorted(set(order[500:].tolist()) - broken)

    def train_dataloader(self) -> DataLoader:
        sampler = SubsetRandomSampler(self.train_rows, generator=torch.Generator().manual_seed(1))
        return DataLoader(self.dataset, batch_size=64, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=256, sampler=SubsetRandomSampler(self.val_rows))


def test_heldout_probe_holds_only_the_rows_the_validation_sampler_yields(tmp_path):
    data = _SplitBySampler()
    monitor = OutputSensitivity(probe_size=128)
    seed_everything(0, verbose=False)
    model = DigitsClassifier(width=8)
    make_trainer(tmp_path, callbacks=[monitor], max_epochs=1).fit(model, datamodule=data)
    probes = monitor._probes
    rows = {tuple(x.flatten().tolist()): i for i, x in enumerate(data.dataset.x)}
    heldout = {rows[tuple(x.flatten().tolist())] for x in probes.heldout.inputs}
    train = {rows[tuple(x.flatten().tolist())] for x in probes.train.inputs}
    assert heldout <= set(data.val_rows)
    assert train <= set(data.train_rows)
    # The logged held-out loss is the model's loss on validation rows, at the last step.
    model.eval()
    with torch.no_grad():
        expected = F.cross_entropy(model(probes.heldout.inputs), probes.heldout.targets)
    assert monitor.history[-1]["test_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_rows_the_sampler_skips_are_never_read(tmp_path):
    broken = frozenset({3, 757, 1200})
    data = _SplitBySampler(broken)
    monitor = GeneralizationMonitor(probe_size=600, ablation=False, jacobian=False)
    trainer = make_trainer(tmp_path, callbacks=[monitor], max_epochs=1, limit_train_batches=2)
    trainer.fit(DigitsClassifier(width=8), datamodule=data)
    assert len(monitor.history) == 2
    assert not broken & set(data.dataset.reads)


def test_drawing_leaves_every_sampler_and_generator_of_training_as_it_was():
    dataset = TensorDataset(torch.arange(100.0)[:, None], torch.zeros(100, dtype=torch.long))
    loader_generator = torch.Generator().manual_seed(5)
    shuffled = DataLoader(dataset, batch_size=8, shuffle=True, generator=loader_generator)
    subset = DataLoader(
        dataset,
        batch_size=8,
        sampler=SubsetRandomSampler(range(0, 100, 2), generator=torch.Generator().manual_seed(6)),
    )
    global_state = torch.get_rng_state()
    for loader in (shuffled, subset):
        generator = loader.sampler.generator
        state = generator.get_state()
        before, twin = copy.deepcopy(loader.sampler), copy.deepcopy(loader.sampler)
        assert eligible_indices(loader) == sorted(set(iter(twin)))
        assert torch.equal(generator.get_state(), state), "the sampler's generator moved"
        assert list(iter(loader.sampler)) == list(iter(before)), "the shuffle order moved"
    assert torch.equal(torch.get_rng_state(), global_state)


def test_distributed_samplers_are_looked_through():
    dataset = TensorDataset(torch.arange(10.0)[:, None])
    rank1 = DataLoader(dataset, batch_size=2, sampler=DistributedSampler(dataset, 3, 1))
    assert eligible_indices(rank1) == list(range(10))


class _ReadOnce(IterableDataset):
    """A stream that can be read once (a socket, a queue): later iterators are empty."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.items = list(zip(x, y, strict=True))
        self.started = False

    def __iter__(self):
        if self.started:
            return iter(())
        self.started = True
        return iter(self.items)


class _Streamed(DigitsDataModule):
    def train_dataloader(self) -> DataLoader:
        x, y = self.train_set.tensors
        return DataLoader(_ReadOnce(x, y), batch_size=64)


class _Counting(DigitsClassifier):
    def __init__(self) -> None:
        super().__init__(width=8)
        self.seen = 0

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        self.seen += len(batch[1])
        return super().training_step(batch, batch_idx)


def _stream_fit(tmp_path, callbacks) -> _Counting:
    seed_everything(0, verbose=False)
    model = _Counting()
    make_trainer(tmp_path, callbacks=callbacks, max_epochs=1).fit(model, datamodule=_Streamed())
    return model


def test_a_read_once_stream_is_never_read_behind_trainings_back(tmp_path):
    monitor = OutputSensitivity(probe_size=100)
    watched, alone = _stream_fit(tmp_path, [monitor]), _stream_fit(tmp_path, [])
    assert watched.seen == alone.seen == 1258
    for a, b in zip(watched.parameters(), alone.parameters(), strict=True):
        assert torch.equal(a, b)
    # The train probe is the first 100 samples training received; evaluations start then.
    data = _Streamed()
    data.setup()
    assert torch.equal(monitor._probes.train.inputs, data.train_set.tensors[0][:100])
    assert [int(h["step"]) for h in monitor.history] == [1, 19]


def test_rereading_a_stream_is_opt_in_and_gives_step_zero(tmp_path):
    monitor = OutputSensitivity(probe_size=100, train_stream="reread")
    seed_everything(0, verbose=False)
    model = DigitsClassifier(width=8)
    data = DigitsDataModule()
    data.setup()
    x, y = data.train_set.tensors

    class Restarting(DigitsDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(_Restartable(x, y), batch_size=64)

    make_trainer(tmp_path, callbacks=[monitor], max_epochs=1).fit(model, datamodule=Restarting())
    assert [int(h["step"]) for h in monitor.history] == [0, 19]
    assert torch.equal(monitor._probes.train.inputs, x[:100])


class _Restartable(IterableDataset):
    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y, strict=True))


class _Bytes(DigitsClassifier):
    """A classifier on uint8 images that it converts itself, as torchvision transforms do."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float() / 255.0 * 8.0 - 2.0)


class _ByteDigits(DigitsDataModule):
    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        for name in ("train_set", "val_set"):
            x, y = getattr(self, name).tensors
            pixels = ((x + 2.0) / 8.0 * 255.0).clamp(0, 255).round().to(torch.uint8)
            setattr(self, name, TensorDataset(pixels, y))


def test_uint8_inputs_keep_their_dtype_and_their_loss(tmp_path, caplog):
    monitor = GeneralizationMonitor(probe_size=128, ablation=False)
    seed_everything(0, verbose=False)
    model = _Bytes(width=8)
    with caplog.at_level("INFO"):
        make_trainer(tmp_path, callbacks=[monitor], max_epochs=1).fit(
            model, datamodule=_ByteDigits()
        )
    probe = monitor._probes.heldout
    assert probe.inputs.dtype == torch.uint8
    model.eval()
    with torch.no_grad():
        expected = F.cross_entropy(model(probe.inputs), probe.targets)
    assert monitor.history[-1]["test_loss"] == pytest.approx(expected.item(), rel=1e-5)
    # The perturbation proxies act on the first layer after the model's own conversion.
    messages = " ".join(r.message for r in caplog.records)
    assert "skipping" not in messages
    assert "torch.uint8; output sensitivity perturbs the output of 'net.0'" in messages
    assert "torch.uint8; the Jacobian norm perturbs the output of 'net.0'" in messages
    assert math.isfinite(monitor.history[-1]["sensitivity"])
    assert math.isfinite(monitor.history[-1]["jacobian_norm"])


def test_transitions_on_integer_inputs_fail_at_setup_naming_the_switch(tmp_path):
    trainer = make_trainer(tmp_path, callbacks=[Transitions(probe_size=32)], max_epochs=1)
    with pytest.raises(ValueError, match=r"torch.uint8 .*cannot be perturbed.*transitions=False"):
        trainer.fit(_Bytes(width=8), datamodule=_ByteDigits())
    assert trainer.global_step == 0


def test_perturb_at_naming_no_module_fails_at_setup(tmp_path):
    callback = OutputSensitivity(probe_size=32, perturb_at="body")
    trainer = make_trainer(tmp_path, callbacks=[callback], max_epochs=1)
    with pytest.raises(ValueError, match=r"`perturb_at='body'` names no submodule"):
        trainer.fit(_Bytes(width=8), datamodule=_ByteDigits())
    assert trainer.global_step == 0


class _Tokens(DigitsClassifier):
    """A bag-of-tokens classifier on int64 ids: the 8x8 digit, quantized, as 64 tokens."""

    def __init__(self) -> None:
        super().__init__(width=8)
        self.net = nn.Sequential(nn.Embedding(17, 16), nn.Flatten(), nn.ReLU(), nn.Linear(1024, 10))


class _TokenDigits(DigitsDataModule):
    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        for name in ("train_set", "val_set"):
            x, y = getattr(self, name).tensors
            ids = ((x + 2.0) * 4.0).clamp(0, 16).round().long().flatten(1)
            setattr(self, name, TensorDataset(ids, y))


def test_token_ids_keep_their_dtype_and_normalize_by_the_output(tmp_path, caplog):
    monitor = NormalizedLoss(probe_size=64)
    model = _Tokens()
    with caplog.at_level("INFO"):
        make_trainer(tmp_path, callbacks=[monitor], max_epochs=1).fit(
            model, datamodule=_TokenDigits()
        )
    probe = monitor._probes.train
    assert probe.inputs.dtype == torch.int64
    assert any("'output' mode" in r.message and "Embedding" in r.message for r in caplog.records)
    # Appendix H by hand: the logits divided by the mean output norm on 8 reference inputs.
    model.eval()
    with torch.no_grad():
        rho = model(probe.inputs[:8]).norm(dim=1).mean()
        expected = F.cross_entropy(model(probe.inputs) / rho, probe.targets)
    assert monitor.history[-1]["normalized_train_loss"] == pytest.approx(expected.item(), rel=1e-4)


def test_token_ids_are_perturbed_at_the_embedding(tmp_path, caplog):
    sensitivity = OutputSensitivity(sigma=0.2, probe_size=64)
    jacobian = JacobianNorm(method="exact", output="logits", probe_size=64, prefix="jac/")
    model = _Tokens()
    with caplog.at_level("INFO"):
        make_trainer(tmp_path, callbacks=[sensitivity, jacobian], max_epochs=1).fit(
            model, datamodule=_TokenDigits()
        )
    assert any("perturbs the output of 'net.0'" in r.message for r in caplog.records)
    probe = sensitivity._probes.heldout
    model.eval()
    embed, rest = model.net[0], model.net[1:]
    # The Jacobian of everything after the embedding, at the embedding's output (exact).
    h = embed(probe.inputs).detach()
    norms = [jacrev(lambda hi: rest(hi.unsqueeze(0))[0])(hi).norm() for hi in h]
    expected_norm = torch.stack(norms).mean().item()
    assert jacobian.history[-1]["jacobian_norm"] == pytest.approx(expected_norm, rel=1e-4)
    # The sensitivity: noise of std sigma on h, with the rows' own streams (Context.draws).
    with torch.no_grad():
        rows = torch.arange(len(probe))
        first_draw = torch.zeros(len(probe), dtype=torch.long)
        noise = RowSeeds(rows).draw(rows, h.shape[1:], h.device, streams=first_draw)
        response = (rest(h + 0.2 * noise) - rest(h)).double().mean(1)
    final = sensitivity.history[-1]
    assert final["sensitivity"] == pytest.approx(response.var(unbiased=False).item(), rel=1e-4)
    # Eq. 9 with E[x^2] of the perturbed variable, the embedding's output.
    bias = softmax_mse(model(sensitivity._probes.train.inputs), sensitivity._probes.train.targets)
    expected = predicted_test_loss(
        torch.tensor(final["sensitivity"]), num_classes=10,
        input_second_moment=h.double().square().mean(), sigma=0.2, bias=bias,
    )  # fmt: skip
    assert final["predicted_test_loss_bias"] == pytest.approx(expected.item(), rel=1e-4)


class _OneShot(DigitsDataModule):
    """Loaders whose sampler is a generator: it yields its keys once, then nothing."""

    def __init__(self, val: bool = False) -> None:
        super().__init__()
        self.val = val

    def train_dataloader(self) -> DataLoader:
        order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(0))
        return DataLoader(self.train_set, batch_size=64, sampler=(int(i) for i in order))

    def val_dataloader(self) -> DataLoader:
        if not self.val:
            return super().val_dataloader()
        return DataLoader(self.val_set, batch_size=256, sampler=iter(range(len(self.val_set))))


def _one_shot_fit(tmp_path, callbacks):
    seed_everything(0, verbose=False)
    model = DigitsClassifier(width=8)
    trainer = make_trainer(tmp_path, callbacks=callbacks, max_epochs=2)
    trainer.fit(model, datamodule=_OneShot())
    return trainer, model


def test_a_one_shot_sampler_is_taken_from_the_batches_training_receives(tmp_path):
    monitor = OutputSensitivity(probe_size=100)
    watched, watched_model = _one_shot_fit(tmp_path, [monitor])
    alone, alone_model = _one_shot_fit(tmp_path, [])
    # The generator is used up by the first epoch, with and without gapwatch.
    assert watched.global_step == alone.global_step == 20
    for a, b in zip(watched_model.parameters(), alone_model.parameters(), strict=True):
        assert torch.equal(a, b)
    data = _OneShot()
    data.setup()
    order = torch.randperm(len(data.train_set), generator=torch.Generator().manual_seed(0))
    assert torch.equal(monitor._probes.train.inputs, data.train_set.tensors[0][order[:100]])


def test_a_one_shot_sampler_cannot_be_reread_and_the_error_says_so(tmp_path):
    monitor = OutputSensitivity(probe_size=100, train_stream="reread")
    with pytest.raises(ValueError, match="train_stream='batches'"):
        _one_shot_fit(tmp_path, [monitor])


def test_a_one_shot_validation_sampler_fails_at_setup_naming_the_fixes(tmp_path):
    trainer = make_trainer(tmp_path, callbacks=[OutputSensitivity(probe_size=100)])
    with pytest.raises(ValueError, match="heldout='none'"):
        trainer.fit(DigitsClassifier(width=8), datamodule=_OneShot(val=True))


class _InOrder(DigitsDataModule):
    """Digits trained in a fixed order (no shuffling), in batches of 32."""

    def __init__(self, shuffle: bool = False) -> None:
        super().__init__(batch_size=32)
        self.shuffle = shuffle

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        return DataLoader(self.train_set, 32, shuffle=self.shuffle, generator=generator)


def _trained_rows(tmp_path, data, **options) -> set[int]:
    """The train set's rows in the train probe of a fit under ``options``."""
    monitor = OutputSensitivity(probe_size=256)
    make_trainer(tmp_path, callbacks=[monitor], max_epochs=1, **options).fit(
        DigitsClassifier(width=8), datamodule=data
    )
    same = monitor._probes.train.inputs[:, None] == data.train_set.tensors[0]
    return {int(row) for row in same.flatten(2).all(2).nonzero()[:, 1]}


@pytest.mark.parametrize(
    ("options", "shuffle"),
    [({"limit_train_batches": 4}, False), ({"overfit_batches": 2}, True)],
    ids=["limit_train_batches", "overfit_batches"],
)
def test_the_train_probe_holds_only_rows_the_trainer_trains_on(tmp_path, options, shuffle):
    # A loader in a fixed order trains on the same first batches every epoch (overfit_batches
    # turns shuffling off itself); a probe from the whole set would score unseen rows.
    rows = _trained_rows(tmp_path, _InOrder(shuffle), **options)
    batches = options.get("limit_train_batches") or options["overfit_batches"]
    assert rows == set(range(32 * batches))


def test_a_shuffled_loader_under_limit_train_batches_keeps_the_whole_set(tmp_path):
    # Each epoch trains on other rows, so over the fit every row is training data.
    rows = _trained_rows(tmp_path, _InOrder(shuffle=True), limit_train_batches=4)
    assert len(rows) == 256
    assert max(rows) >= 4 * 32
