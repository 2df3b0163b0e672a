"""The test loss that output sensitivity predicts (Forouzesh, Salehi & Thiran, 2020).

Under strong assumptions on the weights, the sensitivity S of
:mod:`gapwatch.functional.sensitivity` (eq. 2) gives the variance term of the
mean-squared error of the softmax outputs (eq. 7); :func:`predicted_test_loss` turns it
into a cross-entropy test loss (eq. 9). Its other terms live here too: the inputs'
second moment ``sigma_x^2`` (:func:`input_second_moment`), the output variance due to
the biases ``Sigma`` (eq. 8, :func:`sigma_term`), and :func:`softmax_mse` (eq. 4),
which on training data estimates the bias term (eq. 5) that eq. 9 neglects.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.functional import one_hot, softmax
from torch.nn.parameter import is_lazy

from gapwatch.functional._common import (
    as_outputs,
    check_choice,
    check_classifier,
    check_inputs,
    check_positive,
    check_targets,
    model_device,
)

_WEIGHTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


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
