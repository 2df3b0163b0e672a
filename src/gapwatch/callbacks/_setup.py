"""Setting a probe callback up for one fit: its probe sets, and the proxies that apply.

Runs once per fit, before the first evaluation, so that every bad configuration fails
here, naming the fix, and never in the middle of training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader

from gapwatch.callbacks._drawing import (
    BatchCollector,
    SplitBatch,
    draw_probe,
    eligible_indices,
    is_stream,
    one_shot,
    read_stream,
)
from gapwatch.callbacks._loaders import first_loader, test_loader, validation_loader
from gapwatch.callbacks._loss import IGNORE_INDEX
from gapwatch.callbacks._probes import Probe, Probes
from gapwatch.callbacks._proxy import NotApplicableError, Proxy
from gapwatch.callbacks._rng import isolated_rng
from gapwatch.functional._common import as_outputs, check_float32_model, evaluation
from gapwatch.functional._inputs import KeywordInputs, call_model, describe_output


def refuse_shared_prefix(trainer: Trainer, prefix: str, kind: type[Any]) -> None:
    """Refuse two gapwatch callbacks (instances of ``kind``) that log under one ``prefix``."""
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    twins = [c for c in callbacks if isinstance(c, kind) and c.prefix == prefix]
    if len(twins) > 1:
        raise ValueError(
            f"{len(twins)} gapwatch callbacks ({', '.join(type(c).__name__ for c in twins)}) "
            f"log under the same prefix {prefix!r}, so their test_loss, train_loss, ... "
            "would overwrite each other. Use one GeneralizationMonitor (its switches pick "
            "the proxies), or give each callback its own `prefix=`."
        )


def train_loader(trainer: Trainer) -> DataLoader:
    """The loader training iterates (the first, if several)."""
    return first_loader(trainer.train_dataloader, "train")


def draw_train(
    loader: DataLoader, size: int, seed: int, split: SplitBatch, max_batches: int | None = None
) -> Probe:
    """The train probe of a map-style loader (streams: see ``BatchCollector``).

    ``max_batches``: the batches an epoch takes (``trainer.num_training_batches``), so
    that a loader in a fixed order under ``limit_train_batches`` or ``overfit_batches``
    gives a probe of the rows training sees.
    """
    probe, _ = draw_probe(
        loader, size, seed=seed, split=split, role="train", max_batches=max_batches
    )
    return probe


def train_probe(
    trainer: Trainer, size: int, seed: int, split: SplitBatch, stream: str
) -> Probe | BatchCollector:
    """The train probe, or for ``stream="batches"`` of a stream the collector that takes it.

    Args:
        trainer: Its train loader is drawn from (map-style) or read (a stream).
        size: The callback's ``probe_size``.
        seed: The callback's ``seed``.
        split: The callback's ``split_batch``.
        stream: The callback's ``train_stream``.
    """
    loader = train_loader(trainer)
    if one_shot(loader):
        if stream == "reread":
            raise ValueError(
                "The train loader's sampler is a one-shot iterator (a generator, say): "
                "reading it again for the train probe would use up the keys training "
                "needs. Use `train_stream='batches'` (the default: the probe is the first "
                "samples training receives), or give the DataLoader a Sampler."
            )
    elif not is_stream(loader):
        batches = trainer.num_training_batches
        return draw_train(
            loader, size, seed, split, int(batches) if batches < len(loader) else None
        )
    elif stream == "reread":
        return read_stream(loader, size, split=split, role="train")
    if trainer.world_size > 1:
        raise ValueError(
            "The train data is a stream (an IterableDataset, or a loader whose sampler is "
            "a one-shot iterator) and `train_stream='batches'` takes "
            "the train probe from the batches training receives, which differ between "
            "processes. Under data parallelism use `train_stream='reread'` (for a "
            "stream that starts again when iterated anew)."
        )
    collector = BatchCollector(size, split)
    rank_zero_info(
        "gapwatch: the train data is a stream; its train probe is the first "
        f"{size} samples training receives, and evaluations start then."
    )
    return collector


def whole_probes(
    trainer: Trainer,
    pl_module: LightningModule,
    train: Probe,
    heldout: str,
    size: int,
    seed: int,
    split: SplitBatch,
) -> Probes:
    """The held-out probe drawn beside ``train``; both without the ignored rows, unsharded."""
    drawn = draw_heldout(trainer, pl_module, heldout, size, seed, split)
    return Probes(
        heldout=None if drawn is None else without_ignored(drawn),
        train=without_ignored(train),
    )


def draw_heldout(
    trainer: Trainer,
    pl_module: LightningModule,
    heldout: str,
    size: int,
    seed: int,
    split: SplitBatch,
) -> Probe | None:
    """The held-out probe from the validation or test loader; None without one (warned)."""
    loader = None
    if heldout == "test":
        loader = test_loader(trainer, pl_module)
    elif heldout == "val":
        loader = validation_loader(trainer)
    if loader is None:
        rank_zero_warn(
            "gapwatch found no held-out data: held-out metrics (test_loss, test_acc, gap, "
            "normalized_test_loss) are skipped and label-free proxies use the train probe."
        )
        return None
    if one_shot(loader):
        raise ValueError(
            f"The {'test' if heldout == 'test' else 'validation'} loader's sampler is a "
            "one-shot iterator (a generator, say): reading its keys for the held-out probe "
            "would use them up before Lightning's loop sees them. Give the DataLoader a "
            "Sampler or a list of indices, or pass `heldout='none'`."
        )
    if is_stream(loader):
        # Lightning's own validation loop reads a validation stream anew every time.
        return read_stream(loader, size, split=split, role="held-out")
    avoid = None
    train = trainer.train_dataloader
    if (
        isinstance(train, DataLoader)
        and not (is_stream(train) or one_shot(train))
        and train.dataset is loader.dataset
    ):
        avoid = set(eligible_indices(train))
    probe, _ = draw_probe(loader, size, seed=seed, split=split, role="held-out", avoid=avoid)
    return probe


def set_up_proxies(
    proxies: Sequence[Proxy],
    model: nn.Module,
    probes: Probes,
    *,
    skip_inapplicable: bool,
) -> tuple[list[Proxy], int]:
    """Check the model, set every proxy up on the whole probes; the proxies that apply.

    Args:
        proxies: The callback's proxies, in order.
        model: The module that maps inputs to logits.
        probes: The whole (unsharded) probe sets, on the CPU.
        skip_inapplicable: Skip, with one info line, a proxy that does not apply to this
            model or data (``GeneralizationMonitor``); otherwise its error stops the fit.

    Returns:
        The proxies set up, in order, and the model's number of outputs K.
    """
    check_float32_model(model)
    with isolated_rng():
        num_outputs = _num_outputs(model, probes.train)
        active = []
        for proxy in proxies:
            try:
                proxy.setup(model, probes, num_outputs)
            except NotApplicableError as reason:
                if not skip_inapplicable:
                    raise
                name = type(proxy).__name__.removesuffix("Proxy")
                why = str(reason).split(", but ")[0].rstrip(".")
                rank_zero_info(f"gapwatch: skipping {name}: {why}.")
                continue
            active.append(proxy)
    return active, num_outputs


def without_ignored(probe: Probe) -> Probe:
    """``probe`` without the rows labelled ``-100``, which ``F.cross_entropy`` skips."""
    targets = probe.targets
    if targets is None or targets.is_floating_point():
        return probe
    keep = targets != IGNORE_INDEX
    if bool(keep.all()):
        return probe
    rank_zero_info(
        f"gapwatch: {int((~keep).sum())} of {len(probe)} probe samples carry the label "
        f"{IGNORE_INDEX} and are left out, as F.cross_entropy leaves them out."
    )
    return Probe(probe.inputs[keep], targets[keep], probe.batch_keys)


def shard(probes: Probes, trainer: Trainer, device: torch.device) -> Probes:
    """This process's rows of each probe, on ``device``."""
    rank, world = trainer.global_rank, trainer.world_size
    heldout = probes.heldout
    return Probes(
        heldout=None if heldout is None else heldout.shard(rank, world).to(device),
        train=probes.train.shard(rank, world).to(device),
    )


