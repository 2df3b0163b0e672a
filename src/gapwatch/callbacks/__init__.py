"""Lightning callbacks: thin wrappers over :mod:`gapwatch.functional` on fixed probe sets."""

from gapwatch.callbacks.base import ProbeCallback
from gapwatch.callbacks.distance_from_init import DistanceFromInit
from gapwatch.callbacks.jacobian_norm import JacobianNorm
from gapwatch.callbacks.monitor import GeneralizationMonitor
from gapwatch.callbacks.normalized_loss import NormalizedLoss
from gapwatch.callbacks.output_margin import OutputMargin
from gapwatch.callbacks.output_sensitivity import OutputSensitivity
from gapwatch.callbacks.prediction_changes import PredictionChanges
from gapwatch.callbacks.transitions import Transitions
from gapwatch.callbacks.unit_ablation import UnitAblation

__all__ = [
    "DistanceFromInit",
    "GeneralizationMonitor",
    "JacobianNorm",
    "NormalizedLoss",
    "OutputMargin",
    "OutputSensitivity",
    "PredictionChanges",
    "ProbeCallback",
    "Transitions",
    "UnitAblation",
]
