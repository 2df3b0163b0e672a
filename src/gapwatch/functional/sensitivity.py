"""Output sensitivity and the predicted test loss (Forouzesh, Salehi & Thiran, 2020).

Sensitivity S is the variance of the output noise, averaged over the K outputs, when
Gaussian noise is added to the inputs (eq. 2). It needs no labels; under strong
assumptions on the weights it predicts the variance term of the test loss (eqs. 7-9).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal, cast

import torch
from torch import Tensor, nn
from torch.nn.functional import one_hot, softmax
from torch.nn.parameter import is_lazy

from gapwatch.functional._common import (
    DEFAULT_BATCH_SIZE,
    Draws,
    as_outputs,
    check_batch_size,
    check_choice,
    check_classifier,
    check_float32_model,
    check_inputs,
    check_positive,
    check_targets,
    chunks,
    draw,
    evaluation,
    make_generator,
    model_device,
    model_input,
)
from gapwatch.functional._inputs import Inputs, call_model
from gapwatch.functional._perturb import check_perturbable, forward_perturbed

_WEIGHTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


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


def predicted_test_loss(
    sensitivity: Tensor | float,
    *,
    num_classes: int,
    input_second_moment: Tensor | float,
    sigma: float,
    sigma_term: Tensor | float = 0.0,
    bias: Tensor | float = 0.0,
) -> Tensor:
    """Cross-entropy test loss predicted from the sensitivity (Forouzesh eq. 9).

    ``L ~ sqrt(0.5 * (bias + (K-1)/K * (S * sigma_x^2 / sigma^2 + Sigma)))``. With
    ``bias = 0`` this is eq. 9 as printed, which neglects the bias term of the MSE
    decomposition (eq. 7 gives the variance term); a bias estimate such as
    :func:`softmax_mse` on the training set restores it, which matters early in training.

    Args:
        sensitivity: ``S`` from :func:`output_sensitivity` (before the softmax).
        num_classes: ``K >= 2``.
        input_second_moment: ``sigma_x^2``, see :func:`input_second_moment`.
        sigma: The input-noise standard deviation ``S`` was measured with.
        sigma_term: ``Sigma`` of eq. 8, see :func:`sigma_term`; the paper drops it.
        bias: Estimate of the bias term ``eps_bias`` (eq. 5), e.g. the train
            :func:`softmax_mse`.

    Returns:
        A 0-d float32 tensor (on the device of ``sensitivity`` if it is a tensor).

    Raises:
        ValueError: If ``num_classes < 2`` (eq. 9 is for classification; for regression
            S itself tracks the variance term of the MSE, Section V-E), if ``sigma`` is
            not positive, or if a term is negative or not a scalar.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            f"`num_classes` must be an integer >= 2, got {num_classes!r}: eq. 9 predicts a "
            "classification loss. For a regression model log the sensitivity itself, which "
            "tracks the variance term of the MSE (Forouzesh Section V-E)."
        )
    check_positive("sigma", sigma)
    device = sensitivity.device if isinstance(sensitivity, Tensor) else None
    terms = {
        "sensitivity": sensitivity,
        "input_second_moment": input_second_moment,
        "sigma_term": sigma_term,
        "bias": bias,
    }
    s, second_moment, big_sigma, bias_ = (_scalar(k, v, device) for k, v in terms.items())
    variance = (num_classes - 1) / num_classes * (s * second_moment / sigma**2 + big_sigma)
    return torch.sqrt(0.5 * (bias_ + variance)).float()


def _scalar(name: str, value: Tensor | float, device: torch.device | None) -> Tensor:
    """A non-negative one-element value as a 0-d float64 tensor (NaN passes through)."""
    tensor = torch.as_tensor(value, dtype=torch.float64, device=device)
    if tensor.numel() != 1:
        raise ValueError(f"`{name}` must be a scalar, got shape {tuple(tensor.shape)}.")
    if tensor < 0:
        raise ValueError(f"`{name}` must be non-negative, got {tensor.item()}.")
    return tensor.reshape(())


def input_second_moment(inputs: Tensor) -> Tensor:
    """The paper's ``sigma_x^2``: the mean of ``x^2`` over every entry of every input.

    Args:
        inputs: Inputs ``[N, ...]``, the same ones the sensitivity is measured on.

    Returns:
        A 0-d float32 tensor on the inputs' device.
    """
    check_inputs(inputs)
    return inputs.double().square().mean().float()


