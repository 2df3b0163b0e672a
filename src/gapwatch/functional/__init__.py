"""Pure-torch generalization proxies: no Lightning import, ever.

Every function takes a model mapping a batch of inputs to logits (or a regression
output; or an object with ``.logits``, a mapping with ``"logits"``, a tuple with the logits
first), a tensor of inputs (or :class:`KeywordInputs`, for ``model(**inputs)``) and
keyword-only options; perturbation proxies take ``perturb_at=`` to perturb a module's
output instead of the inputs (token ids, keyword inputs); chunks its work with
``batch_size`` (``DEFAULT_BATCH_SIZE`` = 128 rows per forward pass unless given, the
callbacks' default too; ``None``: all rows at once); draws randomness only from the
``generator`` it is given; and leaves the model's mode, parameters, ``.grad`` fields and
BatchNorm buffers as it found them.
"""

from gapwatch.functional._common import DEFAULT_BATCH_SIZE
from gapwatch.functional._draws import RowSeeds
from gapwatch.functional._inputs import KeywordInputs
from gapwatch.functional.ablation import AblationResult, unit_ablation
from gapwatch.functional.gap_estimator import GapEstimator
from gapwatch.functional.jacobian import jacobian_norm
from gapwatch.functional.normalized_loss import (
    layerwise_obstacle,
    normalization_factor,
    normalized_cross_entropy,
)
from gapwatch.functional.predicted_loss import predicted_test_loss, sigma_term
from gapwatch.functional.prediction_changes import predicted_classes, prediction_changes
from gapwatch.functional.sensitivity import output_sensitivity
from gapwatch.functional.transitions import transitions

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "AblationResult",
    "GapEstimator",
    "KeywordInputs",
    "RowSeeds",
    "jacobian_norm",
    "layerwise_obstacle",
    "normalization_factor",
    "normalized_cross_entropy",
    "output_sensitivity",
    "predicted_classes",
    "predicted_test_loss",
    "prediction_changes",
    "sigma_term",
    "transitions",
    "unit_ablation",
]
