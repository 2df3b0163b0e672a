"""gapwatch: watch generalization proxies beside the held-out loss while a model trains."""

from gapwatch.callbacks import (
    GeneralizationMonitor,
    JacobianNorm,
    NormalizedLoss,
    OutputSensitivity,
    ProbeCallback,
    Transitions,
    UnitAblation,
)
from gapwatch.functional import GapEstimator

__version__ = "0.1.0"

__all__ = [
    "GapEstimator",
    "GeneralizationMonitor",
    "JacobianNorm",
    "NormalizedLoss",
    "OutputSensitivity",
    "ProbeCallback",
    "Transitions",
    "UnitAblation",
    "__version__",
]
