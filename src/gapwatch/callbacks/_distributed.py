"""Collectives of a data-parallel evaluation: summed statistics, gathered per-sample values."""

from __future__ import annotations

import math

import torch
from lightning.pytorch import Trainer
from torch import Tensor

from gapwatch.callbacks._proxy import Stats


def reduce_stats(trainer: Trainer, stats: list[Stats]) -> list[Stats]:
    """Sum every statistic over processes in one collective call."""
    if trainer.world_size == 1:
        return stats
    keys = [(i, key) for i, proxy_stats in enumerate(stats) for key in sorted(proxy_stats)]
    parts = [stats[i][key].double() for i, key in keys]
    flat = torch.cat([part.flatten() for part in parts]).to(trainer.strategy.root_device)
    total = trainer.strategy.reduce(flat, reduce_op="sum").cpu()
    summed: list[Stats] = [{} for _ in stats]
    for (i, key), part, value in zip(
        keys, parts, total.split([p.numel() for p in parts]), strict=True
    ):
        summed[i][key] = value.reshape(part.shape)
    return summed


def gather_shards(trainer: Trainer, values: Tensor) -> Tensor:
    """Per-sample ``values`` of every process's probe shard, back in the probe's order.

    Process ``r`` holds rows ``r::world_size`` of the probe (see ``Probe.shard``), so shard
    lengths differ by at most one; they are padded to the longest for the collective.
    """
    world, device = trainer.world_size, trainer.strategy.root_device
    length = torch.tensor([values.shape[0]], device=device)
    lengths = trainer.strategy.all_gather(length).flatten().tolist()
    padded = values.new_full((max(lengths), *values.shape[1:]), math.nan)
    padded[: values.shape[0]] = values
    shards = trainer.strategy.all_gather(padded.to(device)).cpu()
    merged = values.new_empty((sum(lengths), *values.shape[1:]))
    for rank, (shard, count) in enumerate(zip(shards, lengths, strict=True)):
        merged[rank::world] = shard[:count]
    return merged
