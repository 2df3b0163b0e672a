"""GeneralizationMonitor: every proxy on one probe set and one clean forward pass."""

from __future__ import annotations

from typing import Any, Literal

from gapwatch.callbacks._proxy import Proxy
from gapwatch.callbacks.base import ProbeCallback
from gapwatch.callbacks.distance_from_init import DistanceProxy
from gapwatch.callbacks.jacobian_norm import JacobianProxy
from gapwatch.callbacks.normalized_loss import NormalizedLossProxy
from gapwatch.callbacks.output_margin import MarginProxy
from gapwatch.callbacks.output_sensitivity import SensitivityProxy
from gapwatch.callbacks.prediction_changes import PredictionChangesProxy
from gapwatch.callbacks.transitions import TransitionsProxy
from gapwatch.callbacks.unit_ablation import AblationProxy
from gapwatch.functional.ablation import KappaMethod


class GeneralizationMonitor(ProbeCallback):
    """Watch every generalization proxy beside the held-out loss, in one callback.

    With no arguments it runs the default suite: held-out and train loss and accuracy,
    the gap, output sensitivity with eq. 9's predicted test loss (Forouzesh et al.), the
    softmax Jacobian norm (Novak et al.), the normalized train and test loss (Liao and
    Poggio), unit-ablation sparsity (Zhao et al.), the normalized train margin and the
    distance of the weights from their start (Jiang et al. 2020). Transitions are off by default:
    they cost ``num_points`` forward passes per image.

    All proxies share the probe sets and one clean forward pass per probe and
    evaluation; the switches turn members off, the other arguments configure them.

    Args:
        sensitivity: Log ``sensitivity``, ``predicted_test_loss(_bias)`` and
            ``bias_fraction``.
        jacobian: Log ``jacobian_norm``.
        normalized_loss: Log ``normalized_train_loss``, ``normalized_test_loss`` and
            ``log_norm_product``.
        ablation: Log ``ablation_zeta``, ``ablation_kappa`` (and ``estimated_gap``).
        transitions: Log ``transitions``.
        margin: Log ``margin_q10``, the train probe's normalized 10th-percentile output
            margin (Jiang et al. 2020), from the shared forward pass.
        distance_from_init: Log ``distance_from_init``, the relative Frobenius distance of
            the weights from those at fit start; keeps one copy of the parameters.
        prediction_changes: Log ``prediction_changes``, the fraction of train-probe
            samples whose predicted class changed since the previous evaluation (Yuan et
            al.'s label wave; free: it compares the shared logits).
        sigma: Input-noise standard deviation for the sensitivity (in the units of the
            ``perturb_at`` module's output when there is one).
        num_draws: Noise draws per probe input.
        jacobian_method: ``"projection"`` or ``"exact"``.
        jacobian_output: ``"softmax"`` or ``"logits"``.
        num_projections: Random projections per sample for the projection method.
        perturb_at: Module path whose output the sensitivity and the Jacobian norm
            perturb instead of the inputs; by default the inputs when they are floating
            point, else the first ``nn.Embedding`` (token ids, keyword inputs) or the first
            module with a floating-point output (uint8 images), said in an info line.
        normalization: ``"auto"`` (layerwise where that is exact, output otherwise,
            reported once), ``"layerwise"`` (product of layer norms) or ``"output"``
            (output norm on reference inputs, for residual networks).
        p: Order of the norm used for normalization.
        scale: Eq. 6's ``R``: the normalized logits are multiplied by it, which spreads
            the normalized losses (otherwise just below ``ln K``) for early stopping.
        layer: Module path of the ablated layer; by default chosen automatically.
        max_classes: Classes evaluated per ablation (a random subset when there are more).
        kappa: ``"paper"`` (eq. 5 as printed) or ``"authors"`` (the authors' signed mean
            of ``E_r - E``), as in :class:`~gapwatch.callbacks.UnitAblation`.
        gap_coefficients: ``(a, b, c)`` of a fitted :class:`~gapwatch.GapEstimator`; then
            ``estimated_gap = a * zeta + b * kappa + c`` is logged too.
        num_points: Points on each translation loop for transitions.
        max_images: Held-out images whose transitions are counted.
        **kwargs: Scheduling and probe options of :class:`~gapwatch.callbacks.ProbeCallback`
            (``every_n_epochs``, ``probe_size``, ``batch_size``, ``prefix``, ...).

    Example::

        trainer = Trainer(
            callbacks=[
                GeneralizationMonitor(),
                # Label-free stopping, as measured in experiments/README.md.
                EarlyStopping(monitor="gapwatch/prediction_changes", patience=5),
                ModelCheckpoint(monitor="gapwatch/prediction_changes", mode="min"),
            ]
        )
    """

    def __init__(
        self,
        sensitivity: bool = True,
        jacobian: bool = True,
        normalized_loss: bool = True,
        ablation: bool = True,
        transitions: bool = False,
        prediction_changes: bool = True,
        *,
        margin: bool = True,
        distance_from_init: bool = True,
        sigma: float = 0.1,
        num_draws: int = 1,
        jacobian_method: Literal["projection", "exact"] = "projection",
        jacobian_output: Literal["softmax", "logits"] = "softmax",
        num_projections: int = 3,
        perturb_at: str | None = None,
        normalization: Literal["auto", "layerwise", "output"] = "auto",
        p: float = 2.0,
        scale: float = 1.0,
        layer: str | None = None,
        max_classes: int = 10,
        kappa: KappaMethod = "paper",
        gap_coefficients: tuple[float, float, float] | None = None,
        num_points: int | None = None,
        max_images: int = 64,
        **kwargs: Any,
    ) -> None:
        proxies: list[Proxy] = []
        if sensitivity:
            proxies.append(SensitivityProxy(sigma, num_draws, perturb_at=perturb_at))
        if jacobian:
            proxies.append(
                JacobianProxy(
                    jacobian_method,
                    jacobian_output,
                    num_projections,
                    option="jacobian_output",
                    logits_for_regression=True,
                    perturb_at=perturb_at,
                )
            )
        if normalized_loss:
            proxies.append(NormalizedLossProxy(normalization, p, scale, option="normalization"))
        # Before the ablation, which stays last (tests and benchmarks find it there); neither
        # draws random numbers nor takes the shared pass, so the order changes no value.
        if margin:
            proxies.append(MarginProxy())
        if distance_from_init:
            proxies.append(DistanceProxy())
        if prediction_changes:
            proxies.append(PredictionChangesProxy())
        if ablation:
            proxies.append(AblationProxy(layer, max_classes, gap_coefficients, kappa))
        if transitions:
            proxies.append(TransitionsProxy(num_points, max_images))
        super().__init__(proxies, **kwargs)
        self._skips_inapplicable = True
