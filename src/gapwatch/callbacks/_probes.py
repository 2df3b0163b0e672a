"""Fixed probe sets and how a user's batch splits into inputs and targets.

How a probe is drawn from a loader is in :mod:`gapwatch.callbacks._drawing`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from gapwatch.functional._inputs import Inputs, KeywordInputs, as_inputs

SplitBatch = Callable[[Any], tuple[Inputs, Tensor | None]]
Role = Literal["heldout", "train"]


@dataclass(frozen=True)
class Probe:
    """One fixed probe set: inputs ``[N, ...]`` and optional targets ``[N]``.

    The inputs are a tensor or :class:`~gapwatch.functional._inputs.KeywordInputs` (the
    model is then called as ``model(**inputs)``).

    ``batch_keys`` holds the keys of the user's batches when they are mappings, so that a
    message about missing targets can name the key to set.
    """

    inputs: Inputs
    targets: Tensor | None
    batch_keys: tuple[str, ...] | None = None
    rows: Tensor | None = None  # positions in the whole probe; None: this is the whole

    @property
    def row_ids(self) -> Tensor:
        """Each row's position in the whole probe, which keys its random draws."""
        return torch.arange(len(self)) if self.rows is None else self.rows

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def shard(self, rank: int, world_size: int) -> Probe:
        """The rows this process evaluates under data parallelism (strided, so balanced)."""
        targets = None if self.targets is None else self.targets[rank::world_size]
        rows = self.row_ids[rank::world_size]
        return Probe(self.inputs[rank::world_size], targets, self.batch_keys, rows)

    def to(self, device: torch.device) -> Probe:
        """The same probe on ``device``."""
        targets = None if self.targets is None else self.targets.to(device)
        return Probe(self.inputs.to(device), targets, self.batch_keys, self.rows)


@dataclass(frozen=True)
class Probes:
    """The probe sets of one callback: held-out (may be absent) and train."""

    heldout: Probe | None
    train: Probe

    @property
    def unlabeled_role(self) -> Role:
        """Where label-free proxies look: the held-out probe, else the train probe."""
        return "heldout" if self.heldout is not None else "train"

    @property
    def unlabeled(self) -> Probe:
        """The probe of ``unlabeled_role``."""
        return self[self.unlabeled_role]

    def __getitem__(self, role: Role) -> Probe:
        """The probe of ``role``."""
        probe = self.train if role == "train" else self.heldout
        if probe is None:
            raise KeyError(f"There is no {role} probe.")
        return probe


def split_batch(batch: Any, input_key: str, target_key: str) -> tuple[Inputs, Tensor | None]:
    """Split a collated batch into ``(inputs, targets)``.

    Works out of the box for ``(x, y)`` tuples or lists, ``x`` alone, and mappings with
    ``input_key`` and ``target_key``. A mapping without ``input_key`` but with
    ``target_key`` (``{"input_ids", "attention_mask", "labels"}`` with
    ``target_key="labels"``) gives its other tensors as keyword inputs, for
    ``model(**inputs)``; so do inputs that are themselves a mapping of tensors. Anything
    else raises an error naming the override.
    """
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) >= 1:
        inputs, targets = batch[0], (batch[1] if len(batch) > 1 else None)
    elif isinstance(batch, Mapping) and input_key in batch:
        inputs, targets = batch[input_key], batch.get(target_key)
    elif isinstance(batch, Mapping) and target_key in batch:
        rest = {key: value for key, value in batch.items() if key != target_key}
        if not rest or not all(isinstance(value, Tensor) for value in rest.values()):
            raise _unsupported(batch, input_key)
        inputs, targets = KeywordInputs(rest), batch[target_key]
    else:
        raise _unsupported(batch, input_key)
    if isinstance(inputs, Mapping):
        inputs = as_inputs(inputs)
    if not isinstance(inputs, (Tensor, KeywordInputs)) or not (
        targets is None or isinstance(targets, Tensor)
    ):
        raise _unsupported(batch, input_key)
    return inputs, targets


def _unsupported(batch: Any, input_key: str) -> TypeError:
    keys = f" with keys {sorted(map(str, batch))}" if isinstance(batch, Mapping) else ""
    return TypeError(
        f"gapwatch cannot find inputs and targets in a batch of type "
        f"{type(batch).__name__}{keys}. Batches of `(inputs, targets)` and mappings with "
        f"`input_key`/`target_key` (now {input_key!r}) work as they are; so do mappings of "
        "keyword inputs and their targets with `target_key=` naming the targets' key (the "
        "other tensors go to `model(**inputs)`); for anything else "
        "subclass the callback and override `split_batch(self, batch) -> (inputs, targets)`."
    )


def one_per_sample(targets: Tensor, num_samples: int, role: str) -> Tensor:
    """Targets as ``[N]``: a ``[N, 1]`` regression column is flattened, other shapes refused.

    A ``[N, 1]`` target against a ``[N]`` output would broadcast to ``[N, N]`` and give a
    plausible but wrong loss; one-hot or multi-output targets have no single loss here.
    """
    if targets.ndim == 0 or targets.shape[0] != num_samples or targets[0].numel() != 1:
        raise ValueError(
            f"The {role} batches carry targets of shape {tuple(targets.shape)} for "
            f"{num_samples} inputs; gapwatch needs one target per sample: class indices [N] "
            "or a regression target [N] / [N, 1]. For one-hot labels override "
            "`split_batch` to return `(x, y.argmax(1))`; for multi-label or multi-output "
            "targets, to return `(x, None)`, which keeps the label-free proxies."
        )
    return targets.reshape(num_samples)