def _num_outputs(model: nn.Module, probe: Probe) -> int:
    """K, from one pass over two probe inputs; a failing call is reported with the fix.

    Says once which part of the output is read as the logits, unless it is a tensor.
    """
    device = next(iter(model.parameters()), probe.inputs).device
    inputs = probe.inputs[:2].to(device)
    with evaluation(model), torch.no_grad():
        outputs = _call(model, inputs)
    read = describe_output(outputs)
    if read is not None:
        rank_zero_info(f"gapwatch: {read} as the logits.")
    return as_outputs(outputs).shape[1]


def _call(model: Callable[..., Any], inputs: Any) -> Any:
    try:
        return call_model(model, inputs)  # type: ignore[arg-type]
    except TypeError as error:
        if "positional argument" not in str(error) and "argument" not in str(error):
            raise
        if isinstance(inputs, KeywordInputs):
            how = f"with the keyword arguments {list(inputs)} (the batch's keys but the targets)"
        else:
            how = "with one argument, the inputs `split_batch` returns,"
        raise TypeError(
            f"gapwatch calls the model {how} and the call failed: {error}. Batches that "
            "are mappings go to `model(**inputs)` when `input_key` is not among their keys: "
            "set `input_key=`/`target_key=` to match the batch, override the callback's "
            "`get_model` to return a module that takes the inputs alone, or override "
            "`split_batch` to return what the model takes."
        ) from error
