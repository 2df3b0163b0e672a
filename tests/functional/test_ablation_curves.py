import numpy as np
import pytest
import torch

from gapwatch.functional.ablation import ablation_summary

# ---------------------------------------------------------------- independent references


def authors_quantities(curve, curve_reversed, chance):
    """Eqs. 2-5 as the authors' code computes them, in numpy, for one class.

    ``n0``: the first ``n`` with ``E(n) <= chance``, else ``argmin E``; ``n0_r``: the last
    maximum of ``E_r`` without ``n = M`` (``target_curve[::-1][1:]``); ``kappa``: the signed
    mean of ``E_r - E`` over the ``M + 1`` levels. Also eq. 5 as printed, for comparison.
    """
    e, e_r = np.asarray(curve, dtype=np.float64), np.asarray(curve_reversed, dtype=np.float64)
    m = len(e) - 1
    # The curves are float32 (1/10 is 0.1f): compared with chance at the same precision.
    below = np.where(e.astype(np.float32) <= np.float32(chance))[0]
    n0 = int(below[0]) if len(below) else int(np.argmin(e))
    n0_r = m - 1 - int(np.argmax(e_r[::-1][1:]))
    return {
        "n0": n0,
        "n0_r": n0_r,
        "zeta": (n0 + m - n0_r) / (2 * m),
        "kappa_authors": float(np.mean(e_r - e)),
        "kappa_paper": float(np.sum(np.abs(e_r - e)) / m),
    }


def assert_matches_authors(result, chance):
    """Every class of ``result`` against :func:`authors_quantities` on its own curves."""
    for row in range(len(result.classes)):
        ref = authors_quantities(result.curves[row], result.curves_reversed[row], chance)
        assert result.n0[row].item() == ref["n0"]
        assert result.n0_r[row].item() == ref["n0_r"]
        assert result.zeta_per_class[row].item() == pytest.approx(ref["zeta"], abs=1e-6)
    return [
        authors_quantities(result.curves[r], result.curves_reversed[r], chance)
        for r in range(len(result.classes))
    ]


# ---------------------------------------------------------------- eqs. 2-6 by hand


def test_summary_matches_hand_computation():
    curves = torch.tensor([[1.0, 0.6, 0.25, 0.0, 0.0], [1.0, 1.0, 0.9, 0.5, 0.3]])
    reversed_ = torch.tensor([[1.0, 1.0, 1.0, 0.5, 0.0], [0.5, 0.6, 0.9, 0.9, 0.3]])
    result = ablation_summary(curves, reversed_, chance=0.25)
    # class 0: E hits chance (<=) at n=2; E_r's plateau at its maximum ends at n=2.
    # class 1: E never reaches chance -> n0 = its first minimum, n=4; E_r's last maximum
    # is at n=3.
    assert result.n0.tolist() == [2, 4]
    assert result.n0_r.tolist() == [2, 3]
    assert result.zeta_per_class.tolist() == pytest.approx([(2 + 4 - 2) / 8, (4 + 4 - 3) / 8])
    kappa = [(0 + 0.4 + 0.75 + 0.5 + 0) / 4, (0.5 + 0.4 + 0 + 0.4 + 0) / 4]
    assert result.kappa_per_class.tolist() == pytest.approx(kappa, abs=1e-6)
    assert result.zeta.item() == pytest.approx((0.5 + 0.625) / 2)
    assert result.kappa.item() == pytest.approx(sum(kappa) / 2, abs=1e-6)
    assert result.zeta.ndim == result.kappa.ndim == 0
    assert result.classes.tolist() == [0, 1]


def test_n0_r_excludes_the_end_point_for_the_class_an_empty_layer_predicts():
    # Class 0 is the one an all-zero layer predicts: E_r(M) = E(M) = 1, a maximum that
    # would give M - n0_r = 0. The plateau before it ends at n = 2.
    curves = torch.tensor([[1.0, 0.8, 0.1, 0.2, 1.0], [1.0, 0.5, 0.0, 0.0, 0.0]])
    reversed_ = torch.tensor([[1.0, 1.0, 1.0, 0.4, 1.0], [1.0, 1.0, 0.75, 0.75, 0.0]])
    result = ablation_summary(curves, reversed_, chance=0.25)
    assert result.n0_r.tolist() == [2, 1]
    assert result.n0.tolist() == [2, 2]
    assert result.zeta_per_class.tolist() == pytest.approx([(2 + 2) / 8, (2 + 3) / 8])
    refs = assert_matches_authors(result, chance=0.25)
    assert [r["n0_r"] for r in refs] == [2, 1]


def test_n0_falls_back_to_the_first_minimum_when_e_never_reaches_chance():
    # E dips to 0.4 at n = 2 and 3, never to chance 0.25, and climbs back to 1 at n = M:
    # n0 is the first minimum (the authors' argmin), not M.
    curves = torch.tensor([[1.0, 0.6, 0.4, 0.4, 1.0], [1.0, 0.9, 0.8, 0.7, 0.6]])
    reversed_ = torch.tensor([[1.0, 1.0, 0.9, 0.5, 1.0], [1.0, 1.0, 1.0, 0.9, 0.6]])
    result = ablation_summary(curves, reversed_, chance=0.25)
    assert result.n0.tolist() == [2, 4]
    assert_matches_authors(result, chance=0.25)


def test_kappa_paper_and_authors_implement_their_equations():
    # The curves cross in class 1 (E above E_r at n = 1): the signed mean subtracts there.
    curves = torch.tensor([[1.0, 0.6, 0.25, 0.0, 0.0], [1.0, 0.9, 0.2, 0.0, 0.0]])
    reversed_ = torch.tensor([[1.0, 1.0, 1.0, 0.5, 0.0], [1.0, 0.3, 0.6, 0.1, 0.0]])
    paper = ablation_summary(curves, reversed_, chance=0.25)
    authors = ablation_summary(curves, reversed_, chance=0.25, kappa="authors")
    by_hand_paper = [(0 + 0.4 + 0.75 + 0.5 + 0) / 4, (0 + 0.6 + 0.4 + 0.1 + 0) / 4]
    by_hand_authors = [(0 + 0.4 + 0.75 + 0.5 + 0) / 5, (0 - 0.6 + 0.4 + 0.1 + 0) / 5]
    assert paper.kappa_per_class.tolist() == pytest.approx(by_hand_paper, abs=1e-6)
    assert authors.kappa_per_class.tolist() == pytest.approx(by_hand_authors, abs=1e-6)
    assert authors.kappa.item() == pytest.approx(sum(by_hand_authors) / 2, abs=1e-6)
    refs = assert_matches_authors(authors, chance=0.25)
    assert [r["kappa_authors"] for r in refs] == pytest.approx(by_hand_authors, abs=1e-6)
    assert [r["kappa_paper"] for r in refs] == pytest.approx(by_hand_paper, abs=1e-6)
    # Only kappa depends on the option.
    for field in ("n0", "n0_r", "zeta_per_class", "curves", "curves_reversed"):
        assert torch.equal(getattr(paper, field), getattr(authors, field))
    with pytest.raises(ValueError, match=r"Unknown kappa 'signed'.*'paper', 'authors'"):
        ablation_summary(curves, reversed_, chance=0.25, kappa="signed")


def test_summary_rejects_mismatched_curves():
    with pytest.raises(ValueError, match="M >= 1"):
        ablation_summary(torch.ones(2, 5), torch.ones(2, 4), chance=0.1)
