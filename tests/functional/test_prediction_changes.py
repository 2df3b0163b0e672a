"""Predicted classes and the fraction that changed, against hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch

from gapwatch.functional import predicted_classes, prediction_changes
from gapwatch.functional.prediction_changes import UNKNOWN


def test_classes_are_the_argmax_the_sign_of_one_logit_and_unknown_where_not_finite():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0], [math.nan, 1.0, 0.0]])
    assert predicted_classes(logits).tolist() == [1, 0, UNKNOWN]
    binary = torch.tensor([[0.3], [-0.2], [math.inf]])
    assert predicted_classes(binary).tolist() == [1, 0, UNKNOWN]
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        predicted_classes(torch.zeros(3))


def test_changes_count_only_samples_known_at_both_evaluations():
    previous = torch.tensor([0, 1, 2, 3, UNKNOWN])
    current = torch.tensor([0, 2, 2, UNKNOWN, 1])
    each = prediction_changes(previous, current, reduction="none")
    assert each[:3].tolist() == [0.0, 1.0, 0.0]
    assert each[3:].isnan().all()
    assert float(prediction_changes(previous, current)) == pytest.approx(1 / 3)
    assert prediction_changes(torch.tensor([UNKNOWN]), torch.tensor([0])).isnan()
    with pytest.raises(ValueError, match="same samples"):
        prediction_changes(previous, current[:4])