def softmax_mse(
    logits: Tensor, targets: Tensor, *, reduction: Literal["mean", "none"] = "mean"
) -> Tensor:
    """Mean over samples of ``||softmax(f(x)) - onehot(y)||^2`` (Forouzesh eq. 4).

    On training data it estimates the bias term (eq. 5) that eq. 9 neglects: the paper
    approximates the bias by the training loss.

    Args:
        logits: Model outputs ``[N, K]`` with ``K >= 2``.
        targets: Class indices ``[N]`` in ``[0, K)``.
        reduction: ``"mean"`` over samples, or ``"none"`` for the ``[N]`` per-sample errors.

    Returns:
        A 0-d (or ``[N]``) float32 tensor on the logits' device.

    Raises:
        ValueError: If the shapes do not match or a label is outside ``[0, K)``.
    """
    logits = as_outputs(logits)
    num_classes = logits.shape[1]
    check_classifier(num_classes, "`softmax_mse`")
    check_targets(targets, logits.shape[0])
    if targets.min() < 0 or targets.max() >= num_classes:
        raise ValueError(
            f"`targets` must be class indices in [0, {num_classes}) for {num_classes} logits; "
            f"got values in [{targets.min().item()}, {targets.max().item()}]."
        )
    probabilities = softmax(logits.float(), dim=1)
    onehot = one_hot(targets.to(logits.device), num_classes)
    check_choice("reduction", reduction, ("mean", "none"))
    errors = (probabilities - onehot).square().sum(dim=1)
    return errors.mean() if reduction == "mean" else errors


def sigma_term(model: nn.Module, num_classes: int, *, activation_gain: float = 0.5) -> Tensor:
    """Output variance due to the biases, ``Sigma`` of Forouzesh eq. 8.

    ``Sigma = (1/K) sum_l sigma_b_l^2 prod_{i>l} gain * sigma_w_i^2 * fan_in_i``, where
    ``sigma_w_i^2`` and ``sigma_b_l^2`` are the mean squares of layer ``i``'s weight and
    layer ``l``'s bias (a layer without bias contributes 0), ``fan_in`` is ``in_features``
    or ``in_channels / groups * prod(kernel_size)`` (footnote 5), and ``gain`` is
    ``(alpha^2 + beta^2) / 2`` of the positive-homogeneous activation (ReLU: 0.5).

    Both sums run over every layer, the output layer included: a bias added at layer
    ``l`` passes one activation and one weight for every later layer. This is the
    reading under which eq. 10, ``S = D/K (H/2)^M sigma^2`` for ``M`` hidden ReLU
    layers, follows from the same propagation with the input noise in place of a bias.

    Layers are the ``nn.Linear`` and ``nn.Conv1d/2d/3d`` modules in registration order,
    each assumed to feed the next through one activation. That is right for
    feed-forward models whose layers run in module order; residual or branching models,
    pooling and normalization layers lie outside eq. 8's assumptions.

    Args:
        model: The network; no forward pass is run.
        num_classes: ``K``, the number of outputs.
        activation_gain: ``(alpha^2 + beta^2) / 2`` of the activation.

    Returns:
        A 0-d float32 tensor on the model's device.

    Raises:
        ValueError: If the model has no such layer, one is still lazy, or an argument is
            not positive.
    """
    check_positive("num_classes", num_classes, integer=True)
    check_positive("activation_gain", activation_gain)
    layers = [m for m in model.modules() if isinstance(m, _WEIGHTED_LAYERS)]
    if not layers:
        raise ValueError(
            "`sigma_term` found no nn.Linear or nn.Conv1d/2d/3d layer in the model; eq. 8 "
            "applies to feed-forward stacks of such layers."
        )
    if any(is_lazy(p) for layer in layers for p in layer.parameters()):
        raise ValueError("The model has uninitialized lazy layers; run one forward pass first.")
    with torch.no_grad():
        total = torch.zeros((), dtype=torch.float64, device=model_device(model))
        downstream = torch.ones_like(total)  # prod over the later layers, built from the output
        for layer in reversed(layers):
            if layer.bias is not None:
                total += layer.bias.double().square().mean() * downstream
            fan_in = layer.weight[0].numel()
            downstream *= activation_gain * layer.weight.double().square().mean() * fan_in
    return (total / num_classes).float()
