"""Output sensitivity (Forouzesh, Salehi & Thiran, 2020).

Sensitivity S is the variance of the output noise, averaged over the K outputs, when
Gaussian noise is added to the inputs (eq. 2). It needs no labels; under strong
assumptions on the weights it predicts the variance term of the test loss (eqs. 7-9,
:mod:`gapwatch.functional.predicted_loss`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn.functional import softmax

from gapwatch.functional._common import (
    DEFAULT_BATCH_SIZE,
    as_outputs,
    check_batch_size,
    check_classifier,
    check_float32_model,
    check_inputs,
    check_positive,
    chunks,
    evaluation,
    model_device,
    model_input,
)
from gapwatch.functional._draws import Draws, draw, make_generator
from gapwatch.functional._inputs import Inputs, call_model
from gapwatch.functional._perturb import check_perturbable, forward_perturbed


def output_sensitivity(
    model: nn.Module,
    inputs: Inputs,
    *,
    sigma: float = 0.1,
    after_softmax: bool = False,
    num_draws: int = 1,
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    generator: Draws | None = None,
    clean_outputs: Tensor | None = None,
    perturb_at: str | None = None,
) -> Tensor:
    """Sensitivity S of the model's outputs to Gaussian input noise (Forouzesh eq. 2).

    ``S`` is the population variance, over all (input, noise draw) pairs, of the mean
    over the K outputs of ``eps_y = f(x + eps) - f(x)`` with ``eps ~ N(0, sigma^2 I)``,
    computed on the logits (before the softmax), as in the paper. A regression model
    (output ``[N]`` or ``[N, 1]``) is the case ``K = 1`` of Section V-E.

    Eq. 2 applied after the softmax is identically zero, because softmax outputs sum to
    one and so do not move on average. ``after_softmax=True`` therefore returns a
    different quantity: the mean over the K entries of each entry's population variance
    of ``softmax(f(x + eps)) - softmax(f(x))``.

    The variance is taken in float64 and merged chunk by chunk, each chunk centred on its
    own mean (Chan et al.'s pairwise update), so a tiny S is not lost to cancellation and
    memory grows with ``batch_size``, not with ``N``.

    Args:
        model: Maps ``[n, ...]`` inputs to ``[n, K]`` logits or a ``[n]`` regression output.
        inputs: Clean inputs ``[N, ...]`` (any device; chunks move to the model's).
        sigma: Standard deviation of the input noise, ``sigma_eps_x`` in the paper.
        after_softmax: Use the per-entry variance of softmax outputs (see above).
        num_draws: Independent noise draws per input.
        batch_size: Most noisy inputs per forward pass: ``DEFAULT_BATCH_SIZE`` (128) unless
            given; ``None`` runs all at once.
        generator: Source of the noise: a ``torch.Generator``, a
            :class:`~gapwatch.functional.RowSeeds` (each row's noise from its own
            stream, independent of chunking and sharding), or ``None`` for a fresh
            generator seeded from the OS.
        clean_outputs: ``f(inputs)`` as ``[N, K]`` (or ``[N]``) if the caller already has
            it, e.g. from a shared clean forward pass; the clean pass is then skipped and
            only the ``N * num_draws`` noisy inputs are run.
        perturb_at: Module path whose output ``h`` is perturbed instead of the inputs
            (``h + eps``, ``eps ~ N(0, sigma^2 I)`` on every entry of ``h``); needed for
            integer inputs (token ids: e.g. the embedding) and keyword inputs
            (``model(**inputs)``). ``sigma`` is then in the units of ``h``, and eq. 9's
            ``E[x^2]`` is ``h``'s second moment. ``None``: the inputs.

    Returns:
        A 0-d float32 tensor on the model's device.

    Raises:
        ValueError: If ``sigma``, ``num_draws`` or ``batch_size`` is not positive, if
            ``clean_outputs`` does not match the inputs and the model, or if
            ``after_softmax`` meets a one-output model.
        TypeError: If the inputs are not a floating tensor and ``perturb_at`` is not
            given, or the model's output holds no logits.
    """
    responses = _responses(
        model,
        inputs,
        sigma=sigma,
        after_softmax=after_softmax,
        num_draws=num_draws,
        batch_size=batch_size,
        generator=generator,
        clean_outputs=clean_outputs,
        perturb_at=perturb_at,
    )
    with evaluation(model), torch.no_grad():
        return _population_variance(responses).mean().float()


def noise_response(
    model: nn.Module,
    inputs: Inputs,
    *,
    sigma: float = 0.1,
    after_softmax: bool = False,
    num_draws: int = 1,
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    generator: Draws | None = None,
    clean_outputs: Tensor | None = None,
    perturb_at: str | None = None,
) -> Tensor:
    """The output noise of every (input, draw) pair, whose variance is S (eq. 2).

    Row ``p`` belongs to draw ``p % num_draws`` of input ``p // num_draws``. Before the
    softmax a row holds the mean over the K outputs of ``f(x + eps) - f(x)`` (one
    column); with ``after_softmax=True`` it holds all K entries of
    ``softmax(f(x + eps)) - softmax(f(x))``. Callers that combine shards of a probe set
    sum these rows and their squares; :func:`output_sensitivity` takes their variance.

    Args: as :func:`output_sensitivity`.

    Returns:
        A float64 tensor ``[N * num_draws, 1]`` (or ``[N * num_draws, K]``) on the
        model's device.
    """
    responses = _responses(
        model,
        inputs,
        sigma=sigma,
        after_softmax=after_softmax,
        num_draws=num_draws,
        batch_size=batch_size,
        generator=generator,
        clean_outputs=clean_outputs,
        perturb_at=perturb_at,
    )
    with evaluation(model), torch.no_grad():
        return torch.cat(list(responses))


def _responses(
    model: nn.Module,
    inputs: Inputs,
    *,
    sigma: float,
    after_softmax: bool,
    num_draws: int,
    batch_size: int | None,
    generator: Draws | None,
    clean_outputs: Tensor | None,
    perturb_at: str | None,
) -> Iterator[Tensor]:
    """The rows of :func:`noise_response`, chunk by chunk; the caller sets eval mode.

    Each input's clean pass runs once, in the first chunk that holds one of its draws; the
    clean output of a chunk's last input is carried over, as the next chunk may hold
    more of its draws. Only one chunk's outputs are alive at a time.
    """
    check_perturbable(model, inputs, perturb_at)
    check_inputs(inputs, floating=perturb_at is None)
    check_float32_model(model)
    check_positive("sigma", sigma)
    check_positive("num_draws", num_draws, integer=True)
    check_batch_size(batch_size)
    if clean_outputs is not None:
        clean_outputs = _checked_clean_outputs(clean_outputs, inputs.shape[0])
    device = model_device(model, inputs.device)
    generator = make_generator(generator, device)
    known = 0  # inputs[:known] had their clean pass
    carried: list[Tensor] = []  # the clean output of the last of them
    for pairs in chunks(inputs.shape[0] * num_draws, batch_size):
        first, stop = pairs.start // num_draws, (pairs.stop - 1) // num_draws + 1
        if clean_outputs is None:
            fresh = [_forward(model, inputs[known:stop], device)] if stop > known else []
            clean = torch.cat(carried[: int(first < known)] + fresh)
            known, carried = stop, [clean[-1:]]
        else:
            clean = clean_outputs[first:stop].to(device)
        if after_softmax:
            check_classifier(clean.shape[1], "`output_sensitivity(after_softmax=True)`")
            clean = softmax(clean, dim=1)
        pair_ids = torch.arange(pairs.start, pairs.stop, device=device)
        rows = pair_ids // num_draws
        x = model_input(inputs[first:stop], device)
        if num_draws > 1:
            x = x[rows - first]
        streams = pair_ids % num_draws

        def add_noise(h: Tensor, rows: Tensor = rows, streams: Tensor = streams) -> Tensor:
            # In place: one input-sized allocation per chunk, not three.
            noise = draw(generator, rows, h.shape[1:], device, streams=streams)
            return noise.mul_(sigma).add_(h)

        if perturb_at is None:
            noisy = _forward(model, add_noise(cast(Tensor, x)), device)
        else:
            noisy = as_outputs(forward_perturbed(model, x, perturb_at, add_noise)).float()
        if noisy.shape[1] != clean.shape[1]:
            raise ValueError(
                f"`clean_outputs` has {clean.shape[1]} columns but the model returns "
                f"{noisy.shape[1]} outputs; pass the model's own outputs on `inputs`."
            )
        if after_softmax:
            noisy = softmax(noisy, dim=1)
        eps_y = noisy.double() - clean[rows - first].double()
        yield eps_y if after_softmax else eps_y.mean(dim=1, keepdim=True)


def _forward(model: nn.Module, x: Inputs, device: torch.device) -> Tensor:
    """``model(x)`` as checked float32 ``[n, K]`` outputs, ``x`` moved to ``device``."""
    return as_outputs(call_model(model, model_input(x, device))).float()


def _checked_clean_outputs(clean_outputs: Tensor, num_samples: int) -> Tensor:
    """The caller's ``f(inputs)`` as float32 ``[N, K]``, on its own device."""
    if (
        not isinstance(clean_outputs, Tensor)
        or clean_outputs.ndim not in (1, 2)
        or clean_outputs.shape[0] != num_samples
    ):
        got = (
            tuple(clean_outputs.shape)
            if isinstance(clean_outputs, Tensor)
            else type(clean_outputs).__name__
        )
        raise ValueError(
            f"`clean_outputs` must be the model's outputs on `inputs`, a tensor of shape "
            f"[{num_samples}, K] (or [{num_samples}] for regression); got {got}."
        )
    return as_outputs(clean_outputs.detach()).float()


def _population_variance(parts: Iterable[Tensor]) -> Tensor:
    """Column-wise population variance of the rows of ``parts``, one part at a time.

    Each part is centred on its own mean and merged by Chan et al.'s pairwise update:
    exact in exact arithmetic and free of the cancellation of ``E[x^2] - E[x]^2``.
    """
    count = 0
    mean: Tensor | float = 0.0
    m2: Tensor | float = 0.0
    for part in parts:
        n, part_mean = part.shape[0], part.mean(dim=0)
        delta, total = part_mean - mean, count + n
        mean = mean + delta * (n / total)
        m2 = m2 + (part - part_mean).square().sum(dim=0) + delta.square() * (count * n / total)
        count = total
    # A tensor once a part came; with none, 0.0 / 0 raises ZeroDivisionError.
    return cast(Tensor, m2 / count)
