import numpy as np
import pytest
import torch

from gapwatch.functional.gap_estimator import GapEstimator


@pytest.fixture
def networks():
    """80 networks as in Zhao et al.: zeta and kappa negatively related, a noisy linear gap."""
    rng = np.random.default_rng(0)
    zeta = rng.uniform(0.1, 0.6, 80)
    kappa = 0.8 - zeta + rng.normal(0, 0.05, 80)
    gap = 0.9 * zeta - 0.4 * kappa + 0.3 + rng.normal(0, 0.02, 80)
    return zeta, kappa, gap


def test_noiseless_coefficients_are_recovered_exactly():
    rng = np.random.default_rng(1)
    zeta, kappa = rng.uniform(0, 1, 7), rng.uniform(0, 1, 7)
    gap = 0.7 * zeta - 1.3 * kappa + 0.2
    estimator = GapEstimator().fit(zeta.tolist(), kappa.tolist(), gap.tolist())
    assert estimator.coefficients == pytest.approx((0.7, -1.3, 0.2), abs=1e-12)
    assert estimator.ssr(zeta, kappa, gap) == pytest.approx(0, abs=1e-24)
    assert estimator.pearson(zeta, kappa, gap) == pytest.approx(1, abs=1e-12)
    assert estimator.leave_one_out(zeta, kappa, gap) == pytest.approx(0, abs=1e-12)


def test_fit_ssr_and_pearson_match_numpy(networks):
    zeta, kappa, gap = networks
    design = np.stack([zeta, kappa, np.ones_like(zeta)], 1)
    coef = np.linalg.lstsq(design, gap, rcond=None)[0]
    estimator = GapEstimator().fit(torch.tensor(zeta), torch.tensor(kappa), torch.tensor(gap))
    np.testing.assert_allclose(estimator.coefficients, coef, rtol=0, atol=1e-12)
    residual = gap - design @ coef
    assert estimator.ssr(zeta, kappa, gap) == pytest.approx(residual @ residual, rel=1e-12)
    r = np.corrcoef(design @ coef, gap)[0, 1]
    assert estimator.pearson(zeta, kappa, gap) == pytest.approx(r, rel=1e-12)
    assert r > 0.9  # the simulated relation is strong, as in the paper


def test_leave_one_out_matches_refitting_without_each_network(networks):
    zeta, kappa, gap = (v[:12] for v in networks)
    design = np.stack([zeta, kappa, np.ones_like(zeta)], 1)
    errors = []
    for i in range(12):
        keep = np.arange(12) != i
        coef = np.linalg.lstsq(design[keep], gap[keep], rcond=None)[0]
        errors.append(abs(gap[i] - design[i] @ coef))
    assert GapEstimator.leave_one_out(zeta, kappa, gap) == pytest.approx(np.mean(errors), 1e-10)
    assert GapEstimator().leave_one_out(zeta, kappa, gap) == pytest.approx(np.mean(errors), 1e-10)


def test_known_coefficients_predict_in_float64():
    estimator = GapEstimator(a=2.0, b=-1.0, c=0.5)
    zeta, kappa = torch.tensor([0.1, 0.3], dtype=torch.float32), np.array([0.2, 0.4])
    predicted = estimator.predict(zeta, kappa)
    assert predicted.dtype == torch.float64
    expected = 2.0 * zeta.double() - torch.tensor(kappa) + 0.5
    torch.testing.assert_close(predicted, expected, rtol=0, atol=1e-15)
    assert float(estimator.predict(torch.tensor(0.25), 0.5)) == pytest.approx(0.5)
    assert estimator.coefficients == (2.0, -1.0, 0.5)
    assert "a=2" in repr(estimator)
    assert np.isnan(estimator.pearson([0.1, 0.2], [0.1, 0.2], [1.0, 1.0]))  # constant gap


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda e: e.predict(0.1, 0.2), RuntimeError, r"call `fit"),
        (lambda e: e.coefficients, RuntimeError, r"call `fit"),
        (lambda e: e.fit([0.1, 0.2], [0.3, 0.4], [0.0, 0.1]), ValueError, "at least 3"),
        (lambda e: e.fit([0.1, 0.2, 0.3], [0.3, 0.4], [0.0, 0.1, 0.2]), ValueError, "1-D"),
        (lambda e: e.fit([0.1, np.nan, 0.3], [0.3, 0.4, 0.5], [0, 0, 0]), ValueError, "NaN"),
        (lambda e: e.leave_one_out([0.1, 0.2, 0.3], [0.3, 0.1, 0.4], [0, 1, 2]), ValueError, "4"),
        # without network 1 every zeta is 0: the fit that leaves it out is underdetermined
        (lambda e: e.leave_one_out([0, 1, 0, 0], [0, 0, 1, 2], [0, 1, 2, 3]), ValueError, "add"),
    ],
)
def test_bad_input_names_the_fix(call, error, match):
    with pytest.raises(error, match=match):
        call(GapEstimator())


def test_partial_coefficients_are_rejected():
    with pytest.raises(ValueError, match="all three"):
        GapEstimator(a=1.0, b=2.0)
