"""Output margins and their normalized percentile against hand values and numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gapwatch.functional.margin import margin_quantile, output_margins, total_variation


def test_margins_by_hand():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0], [2.0, 2.0, -1.0]])
    targets = torch.tensor([0, 2, 1])
    # 3 - 2; 1 - 5 (misclassified); 2 - 2 (a tie).
    assert output_margins(logits, targets).tolist() == [1.0, -4.0, 0.0]


def test_normalized_quantile_matches_numpy_and_ignores_the_logits_scale():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 10, generator=generator)
    targets = torch.randint(0, 10, (50,), generator=generator)
    z, y = logits.double().numpy(), targets.numpy()
    masked = z.copy()
    masked[np.arange(50), y] = -np.inf
    margins = z[np.arange(50), y] - masked.max(1)
    spread = np.sqrt(((z - z.mean(0)) ** 2).sum(1).mean())
    assert float(total_variation(logits)) == pytest.approx(spread, rel=1e-12)
    expected = np.quantile(margins, 0.1) / spread
    assert margin_quantile(logits, targets) == pytest.approx(expected, rel=1e-12)
    assert margin_quantile(7 * logits, targets) == pytest.approx(expected, rel=1e-6)
    raw = margin_quantile(logits, targets, q=0.5, normalize=False)
    assert raw == pytest.approx(np.median(margins), rel=1e-12)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="K >= 2"):
        output_margins(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="one class index per row"):
        output_margins(torch.zeros(4, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="q must lie"):
        margin_quantile(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), q=2)
    assert math.isnan(margin_quantile(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)))
