"""gapwatch: watch generalization proxies beside the held-out loss while a model trains.

The callbacks are imported on first use, so that ``gapwatch.functional`` and the
``gapwatch`` command line do not pay for importing Lightning.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "DistanceFromInit": "gapwatch.callbacks",
    "GapEstimator": "gapwatch.functional",
    "GeneralizationMonitor": "gapwatch.callbacks",
    "JacobianNorm": "gapwatch.callbacks",
    "NormalizedLoss": "gapwatch.callbacks",
    "OutputMargin": "gapwatch.callbacks",
    "OutputSensitivity": "gapwatch.callbacks",
    "PredictionChanges": "gapwatch.callbacks",
    "ProbeCallback": "gapwatch.callbacks",
    "Transitions": "gapwatch.callbacks",
    "UnitAblation": "gapwatch.callbacks",
}

__all__ = [
    "DistanceFromInit",
    "GapEstimator",
    "GeneralizationMonitor",
    "JacobianNorm",
    "NormalizedLoss",
    "OutputMargin",
    "OutputSensitivity",
    "PredictionChanges",
    "ProbeCallback",
    "Transitions",
    "UnitAblation",
    "__version__",
]

if TYPE_CHECKING:
    from gapwatch.callbacks import (
        DistanceFromInit,
        GeneralizationMonitor,
        JacobianNorm,
        NormalizedLoss,
        OutputMargin,
        OutputSensitivity,
        PredictionChanges,
        ProbeCallback,
        Transitions,
        UnitAblation,
    )
    from gapwatch.functional import GapEstimator


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gapwatch' has no attribute {name!r}")
