"""The reduced sensitivity experiments: real training on real data, the papers' claims.

Each test runs an experiment's reduced family through Lightning with the gapwatch
callback attached and asserts the claims that hold at this scale (see
``experiments/README.md`` for those that do not).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from experiments import forouzesh, novak, regression

pytestmark = pytest.mark.slow


def _outputs_written(out: Path) -> None:
    for name in ("figure.png", "networks.md", "networks.csv", "claims.md", "claims.csv"):
        assert (out / name).stat().st_size > 0, name


def test_forouzesh_sensitivity_tracks_heldout_loss(tmp_path):
    result = forouzesh.run(reduced=True, out=tmp_path)
    _outputs_written(tmp_path)
    assert result["fitted"] >= 4
    assert result["claim_correlation"], result["pearson_log_s_before"]
    assert result["claim_before_beats_after"]
    # Eq. 9's exponent: log L grows as half of log S across orders of magnitude.
    assert 0.4 < result["loglog_slope"] < 0.6
    assert result["with_bias_phase"] >= 1
    assert result["claim_bias_phase"]
    assert result["claim_agree_late"]


def test_novak_random_labels_raise_the_jacobian_norm(tmp_path):
    result = novak.run(reduced=True, out=tmp_path)
    _outputs_written(tmp_path)
    assert result["fitted"] == result["networks"]
    assert result["pairs"] == 2
    assert result["claim_random_higher"]
    assert result["claim_positive_correlation"]


def test_regression_sensitivity_tracks_heldout_mse(tmp_path):
    result = regression.run(reduced=True, out=tmp_path)
    _outputs_written(tmp_path)
    # For one output the callback's test_loss is the held-out MSE.
    assert result["callback_mse_error"] < 1e-5
    assert result["claim_positive_correlation"], result["pearson_s_mse"]
