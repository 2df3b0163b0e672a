"""The probe callback: probe sets, scheduling, isolation and logging for every proxy.

Each gapwatch callback is this class with a list of proxies; a single-proxy callback is
the suite with one member. An evaluation:

1. runs each probe set through the model once, in eval mode, without autocast and with
   the global random state saved and restored (``Outputs``); a proxy that needs more of
   that pass than its logits runs it itself (``Proxy.run_probe``);
2. asks every proxy for additive statistics on this process's shard of the probes;
3. sums the statistics across processes and lets each proxy finalize its metrics;
4. adds each proxy's running rank correlation with the held-out loss (``corr/<proxy>``);
5. sends the metrics to every logger at the step Lightning gives the user's own
   validation metrics, and into ``trainer.callback_metrics`` so ``EarlyStopping`` and
   ``ModelCheckpoint`` can monitor them;
6. with a ``TensorBoardLogger``, draws figures and histograms into its run
   (:mod:`gapwatch.tensorboard`); at fit end it adds an hparams entry there, and a short
   table of the final proxies and their correlations is printed.

Evaluations run once before the first optimizer step (step 0) and on the last training
batch of every ``every_n_epochs``-th epoch: that is after the epoch's final optimizer step
but before validation and before any ``on_train_epoch_end``, so EarlyStopping finds the
metric in both of its check modes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn
from torch.utils.data import DataLoader

from gapwatch.callbacks._probes import Probe, Probes, Role, draw_probe, split_batch
from gapwatch.callbacks._proxy import Context, LossProxy, Outputs, Proxy, Stats
from gapwatch.functional._common import (
    DEFAULT_BATCH_SIZE,
    as_outputs,
    check_choice,
    check_float32_model,
    check_positive,
    evaluation,
    forward_chunks,
)
from gapwatch.tensorboard import Visuals, correlations, summary_table, tensorboard_logger

HeldOut = Literal["val", "test", "none"]


class ProbeCallback(Callback):
    """Evaluate a list of proxies on fixed probe sets while a model trains.

    Args:
        proxies: The measurements to run; held-out and train loss and accuracy are
            always logged beside them.
        every_n_epochs: Evaluate at the end of every n-th training epoch.
        every_n_train_steps: Also evaluate every n optimizer steps (for short runs).
        probe_size: Samples drawn once from each dataset (held-out and train).
        batch_size: Rows per forward pass inside a proxy; bounds the extra memory. The
            Jacobian norm keeps one chunk's graph, about what a training step on a batch
            this size holds. Larger chunks are not faster on the CPU: glibc's malloc maps
            tensors over 32 MiB fresh from the kernel at every allocation, which made
            512-row chunks of a CIFAR ResNet twice as slow as 128-row ones.
        prefix: Prepended to every logged name.
        heldout: Where the held-out probe comes from: the validation dataloader, the
            test dataloader, or nowhere (held-out metrics are then skipped).
        input_key: Key of the inputs when batches are mappings.
        target_key: Key of the targets when batches are mappings.
        model_attr: Attribute path of the submodule that maps inputs to logits
            (e.g. ``"net"``); by default the LightningModule itself.
        seed: Seeds the probe draw and every random draw of the proxies. The same seed
            is reused at each evaluation, so curves move with the model, not the noise.
        figures_every_n_evaluations: With a ``TensorBoardLogger``, draw the figures at
            every n-th evaluation (each costs some tens of milliseconds); 0 draws none.
    """

    def __init__(
        self,
        proxies: Sequence[Proxy],
        *,
        every_n_epochs: int = 1,
        every_n_train_steps: int | None = None,
        probe_size: int = 512,
        batch_size: int = DEFAULT_BATCH_SIZE,
        prefix: str = "gapwatch/",
        heldout: HeldOut = "val",
        input_key: str = "x",
        target_key: str = "y",
        model_attr: str | None = None,
        seed: int = 0,
        figures_every_n_evaluations: int = 1,
    ) -> None:
        super().__init__()
        check_positive("every_n_epochs", every_n_epochs, integer=True)
        if every_n_train_steps is not None:
            check_positive("every_n_train_steps", every_n_train_steps, integer=True)
        check_positive("probe_size", probe_size, integer=True)
        check_positive("batch_size", batch_size, integer=True)
        if isinstance(figures_every_n_evaluations, bool) or figures_every_n_evaluations < 0:
            raise ValueError(
                "`figures_every_n_evaluations` must be a non-negative integer (0: no figures), "
                f"got {figures_every_n_evaluations!r}."
            )
        check_choice("heldout", heldout, ("val", "test", "none"))
        if not isinstance(prefix, str):
            raise TypeError(f"`prefix` must be a string, got {type(prefix).__name__}.")
        self.proxies: list[Proxy] = [LossProxy(), *proxies]
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self.probe_size = probe_size
        self.batch_size = batch_size
        self.prefix = prefix
        self.heldout = heldout
        self.input_key = input_key
        self.target_key = target_key
        self.model_attr = model_attr
        self.seed = seed
        self.figures_every_n_evaluations = figures_every_n_evaluations
        self.last_step: int | None = None
        self.history: list[dict[str, float]] = []
        self._probes: Probes | None = None
        self._done_at: int | None = None  # global_step of the latest evaluation
        self._visuals: Visuals | None = None
        self._gathers_values = False  # per-sample values go to rank 0 for its histograms
        self._warned_nonfinite = False

    @property
    def state_key(self) -> str:
        """Distinguishes several gapwatch callbacks in one checkpoint."""
        return self._generate_state_key(
            prefix=self.prefix, proxies=[type(p).__name__ for p in self.proxies]
        )

    # -- what users may override -----------------------------------------------------

    def split_batch(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        """Split one collated batch into ``(inputs, targets)``; override for custom batches."""
        return split_batch(batch, self.input_key, self.target_key)

    def get_model(self, pl_module: LightningModule) -> nn.Module:
        """The module that maps a batch of inputs to logits; override if ``model_attr`` won't do."""
        if self.model_attr is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.model_attr.replace("/", "."))
        except AttributeError as error:
            raise AttributeError(
                f"`model_attr={self.model_attr!r}` names no submodule of "
                f"{type(pl_module).__name__}: {error}"
            ) from None

    # -- Lightning hooks ---------------------------------------------------------------

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Find the TensorBoard run for the figures, if any (global rank zero only)."""
        self._visuals = Visuals.of(trainer, self.prefix, self.figures_every_n_evaluations)
        # Every process takes part in gathering what rank 0 draws.
        self._gathers_values = trainer.world_size > 1 and tensorboard_logger(trainer) is not None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Draw the probes, check every proxy against them, and evaluate at step 0."""
        if self._probes is None:
            self._probes = self._draw_probes(trainer, pl_module)
        if self.last_step is None and self._step(trainer) == 0:
            self._evaluate(trainer, pl_module)

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Evaluate on the epoch's last batch (every n epochs) or every n steps."""
        last_batch = trainer.is_last_batch or batch_idx + 1 >= trainer.num_training_batches
        epoch_due = last_batch and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        n_steps = self.every_n_train_steps
        steps_due = n_steps is not None and trainer.global_step % n_steps == 0
        if epoch_due or steps_due:
            self._evaluate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Catch an epoch whose last batch went unnoticed (an iterable loader, say)."""
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._evaluate(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the hparams entry and print the final proxies with their correlations."""
        if self._visuals is not None:
            self._visuals.finish(self._settings(), self.history)
            self._visuals = None
        if self.history:
            rank_zero_info(summary_table(self.history))

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue the curves without a second step 0."""
        return {"last_step": self.last_step, "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict``."""
        self.last_step = state_dict["last_step"]
        self.history = list(state_dict["history"])

    # -- internals ---------------------------------------------------------------------

    @staticmethod
    def _step(trainer: Trainer) -> int:
        # The step Lightning logs the user's validation metrics at; during the epoch's last
        # batch it is one behind `global_step`, which counts the step just taken.
        return trainer.fit_loop.epoch_loop._batches_that_stepped

    def _draw_probes(self, trainer: Trainer, pl_module: LightningModule) -> Probes:
        train_loader = _first_loader(trainer.train_dataloader, "train")
        train = self._draw(train_loader, "train")
        heldout_loader = self._heldout_loader(trainer, pl_module)
        heldout = None if heldout_loader is None else self._draw(heldout_loader, "held-out")
        if heldout is None:
            rank_zero_warn(
                "gapwatch found no held-out data: held-out metrics (test_loss, test_acc, gap, "
                "normalized_test_loss) are skipped and label-free proxies use the train probe."
            )
        model = self.get_model(pl_module)
        check_float32_model(model)
        full = Probes(heldout=heldout, train=train)
        with isolate_rng():
            num_outputs = self._num_outputs(model, train)
            for proxy in self.proxies:
                proxy.setup(model, full, num_outputs)
        device = pl_module.device
        rank, world = trainer.global_rank, trainer.world_size
        return Probes(
            heldout=None if heldout is None else heldout.shard(rank, world).to(device),
            train=train.shard(rank, world).to(device),
        )

    def _draw(self, loader: DataLoader, role: str) -> Probe:
        return draw_probe(
            loader, self.probe_size, seed=self.seed, split=self.split_batch, role=role
        )

    def _heldout_loader(self, trainer: Trainer, pl_module: LightningModule) -> DataLoader | None:
        if self.heldout == "none":
            return None
        if self.heldout == "test":
            # Lightning sets `datamodule` on the trainer at run time but does not declare it.
            datamodule = trainer.datamodule  # type: ignore[attr-defined]
            source = datamodule if datamodule is not None else pl_module
            try:
                return _first_loader(source.test_dataloader(), "test")
            except (AttributeError, NotImplementedError, MisconfigurationException):
                # Lightning's own `test_dataloader` stub raises MisconfigurationException.
                raise ValueError(
                    "`heldout='test'` needs a `test_dataloader()` on the datamodule or the "
                    "LightningModule; define one or use `heldout='val'`."
                ) from None
        if trainer.val_dataloaders is None and trainer.limit_val_batches != 0:
            # Without a sanity check the validation loaders are only built at the first
            # validation; build them now (Lightning reuses them later).
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
        loaders = trainer.val_dataloaders
        return None if loaders is None else _first_loader(loaders, "validation")

    def _num_outputs(self, model: nn.Module, probe: Probe) -> int:
        device = next(iter(model.parameters()), probe.inputs).device
        with evaluation(model), torch.no_grad():
            logits = as_outputs(model(probe.inputs[:2].to(device)))
        return logits.shape[1]

    def _forward(self, model: nn.Module, probes: Probes, context: Context) -> Outputs:
        heldout = None
        if probes.heldout is not None:
            heldout = self._logits(model, probes, "heldout", context)
        return Outputs(heldout, self._logits(model, probes, "train", context))

    def _logits(self, model: nn.Module, probes: Probes, role: Role, context: Context) -> Tensor:
        for proxy in self.proxies:
            logits = proxy.run_probe(model, probes, role, context)
            if logits is not None:
                return logits
        chunks = forward_chunks(model, probes[role].inputs, self.batch_size)
        return torch.cat([out for _, _, out in chunks])

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._probes is None or self._done_at == trainer.global_step:
            return
        self._done_at = trainer.global_step
        step = self._step(trainer)
        model = self.get_model(pl_module)
        context = Context(
            generator=torch.Generator(device=pl_module.device).manual_seed(self.seed),
            batch_size=self.batch_size,
            seed=self.seed,
            step=step,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
        )
        stats: list[Stats] = []
        with isolate_rng(), evaluation(model), torch.no_grad():
            outputs = self._forward(model, self._probes, context)
            for proxy in self.proxies:
                stats.append(proxy.statistics(model, self._probes, outputs, context))
        stats = _reduce(trainer, stats)
        metrics: dict[str, float] = {}
        for proxy, proxy_stats in zip(self.proxies, stats, strict=True):
            metrics |= proxy.finalize(proxy_stats)
        metrics |= correlations([*self.history, {"step": float(step), **metrics}])
        self._publish(trainer, metrics, step)
        if self._visuals is not None or self._gathers_values:
            artifacts = self._artifacts(trainer)
            if self._visuals is not None:
                self._visuals.update(self.history, artifacts, step)

    def _artifacts(self, trainer: Trainer) -> dict[str, object]:
        """Every proxy's artifacts, with per-sample values from every process.

        A histogram of this process's shard alone would show a subsample of the probe.
        The ablation curves are per class and stay this process's classes.
        """
        artifacts = {k: v for p in self.proxies for k, v in p.artifacts().items()}
        if trainer.world_size > 1:
            for name in sorted(artifacts):  # the same order on every process
                value = artifacts[name]
                if isinstance(value, Tensor):
                    artifacts[name] = _gather_shards(trainer, value)
        return artifacts

    def _settings(self) -> dict[str, Any]:
        """The primitive settings of this callback and its proxies, for the hparams entry."""
        names = ("every_n_epochs", "every_n_train_steps", "probe_size", "batch_size",
                 "heldout", "model_attr", "seed", "figures_every_n_evaluations")  # fmt: skip
        settings = {name: getattr(self, name) for name in names}
        for proxy in self.proxies:
            owner = type(proxy).__name__.removesuffix("Proxy").lower()
            settings |= {
                f"{owner}.{name}": value
                for name, value in vars(proxy).items()
                if not name.startswith("_") and isinstance(value, (bool, int, float, str))
            }
        return {self.prefix + name: value for name, value in settings.items()}

    def _publish(self, trainer: Trainer, metrics: dict[str, float], step: int) -> None:
        named = {self.prefix + name: value for name, value in metrics.items()}
        bad = sorted(name for name, value in named.items() if not math.isfinite(value))
        if bad and not self._warned_nonfinite:
            self._warned_nonfinite = True
            rank_zero_warn(f"gapwatch: non-finite values at step {step} for {bad}; logged as is.")
        for logger in trainer.loggers:
            logger.log_metrics(named, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in named.items()})
        self.history.append({"step": float(step), **metrics})
        self.last_step = step
        if len(self.history) == 1:
            rank_zero_info(f"gapwatch: evaluating {sorted(named)} at step {step}.")


def _first_loader(loaders: Any, role: str) -> DataLoader:
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


def _reduce(trainer: Trainer, stats: list[Stats]) -> list[Stats]:
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


def _gather_shards(trainer: Trainer, values: Tensor) -> Tensor:
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
