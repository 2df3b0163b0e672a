"""Random draws keyed to input rows, from the caller's generator and never the global one.

Every random proxy draws here: the Gaussian input noise of the output sensitivity
(Forouzesh et al., eq. 2) and the uniform offsets of the Jacobian norm's row sampling
(Novak et al., 2018, §3 item 1). :class:`RowSeeds` gives each input row a stream of its
own, so that a data-parallel shard or any ``batch_size`` gets exactly the draws of the
whole probe; :func:`draw` draws from it or from a ``torch.Generator``, and
:func:`make_generator` supplies a fresh OS-seeded generator when the caller gives none.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class RowSeeds:
    """One random stream per input row, so that a row's draws are its own.

    Row ``i`` draws from a generator seeded with ``seeds[i]`` (its ``j``-th noise draw
    from ``seeds[i] * 2**16 + j``), so what it draws does not depend on which other rows
    share its chunk or its process: a data-parallel shard gets exactly the draws its rows
    get in the whole probe, and any ``batch_size`` gives the same numbers. Draws are made
    on the CPU (one small generator reseeded per row) and moved to the model's device.

    Args:
        seeds: ``[N]`` integer seeds, one per row of the inputs they go with.
    """

    def __init__(self, seeds: Tensor) -> None:
        if seeds.ndim != 1 or seeds.is_floating_point():
            raise ValueError(
                f"`seeds` must be 1-D integers, got {seeds.dtype} {tuple(seeds.shape)}."
            )
        self.seeds = seeds.detach().to("cpu", torch.int64)
        self._generator = torch.Generator()

    def __len__(self) -> int:
        return self.seeds.shape[0]

    def draw(
        self,
        rows: Tensor,
        shape: Sequence[int],
        device: torch.device,
        *,
        uniform: bool = False,
        streams: Tensor | None = None,
    ) -> Tensor:
        """Standard normal (or uniform) float32 draws ``[len(rows), *shape]``.

        Args:
            rows: Row positions into ``seeds``, one per output row.
            shape: Shape of one row's draw.
            device: Where the draws go.
            uniform: Draw from U[0, 1) instead of N(0, 1).
            streams: Which of its row's streams each output row takes (noise draw ``j``).
        """
        sample = torch.rand if uniform else torch.randn
        out = torch.empty((len(rows), *shape))
        keys = self.seeds[rows.cpu()] * 2**16
        if streams is not None:
            keys = keys + streams.cpu()
        for i, key in enumerate(keys.tolist()):
            self._generator.manual_seed(key)
            out[i] = sample(tuple(shape), generator=self._generator)
        return out.to(device)


Draws = torch.Generator | RowSeeds


def make_generator(generator: Draws | None, device: torch.device) -> Draws:
    """The caller's source of draws, or a fresh generator seeded from the OS (never global)."""
    if generator is not None:
        if not isinstance(generator, (torch.Generator, RowSeeds)):
            raise TypeError(
                "`generator` must be a torch.Generator or gapwatch's RowSeeds, got "
                f"{type(generator).__name__}."
            )
        return generator
    fresh = torch.Generator(device=device)
    fresh.seed()
    return fresh


def draw(
    generator: Draws,
    rows: Tensor,
    shape: Sequence[int],
    device: torch.device,
    *,
    uniform: bool = False,
    streams: Tensor | None = None,
) -> Tensor:
    """Float32 draws ``[len(rows), *shape]`` for the given input rows, on ``device``.

    A ``torch.Generator`` draws on its own device (so a CPU generator gives the same
    numbers whether the model is on the CPU or a GPU), in the order of the rows; a
    :class:`RowSeeds` draws each row from its own stream.
    """
    if isinstance(generator, RowSeeds):
        return generator.draw(rows, shape, device, uniform=uniform, streams=streams)
    sample = torch.rand if uniform else torch.randn
    full = (len(rows), *shape)
    return sample(full, generator=generator, device=generator.device).to(device)
