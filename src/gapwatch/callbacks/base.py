"""The probe callback: probe sets, scheduling, isolation and logging for every proxy.

Each gapwatch callback is this class with a list of proxies; a single-proxy callback is
the suite with one member. An evaluation (:mod:`gapwatch.callbacks._evaluation`) runs
each probe set through the model once, isolated from training, and turns every proxy's
statistics, summed across processes, into metrics and their running rank correlation
with the held-out loss. The callback sends the metrics to every logger at the step
Lightning gives the user's own validation metrics, and into ``trainer.callback_metrics``
so ``EarlyStopping`` and ``ModelCheckpoint`` can monitor them. With a ``TensorBoardLogger``
it draws figures and histograms into its run (:mod:`gapwatch.tensorboard`) and, at fit
end, an hparams entry; at fit end it also prints a table of the final proxies and their
correlations.

Evaluations run once before the first optimizer step (step 0), on the last training
batch of every ``every_n_epochs``-th epoch (after the epoch's final optimizer step, before
validation and before any ``on_train_epoch_end``), at the early logged steps 1, 2, 4, ...
with ``log_steps``, and wherever a callback that monitors a gapwatch metric reads it
(:mod:`gapwatch.callbacks._schedule`), so that it never sees a stale value. Probe sets
are set up in :mod:`gapwatch.callbacks._setup`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from gapwatch._correlations import summary_table
from gapwatch.callbacks import _evaluation, _options, _publishing, _setup
from gapwatch.callbacks._compiled import uncompiled
from gapwatch.callbacks._drawing import BatchCollector
from gapwatch.callbacks._loss import LossProxy
from gapwatch.callbacks._probes import Probe, Probes, split_batch
from gapwatch.callbacks._proxy import Context, Outputs, Proxy
from gapwatch.callbacks._readers import (
    Reader,
    refuse_missing,
    refuse_unfillable,
    refuse_without_heldout,
)
from gapwatch.callbacks._schedule import Checks
from gapwatch.functional._common import DEFAULT_BATCH_SIZE
from gapwatch.functional._inputs import Inputs
from gapwatch.tensorboard import Visuals, placeholder_warning, tensorboard_logger

#: The callback's own settings in the hparams entry (beside each proxy's).
SETTINGS = ("every_n_epochs", "every_n_train_steps", "log_steps", "probe_size", "batch_size",
            "heldout", "model_attr", "seed", "figures_every_n_evaluations",
            "train_stream")  # fmt: skip

HeldOut = Literal["val", "test", "none"]
TrainStream = Literal["batches", "reread"]


class ProbeCallback(Callback):
    """Evaluate a list of proxies on fixed probe sets while a model trains.

    Args:
        proxies: The measurements to run; held-out and train loss and accuracy are
            always logged beside them.
        every_n_epochs: Evaluate at the end of every n-th training epoch.
        every_n_train_steps: Also evaluate every n optimizer steps (for short runs).
        log_steps: Also evaluate at the logged steps ``1, 2, 4, ..., 2**(log_steps - 1)``,
            to see the early, bias-dominated phase that a long first epoch hides (with
            ``log_steps=8``: steps 1 to 128). Each point costs one evaluation, so at most
            ``log_steps`` more per fit; 0 (the default) adds none.
        probe_size: Samples drawn once from each dataset (held-out and train).
        batch_size: Rows per forward pass inside a proxy; bounds the extra memory. The
            Jacobian norm keeps one chunk's graph, about what a training step on a batch
            this size holds. Larger chunks are not faster on the CPU (glibc's malloc; see
            ``gapwatch.functional.DEFAULT_BATCH_SIZE``).
        prefix: Prepended to every logged name.
        heldout: Where the held-out probe comes from: the validation dataloader, the
            test dataloader, or nowhere (held-out metrics are then skipped).
        input_key: Key of the inputs when batches are mappings.
        target_key: Key of the targets when batches are mappings.
        model_attr: Attribute path of the submodule that maps inputs to logits
            (e.g. ``"net"``); by default the LightningModule itself.
        seed: Seeds the probe draw and every random draw of the proxies. The same seed
            is reused at each evaluation, so curves move with the model, not the noise.
        train_stream: How the train probe is taken when the train data is an
            ``IterableDataset``, which has no indices to draw from: ``"batches"`` keeps the
            first ``probe_size`` samples training receives (nothing is read twice; the
            first evaluation comes once they are in, so there is no step 0), ``"reread"``
            reads the data set again from its start (only for streams that start again
            when iterated anew, such as files; gives step 0). A monitor that would check
            before the first value raises there, naming the fixes.
        figures_every_n_evaluations: With a ``TensorBoardLogger``, draw the figures at
            every n-th evaluation and at the fit's last; 0 draws none. Each figure costs
            some tens of milliseconds, and an evaluation of the whole suite draws one per
            proxy: about 1.5 s on the CPU, more than the digits demo's proxies cost (its
            fit took 48 s drawing at every evaluation, 18 s at the default).
    """

    def __init__(
        self,
        proxies: Sequence[Proxy],
        *,
        every_n_epochs: int = 1,
        every_n_train_steps: int | None = None,
        log_steps: int = 0,
        probe_size: int = 512,
        batch_size: int = DEFAULT_BATCH_SIZE,
        prefix: str = "gapwatch/",
        heldout: HeldOut = "val",
        input_key: str = "x",
        target_key: str = "y",
        model_attr: str | None = None,
        seed: int = 0,
        figures_every_n_evaluations: int = 10,
        train_stream: TrainStream = "batches",
    ) -> None:
        super().__init__()
        _options.check_options(
            every_n_epochs=every_n_epochs, every_n_train_steps=every_n_train_steps,
            log_steps=log_steps, probe_size=probe_size, batch_size=batch_size,
            figures_every_n_evaluations=figures_every_n_evaluations, heldout=heldout,
            train_stream=train_stream, seed=seed, prefix=prefix,
        )  # fmt: skip
        self.proxies: list[Proxy] = [LossProxy(), *proxies]
        self._active: list[Proxy] = []  # the proxies that apply to this fit's model and data
        # GeneralizationMonitor skips a proxy that does not apply; a single proxy refuses.
        self._skips_inapplicable = False
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self.log_steps = log_steps
        self.probe_size = probe_size
        self.batch_size = batch_size
        self.prefix = prefix
        self.heldout = heldout
        self.input_key = input_key
        self.target_key = target_key
        self.model_attr = model_attr
        self.seed = seed
        self.figures_every_n_evaluations = figures_every_n_evaluations
        self.train_stream = train_stream
        self.last_step: int | None = None
        self.history: list[dict[str, float]] = []
        self._probes: Probes | None = None
        self._done_at: int | None = None  # global_step of the latest evaluation
        self._visuals: Visuals | None = None
        self._gathers_values = False  # per-sample values go to rank 0 for its histograms
        self._warned_nonfinite = False
        self._checks = Checks()
        self._num_outputs = 1
        self._clock = _publishing.Stopwatch()  # what monitoring costs
        self._collector: BatchCollector | None = None  # the train probe of a stream
        self._streamed = False  # the train probe came from batches: no step 0

    @property
    def state_key(self) -> str:
        """Distinguishes several gapwatch callbacks in one checkpoint."""
        return self._generate_state_key(
            prefix=self.prefix, proxies=[type(p).__name__ for p in self.proxies]
        )

    # -- what users may override -----------------------------------------------------

    def split_batch(self, batch: Any) -> tuple[Inputs, Tensor | None]:
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

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Start every fit fresh: a reused callback must not carry the last fit's curves.

        Lightning restores a checkpoint's state (``load_state_dict``) after this hook, so a
        resumed fit still continues its curves.
        """
        _setup.refuse_shared_prefix(trainer, self.prefix, ProbeCallback)
        if stage == "fit":
            self._clock = _publishing.Stopwatch()
            self.last_step, self.history = None, []
            self._probes, self._done_at, self._warned_nonfinite = None, None, False
            self._collector, self._streamed = None, False
            for proxy in self.proxies:
                proxy.reset()

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Find the TensorBoard run for the figures, and where monitors read gapwatch's values."""
        self._visuals = Visuals.of(trainer, self.prefix, self.figures_every_n_evaluations)
        if self._visuals is not None:
            warning = placeholder_warning(self._visuals.logger)
            if warning is not None:
                rank_zero_warn(warning)
        # Every process takes part in gathering what rank 0 draws.
        self._gathers_values = trainer.world_size > 1 and tensorboard_logger(trainer) is not None
        self._checks = Checks.of(trainer, self.prefix)
        if self._checks.readers:
            names = ", ".join(dict.fromkeys(reader.name for reader in self._checks.readers))
            rank_zero_info(
                f"gapwatch also evaluates wherever {names} reads its "
                "value, so that a check never sees the previous one's value again."
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Draw the probes, check every proxy against them, and evaluate at step 0."""
        if self._probes is not None or self._collector is not None:
            return
        train = _setup.train_probe(
            trainer, self.probe_size, self.seed, self.split_batch, self.train_stream
        )
        if isinstance(train, BatchCollector):
            self._collector, self._streamed = train, True
            refuse_unfillable(
                trainer, self._checks.readers, probe_size=self.probe_size,
                batch_size=_setup.train_loader(trainer).batch_size,
            )  # fmt: skip
            return
        self._prepare(trainer, pl_module, train)
        if self.last_step is None and _evaluation.logged_step(trainer) == 0:
            self._evaluate(trainer, pl_module)

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Evaluate at the end of every n-th epoch (or for a monitor), every n steps, early."""
        if self._collector is not None:
            self._collector.add(batch)
            if self._collector.full:
                train, self._collector = self._collector.probe(), None
                self._prepare(trainer, pl_module, train)
                self._evaluate(trainer, pl_module)
        elif self._checks.after_batch(
            trainer, batch_idx, _evaluation.logged_step(trainer),
            every_n_epochs=self.every_n_epochs, every_n_train_steps=self.every_n_train_steps,
            log_steps=self.log_steps,
        ):  # fmt: skip
            self._evaluate(trainer, pl_module)
        self._refuse_missing(trainer, self._checks.due(trainer, batch_idx), at_validation=False)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Evaluate before a validation whose end a monitor of a gapwatch metric checks at."""
        if self._checks.at_validation and not trainer.sanity_checking:
            self._evaluate(trainer, pl_module)
            self._refuse_missing(trainer, self._checks.due(trainer, None), at_validation=True)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Catch an epoch whose last batch went unnoticed (an iterable loader, say)."""
        epoch_due = (trainer.current_epoch + 1) % self.every_n_epochs == 0
        if epoch_due or self._checks.at_train_epoch_end:
            self._evaluate(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the hparams entry and print the final proxies with their correlations."""
        if self._visuals is not None:
            settings = _publishing.settings(self, SETTINGS, self.proxies, self.prefix)
            self._visuals.finish(settings, self.history)
            self._visuals = None
        if self.history:
            rank_zero_info(summary_table(self.history) + "\n" + self._clock.cost(len(self.history)))

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue the curves without a second step 0."""
        proxies = [proxy.state_dict() for proxy in self.proxies]
        return {"last_step": self.last_step, "history": self.history, "proxies": proxies}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict``."""
        self.last_step = state_dict["last_step"]
        self.history = list(state_dict["history"])
        for proxy, state in zip(self.proxies, state_dict.get("proxies", ()), strict=False):
            proxy.load_state_dict(state)

    # -- internals ---------------------------------------------------------------------

    def _prepare(self, trainer: Trainer, pl_module: LightningModule, train: Probe) -> None:
        """Draw the held-out probe, set the proxies up, and keep this process's shards."""
        with self._clock.timed():
            probes = _setup.whole_probes(
                trainer, pl_module, train, self.heldout, self.probe_size, self.seed,
                self.split_batch,
            )  # fmt: skip
            with uncompiled(self.get_model(pl_module)) as model:
                self._active, self._num_outputs = _setup.set_up_proxies(
                    self.proxies, model, probes, skip_inapplicable=self._skips_inapplicable
                )
            self._probes = _setup.shard(probes, trainer, pl_module.device)
        if probes.heldout is None:
            refuse_without_heldout(trainer, self._checks.readers, self.prefix)

    def _refuse_missing(
        self, trainer: Trainer, readers: list[Reader], *, at_validation: bool
    ) -> None:
        if not self._streamed:  # step 0 gave the first evaluation; the next comes by the check
            return
        collected = None if self._collector is None else self._collector.count
        refuse_missing(
            trainer, readers, self.history, at_validation=at_validation, prefix=self.prefix,
            probe_size=self.probe_size, collected=collected,
        )  # fmt: skip

    def _forward(self, model: nn.Module, probes: Probes, context: Context) -> Outputs:
        """The shared pass of an evaluation (a method, so benchmarks can time it)."""
        return _evaluation.forward(model, probes, self._active, context, self.batch_size)

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Evaluate every active proxy and publish the metrics, unless this step has them."""
        step = _evaluation.logged_step(trainer)
        # One point per step: after the first optimizer step Lightning's step is still 0,
        # which the evaluation before training already holds.
        if self._probes is None or trainer.global_step == self._done_at or step == self.last_step:
            return
        self._done_at = trainer.global_step
        with self._clock.timed():
            context = _evaluation.context(
                trainer, pl_module.device, seed=self.seed, batch_size=self.batch_size,
                num_outputs=self._num_outputs, step=step,
            )  # fmt: skip
            metrics, later = _evaluation.evaluate(
                trainer, self.get_model(pl_module), self._probes, self._active, context,
                self._forward, self.history,
            )  # fmt: skip
            self._warned_nonfinite |= _publishing.record(
                trainer, metrics, step, self.prefix, self.history, warn=not self._warned_nonfinite
            )
            self.last_step = step
            if self._visuals is not None or self._gathers_values:
                artifacts = _publishing.artifacts(trainer, self._active)
                if self._visuals is not None:
                    self._visuals.update(self.history, artifacts, step, later=later)
