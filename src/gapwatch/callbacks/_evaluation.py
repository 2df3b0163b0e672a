"""One evaluation of a probe callback's proxies: the shared pass, statistics and metrics.

An evaluation

1. runs each probe set through the model once, in eval mode, without autocast and with
   the global random state saved and restored (``Outputs``); a proxy that needs more of
   that pass than its logits runs it itself (``Proxy.run_probe``);
2. asks every proxy for additive statistics on this process's shard of the probes;
3. sums the statistics across processes and lets each proxy finalize its metrics;
4. adds each proxy's running rank correlation with the held-out loss (``corr/<proxy>``).

The callback publishes the metrics (:mod:`gapwatch.callbacks._publishing`). Everything
here takes the callback's state as arguments and keeps none of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from lightning.pytorch import Trainer
from torch import Tensor, nn

from gapwatch._correlations import correlations
from gapwatch.callbacks._compiled import uncompiled
from gapwatch.callbacks._distributed import reduce_stats
from gapwatch.callbacks._probes import Probes, Role
from gapwatch.callbacks._proxy import Context, Outputs, Proxy, Stats
from gapwatch.callbacks._rng import isolated_rng
from gapwatch.functional._common import evaluation, forward_chunks

#: The shared pass: ``(model, probes, context) -> Outputs`` (the callback's ``_forward``).
Forward = Callable[[nn.Module, Probes, Context], Outputs]


def logged_step(trainer: Trainer) -> int:
    """The step Lightning logs the user's validation metrics at.

    During the epoch's last batch it is one behind ``global_step``, which counts the step
    just taken.
    """
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def context(
    trainer: Trainer,
    device: torch.device,
    *,
    seed: int,
    batch_size: int,
    num_outputs: int,
    step: int,
) -> Context:
    """What every proxy is told at this evaluation, with a fresh generator on ``device``."""
    return Context(
        generator=torch.Generator(device=device).manual_seed(seed),
        batch_size=batch_size,
        seed=seed,
        step=step,
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        num_outputs=num_outputs,
    )


def forward(
    model: nn.Module, probes: Probes, proxies: Sequence[Proxy], context: Context, batch_size: int
) -> Outputs:
    """The one clean pass over each probe set (held-out first, when there is one)."""
    heldout = None
    if probes.heldout is not None:
        heldout = logits(model, probes, "heldout", proxies, context, batch_size)
    return Outputs(heldout, logits(model, probes, "train", proxies, context, batch_size))


def logits(
    model: nn.Module,
    probes: Probes,
    role: Role,
    proxies: Sequence[Proxy],
    context: Context,
    batch_size: int,
) -> Tensor:
    """The logits of ``probes[role]``, from the first proxy that runs the pass, else chunked."""
    for proxy in proxies:
        found = proxy.run_probe(model, probes, role, context)
        if found is not None:
            return found
    inputs = probes[role].inputs
    chunks = forward_chunks(model, inputs, batch_size)
    # A process's shard of a probe smaller than the world is empty.
    empty = [torch.zeros((0, context.num_outputs), device=inputs.device)]
    return torch.cat([out for _, _, out in chunks] or empty)


def evaluate(
    trainer: Trainer,
    module: nn.Module,
    probes: Probes,
    proxies: Sequence[Proxy],
    context: Context,
    shared_pass: Forward,
    history: Sequence[dict[str, float]],
) -> tuple[dict[str, float], set[str]]:
    """The module's steps 1 to 4: the metrics to log after ``history``, and those not yet defined.

    See ``measure`` for the arguments and ``with_correlations`` for what is returned.
    """
    metrics = measure(trainer, module, probes, proxies, context, shared_pass)
    return with_correlations(metrics, proxies, history, context.step)


def measure(
    trainer: Trainer,
    module: nn.Module,
    probes: Probes,
    proxies: Sequence[Proxy],
    context: Context,
    shared_pass: Forward,
) -> dict[str, float]:
    """Every proxy's metrics: statistics on this shard, summed over processes, finalized.

    Args:
        trainer: Its strategy sums the statistics across processes.
        module: The module that maps inputs to logits (the callback's ``get_model``).
        probes: This process's shards of the probe sets.
        proxies: The proxies that apply to this fit, in order.
        context: This evaluation's context.
        shared_pass: Runs the one clean pass per probe (the callback's ``_forward``).
    """
    stats: list[Stats] = []
    with uncompiled(module) as model, isolated_rng(), evaluation(model), torch.no_grad():
        outputs = shared_pass(model, probes, context)
        for proxy in proxies:
            stats.append(proxy.statistics(model, probes, outputs, context))
    stats = reduce_stats(trainer, stats)
    metrics: dict[str, float] = {}
    for proxy, proxy_stats in zip(proxies, stats, strict=True):
        metrics |= proxy.finalize(proxy_stats)
    return metrics


def with_correlations(
    metrics: dict[str, float],
    proxies: Sequence[Proxy],
    history: Sequence[dict[str, float]],
    step: int,
) -> tuple[dict[str, float], set[str]]:
    """``metrics`` to log after ``history``, with the correlations; the names not yet defined.

    Returns:
        The metrics, and the names that need an earlier evaluation (left out at the first).
    """
    # What needs an earlier evaluation (prediction changes) is not logged at the first:
    # a NaN there would read as divergence, and EarlyStopping would stop on it.
    later = {n for p in proxies for n in p.undefined_at_first}
    if not history:
        metrics = {n: v for n, v in metrics.items() if n not in later}
    metrics |= correlations([*history, {"step": float(step), **metrics}])
    return metrics, later
