"""How a model is called and read: keyword inputs in, logits out.

A model may take one tensor (``model(x)``) or keyword tensors (``model(**inputs)``, as
Hugging Face models take ``input_ids`` and ``attention_mask``), and may return the logits
themselves, an object with ``.logits``, a mapping with ``"logits"``, or a tuple whose
first element is the logits. Everything here is torch-only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn


class KeywordInputs(Mapping[str, Tensor]):
    """A batch of keyword inputs: named tensors that share their first dimension ``N``.

    Rows are selected with ``batch[rows]`` (a slice, index tensor or boolean mask), which
    selects the same rows of every tensor; ``batch["input_ids"]`` is one tensor. It is a
    mapping, so ``model(**batch)`` calls the model with it. Its ``shape`` is ``(N,)``: the
    batch dimension, the only one its tensors share.

    Args:
        tensors: The named tensors, each ``[N, ...]``.
    """

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        items = dict(tensors)
        bad = [key for key, value in items.items() if not isinstance(value, Tensor)]
        if not items or bad:
            raise TypeError(
                "Keyword inputs must be a non-empty mapping of tensors; "
                f"{bad or 'no keys'} are not tensors."
            )
        sizes = {key: value.shape[0] if value.ndim else None for key, value in items.items()}
        if None in sizes.values() or len(set(sizes.values())) != 1:
            raise ValueError(
                f"Keyword inputs must share their first (batch) dimension, got sizes {sizes}."
            )
        self._tensors = items

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return self._tensors[key]
        return KeywordInputs({name: value[key] for name, value in self._tensors.items()})

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        # Mapping's len would count keys; a batch's length is its rows, like a tensor's.
        return self.shape[0]

    def __repr__(self) -> str:
        shapes = {key: tuple(value.shape) for key, value in self._tensors.items()}
        return f"KeywordInputs({shapes})"

    @property
    def shape(self) -> torch.Size:
        """``(N,)``, the batch dimension."""
        return torch.Size([next(iter(self._tensors.values())).shape[0]])

    @property
    def ndim(self) -> int:
        """Batches of keyword inputs count as ``[N, features]``."""
        return 2

    @property
    def device(self) -> torch.device:
        """The device of the first tensor."""
        return next(iter(self._tensors.values())).device

    @property
    def dtype(self) -> torch.dtype:
        """The first tensor's dtype (token ids, typically): what a perturbation would meet."""
        return next(iter(self._tensors.values())).dtype

    def keys(self) -> Any:
        """The names, in order."""
        return self._tensors.keys()

    def is_floating_point(self) -> bool:
        """Never: keyword inputs are perturbed at a module's output, not in place."""
        return False

    def _map(self, fn: Any) -> KeywordInputs:
        return KeywordInputs({key: fn(value) for key, value in self._tensors.items()})

    def to(self, device: Any = None, dtype: Any = None, copy: bool = False) -> KeywordInputs:
        """Every tensor on ``device``; ``dtype`` converts the floating ones only."""

        def move(value: Tensor) -> Tensor:
            target = dtype if dtype is not None and value.is_floating_point() else value.dtype
            return value.to(device=device, dtype=target, copy=copy)

        return self._map(move)

    def detach(self) -> KeywordInputs:
        """Every tensor detached."""
        return self._map(Tensor.detach)

    def clone(self) -> KeywordInputs:
        """Every tensor copied."""
        return self._map(Tensor.clone)

    def cpu(self) -> KeywordInputs:
        """Every tensor on the CPU."""
        return self._map(Tensor.cpu)


Inputs = Tensor | KeywordInputs


def as_inputs(inputs: Any) -> Any:
    """A mapping of tensors as :class:`KeywordInputs`; anything else as it is."""
    if isinstance(inputs, Mapping) and not isinstance(inputs, KeywordInputs):
        return KeywordInputs(inputs)
    return inputs


def cat_inputs(parts: list[Any]) -> Any:
    """Rows of several batches of the same kind, concatenated."""
    if isinstance(parts[0], KeywordInputs):
        return KeywordInputs({key: torch.cat([part[key] for part in parts]) for key in parts[0]})
    return torch.cat(parts)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for keyword inputs, ``model(inputs)`` otherwise."""
    if isinstance(inputs, KeywordInputs):
        return model(**inputs)
    return model(inputs)


def logits_of(out: Any) -> Any:
    """The logits in what a model returned; anything unrecognized as it is.

    A tensor is the logits; otherwise its ``["logits"]``, ``.logits`` or a tuple's first
    element.
    """
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    if isinstance(getattr(out, "logits", None), Tensor):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return out


def describe_output(out: Any) -> str | None:
    """Which part of the model's output :func:`logits_of` takes; None for a plain tensor."""
    kind = type(out).__name__
    if isinstance(out, Tensor):
        return None
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return f"the model returns a {kind}; gapwatch reads its 'logits' entry"
    if isinstance(getattr(out, "logits", None), Tensor):
        return f"the model returns a {kind}; gapwatch reads its .logits"
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return f"the model returns a {kind} of {len(out)}; gapwatch reads its first element"
    return None
