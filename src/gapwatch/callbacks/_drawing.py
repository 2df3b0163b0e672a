"""Drawing a probe set as the user's loader would yield it, without touching training's loader.

A probe must hold only samples the loader can yield: a ``SubsetRandomSampler`` that
splits one dataset into train and validation rows, or a sampler that skips unreadable
entries, decides which rows are fair game, not ``loader.dataset`` alone. The indices the
sampler yields are therefore read from a *copy* of it (its generators copied with their
state), so neither the shuffle order nor any random stream of training moves; the
samples are then read with ``dataset[i]`` and collated with the loader's ``collate_fn``,
so transforms, dtypes and batch structure are the user's.

Lightning's distributed samplers are looked through: every process draws the same probe
from the whole data set and evaluates its own shard of it.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    Sampler,
    SequentialSampler,
)
from torch.utils.data.dataloader import default_collate

from gapwatch.callbacks._probes import Probe, one_per_sample
from gapwatch.callbacks._rng import isolated_rng
from gapwatch.functional._inputs import Inputs, cat_inputs

# Random streams a sampler may own; deep-copied so the copy's draws leave them as they are.
_RANDOM_STATES = (torch.Generator, np.random.Generator, np.random.RandomState, random.Random)

SplitBatch = Callable[[Any], tuple[Inputs, Tensor | None]]


def is_stream(loader: DataLoader) -> bool:
    """Whether ``loader`` reads an ``IterableDataset``, which has no indices to draw from."""
    return isinstance(loader.dataset, IterableDataset) or not hasattr(loader.dataset, "__len__")


def one_shot(loader: DataLoader) -> bool:
    """Whether ``loader``'s keys come from a one-shot iterator (a generator as its sampler).

    Such a sampler has no state to copy: reading its keys would use them up before
    training (or validation) sees them, so its probe must come from the batches it yields.
    """
    if is_stream(loader):
        return False
    _, source = _index_source(loader)
    return isinstance(source, Iterator) and not isinstance(source, Sampler)


def eligible_indices(loader: DataLoader, max_batches: int | None = None) -> list[Any]:
    """The dataset keys ``loader`` yields in one epoch, each once, without moving any RNG.

    Args:
        loader: A map-style loader.
        max_batches: The batches an epoch takes from it (``limit_train_batches``,
            ``overfit_batches``). A loader in a fixed order then yields the keys of its
            first batches only, every epoch; a shuffled one yields other keys each epoch,
            so all of them count.

    Returns:
        The keys, sorted when they are integers (so that the set, not the shuffle order,
        decides the probe).
    """
    batched, source = _index_source(loader)
    with isolated_rng():
        keys: Iterable[Any] = _private_copy(source)
        if batched:
            keys = (key for batch in keys for key in batch)
        if max_batches is not None and loader.batch_size and _in_fixed_order(loader):
            keys = islice(keys, max_batches * loader.batch_size * _replicas(loader))
        unique = list(dict.fromkeys(keys))
    if all(isinstance(key, int) for key in unique):
        unique.sort()
    return unique


def draw_probe(
    loader: DataLoader,
    size: int,
    *,
    seed: int,
    split: SplitBatch,
    role: str,
    avoid: set[Any] | None = None,
    max_batches: int | None = None,
) -> tuple[Probe, set[Any]]:
    """Draw ``size`` samples (all if fewer) from what a map-style ``loader`` yields.

    Args:
        loader: Where the samples come from.
        size: How many samples to draw.
        seed: Seed of the private generator that picks them.
        split: Turns a collated batch into ``(inputs, targets)``.
        role: ``"train"`` or ``"held-out"``, for messages.
        avoid: Keys of the same dataset that another probe's loader yields; a held-out
            probe that shares rows with them is reported.
        max_batches: The batches an epoch takes from the loader (see
            :func:`eligible_indices`).

    Returns:
        The probe on the CPU, and the set of keys the loader yields.

    Raises:
        ValueError: If the loader yields nothing or its targets are not one per sample.
    """
    if loader.batch_size is None and loader.batch_sampler is None:
        raise ValueError(
            f"The {role} DataLoader has `batch_size=None` (its dataset yields whole batches); "
            "gapwatch draws single samples. Give the loader a batch size, or pass the probe "
            "data through a loader that has one (`heldout=` picks the held-out loader)."
        )
    keys = eligible_indices(loader, max_batches)
    if not keys:
        raise ValueError(f"The {role} data is empty; gapwatch needs samples to probe.")
    if size > len(keys):
        rank_zero_warn(
            f"`probe_size={size}` is larger than the {role} data ({len(keys)} samples); "
            f"gapwatch uses all {len(keys)}."
        )
    generator = torch.Generator().manual_seed(seed)
    picked = [keys[i] for i in torch.randperm(len(keys), generator=generator)[:size].tolist()]
    shared = set(keys) & avoid if avoid else set()
    if shared:
        rank_zero_warn(
            f"gapwatch: {len(shared)} of the {len(keys)} samples the {role} loader yields are "
            "also yielded by the train loader (the same dataset and indices): the held-out "
            "metrics are then partly measured on training data."
        )
    with isolated_rng():  # transforms (augmentation) may draw from the global streams
        probe = _collate(loader, [loader.dataset[key] for key in picked], split, role)
    return probe, set(keys)


def read_stream(loader: DataLoader, size: int, *, split: SplitBatch, role: str) -> Probe:
    """The first ``size`` samples of a fresh iterator over an ``IterableDataset``.

    Only for data sets that start again when iterated anew (files, a generator function),
    as Lightning's own validation loop assumes of a validation stream.
    """
    with isolated_rng():
        items = list(islice(iter(loader.dataset), size))
        if not items:
            raise ValueError(f"The {role} stream is empty; gapwatch needs samples to probe.")
        return _collate(loader, items, split, role)


class BatchCollector:
    """The train probe of a stream, taken from the first batches training receives.

    A stream that cannot be read twice must not be read behind training's back; the
    samples training has already seen serve as its train probe.

    Args:
        size: Samples to collect.
        split: Turns a batch into ``(inputs, targets)``.
    """

    def __init__(self, size: int, split: SplitBatch) -> None:
        self.size = size
        self.split = split
        self._inputs: list[Inputs] = []
        self._targets: list[Tensor] = []
        self._keys: tuple[str, ...] | None = None
        self._count = 0

    @property
    def count(self) -> int:
        """Samples collected so far."""
        return self._count

    @property
    def full(self) -> bool:
        """Whether ``size`` samples have been collected."""
        return self._count >= self.size

    def add(self, batch: Any) -> None:
        """Keep a detached copy of the rows of ``batch`` that the probe still needs."""
        if self.full:
            return
        inputs, targets = self.split(batch)
        take = min(self.size - self._count, inputs.shape[0])
        self._inputs.append(inputs[:take].detach().cpu().clone())
        if targets is not None:
            self._targets.append(targets[:take].detach().cpu().clone())
        self._keys = tuple(map(str, batch)) if isinstance(batch, Mapping) else None
        self._count += take

    def probe(self) -> Probe:
        """The collected probe."""
        inputs = cat_inputs(self._inputs)
        targets = torch.cat(self._targets) if len(self._targets) == len(self._inputs) else None
        if targets is not None:
            targets = one_per_sample(targets, len(inputs), "train")
        return Probe(_keep_dtype(inputs), targets, self._keys)


def _collate(loader: DataLoader, items: list[Any], split: SplitBatch, role: str) -> Probe:
    batch = (loader.collate_fn or default_collate)(items)
    inputs, targets = split(batch)
    keys = tuple(map(str, batch)) if isinstance(batch, Mapping) else None
    if targets is not None:
        targets = one_per_sample(targets.detach(), len(inputs), role)
    return Probe(_keep_dtype(inputs.detach()), targets, keys)


def _keep_dtype(inputs: Inputs) -> Inputs:
    """The inputs as the loader gave them; floating ones in float32, the proxies' dtype.

    Integer inputs (token ids, uint8 images a model converts itself) keep their dtype;
    keyword inputs keep every tensor's.
    """
    if not isinstance(inputs, Tensor):
        return inputs.clone()
    return inputs.float().clone() if inputs.is_floating_point() else inputs.clone()


def _index_source(loader: DataLoader) -> tuple[bool, Iterable[Any]]:
    """What yields the loader's dataset keys: ``(yields batches of keys, the iterable)``.

    A plain ``BatchSampler`` only groups its sampler's keys (dropping a last partial batch
    that another epoch's order would keep), so its sampler is read; a custom batch sampler
    is read as it is. Lightning's distributed samplers are looked through, so every
    process sees the keys of the whole data set.
    """
    batch_sampler = loader.batch_sampler
    if batch_sampler is not None and type(batch_sampler) is not BatchSampler:
        return True, batch_sampler
    sampler = loader.sampler if batch_sampler is None else batch_sampler.sampler
    if isinstance(sampler, DistributedSamplerWrapper):
        return False, sampler.dataset._sampler  # type: ignore[attr-defined]
    if isinstance(sampler, DistributedSampler):
        return False, range(len(sampler.dataset))  # type: ignore[arg-type]
    return False, sampler


def _in_fixed_order(loader: DataLoader) -> bool:
    """Whether every epoch of ``loader`` yields its keys in the same order."""
    batch_sampler = loader.batch_sampler
    if batch_sampler is not None and type(batch_sampler) is not BatchSampler:
        return False  # a custom batch sampler's order is its own
    sampler = loader.sampler
    if isinstance(sampler, DistributedSamplerWrapper):
        inner = sampler.dataset._sampler  # type: ignore[attr-defined]
        return not sampler.shuffle and isinstance(inner, SequentialSampler)
    if isinstance(sampler, DistributedSampler):
        return not sampler.shuffle
    return isinstance(sampler, SequentialSampler)


def _replicas(loader: DataLoader) -> int:
    """Processes that split the loader's keys (a distributed sampler's ``num_replicas``)."""
    sampler = loader.sampler
    return sampler.num_replicas if isinstance(sampler, DistributedSampler) else 1


def _private_copy(source: Any) -> Any:
    """A copy of a sampler whose random state is its own: iterating it moves nothing else.

    Shallow, so that a sampler holding its dataset does not copy it; generators and
    nested samplers are copied with their state.
    """
    if not isinstance(source, (Sampler, Iterator)) or isinstance(source, range):
        return source
    clone = copy.copy(source)
    for name, value in vars(clone).items():
        if isinstance(value, _RANDOM_STATES):
            setattr(clone, name, copy.deepcopy(value))
        elif isinstance(value, Sampler):
            setattr(clone, name, _private_copy(value))
    return clone
