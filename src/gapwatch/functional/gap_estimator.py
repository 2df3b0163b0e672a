"""Linear estimate of the generalization gap from ablation sparsity (Zhao et al., eq. 7)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

ArrayLike = Any  # sequences, numpy arrays, tensors: anything torch.as_tensor accepts


def _as_float64(name: str, values: ArrayLike) -> Tensor:
    # dtype inside as_tensor: Python floats would otherwise pass through float32.
    tensor = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    if not torch.isfinite(tensor).all():
        raise ValueError(f"`{name}` contains NaN or infinite values; drop those networks.")
    return tensor


def _networks(zeta: ArrayLike, kappa: ArrayLike, gap: ArrayLike, minimum: int) -> list[Tensor]:
    """Check one value per network in each of the three and at least ``minimum`` networks."""
    columns = [_as_float64(n, v) for n, v in (("zeta", zeta), ("kappa", kappa), ("gap", gap))]
    if any(c.ndim != 1 for c in columns) or len({c.numel() for c in columns}) != 1:
        shapes = ", ".join(str(tuple(c.shape)) for c in columns)
        raise ValueError(
            f"`zeta`, `kappa` and `gap` must be 1-D with one value per network, got {shapes}."
        )
    if columns[0].numel() < minimum:
        raise ValueError(f"Got {columns[0].numel()} networks; this needs at least {minimum}.")
    return columns


def _design(zeta: Tensor, kappa: Tensor) -> Tensor:
    return torch.stack([zeta, kappa, torch.ones_like(zeta)], -1)


class GapEstimator:
    """Least-squares fit of ``gap = a * zeta + b * kappa + c`` over trained networks (eq. 7).

    Each network contributes one ``(zeta, kappa)`` pair (class means, eq. 6) and its
    measured generalization gap. Everything is computed in float64 on the CPU.

    Args:
        a: Coefficient of ``zeta``, for an estimator with known coefficients.
        b: Coefficient of ``kappa``.
        c: Intercept.

    Raises:
        ValueError: If only some of ``a``, ``b``, ``c`` are given.

    Example:
        Fit on many trained networks, then estimate the gap of a new one::

            estimator = GapEstimator().fit(zetas, kappas, gaps)  # one entry per network
            estimator.predict(result.zeta, result.kappa)  # result = unit_ablation(...)
    """

    def __init__(self, a: float | None = None, b: float | None = None, c: float | None = None):
        given = [v is not None for v in (a, b, c)]
        if any(given) and not all(given):
            raise ValueError("Give all three coefficients a, b, c, or none and call `fit`.")
        self._coef = torch.tensor([a, b, c], dtype=torch.float64) if all(given) else None

    def __repr__(self) -> str:
        if self._coef is None:
            return "GapEstimator(unfitted)"
        a, b, c = self.coefficients
        return f"GapEstimator(a={a:.6g}, b={b:.6g}, c={c:.6g})"

    @property
    def coefficients(self) -> tuple[float, float, float]:
        """``(a, b, c)``.

        Raises:
            RuntimeError: Before ``fit`` on an estimator built without coefficients.
        """
        return tuple(self._fitted().tolist())

    def _fitted(self) -> Tensor:
        if self._coef is None:
            raise RuntimeError(
                "The GapEstimator has no coefficients yet: call `fit(zeta, kappa, gap)` or "
                "construct it as `GapEstimator(a, b, c)`."
            )
        return self._coef

    def fit(self, zeta: ArrayLike, kappa: ArrayLike, gap: ArrayLike) -> GapEstimator:
        """Fit ``a, b, c`` by least squares (minimum-norm if the design is degenerate).

        Args:
            zeta: ``[P]`` one value per network.
            kappa: ``[P]``.
            gap: ``[P]`` measured generalization gaps.

        Returns:
            ``self``.

        Raises:
            ValueError: With fewer than 3 networks, mismatched shapes or non-finite values.
        """
        zeta, kappa, gap = _networks(zeta, kappa, gap, 3)
        solution = torch.linalg.lstsq(_design(zeta, kappa), gap[:, None], driver="gelsd")
        self._coef = solution.solution[:, 0]
        return self

    def predict(self, zeta: ArrayLike, kappa: ArrayLike) -> Tensor:
        """Estimated gap ``a * zeta + b * kappa + c`` (eq. 7).

        Args:
            zeta: Scalar or array of zeta values.
            kappa: Scalar or array of kappa values, broadcastable with ``zeta``.

        Returns:
            float64 CPU tensor of the broadcast shape.

        Raises:
            RuntimeError: Before ``fit``.
        """
        a, b, c = self._fitted()
        return a * _as_float64("zeta", zeta) + b * _as_float64("kappa", kappa) + c

    def ssr(self, zeta: ArrayLike, kappa: ArrayLike, gap: ArrayLike) -> float:
        """Sum of squared residuals of the current coefficients on these networks.

        Args:
            zeta: ``[P]``.
            kappa: ``[P]``.
            gap: ``[P]`` measured gaps.

        Returns:
            ``sum_i (predict(zeta_i, kappa_i) - gap_i) ** 2``.
        """
        zeta, kappa, gap = _networks(zeta, kappa, gap, 1)
        return float(((self.predict(zeta, kappa) - gap) ** 2).sum())

    def pearson(self, zeta: ArrayLike, kappa: ArrayLike, gap: ArrayLike) -> float:
        """Pearson correlation between estimated and measured gaps.

        Args:
            zeta: ``[P]``, ``P >= 2``.
            kappa: ``[P]``.
            gap: ``[P]`` measured gaps.

        Returns:
            Pearson r, NaN when either side is constant.
        """
        zeta, kappa, gap = _networks(zeta, kappa, gap, 2)
        pred = self.predict(zeta, kappa)
        pred, true = pred - pred.mean(), gap - gap.mean()
        denominator = (pred.square().sum() * true.square().sum()).sqrt()
        return float((pred * true).sum() / denominator) if denominator > 0 else float("nan")

    @staticmethod
    def leave_one_out(zeta: ArrayLike, kappa: ArrayLike, gap: ArrayLike) -> float:
        """Mean absolute error of predicting each network from a fit to all the others.

        Uses the exact identity for least squares: the left-out residual equals the
        in-sample residual divided by ``1 - h_ii``, ``h`` the hat matrix; no refitting.

        Args:
            zeta: ``[P]``, ``P >= 4``.
            kappa: ``[P]``.
            gap: ``[P]`` measured gaps.

        Returns:
            The mean over networks of ``|gap_i - prediction without network i|``.

        Raises:
            ValueError: With fewer than 4 networks, or if leaving some network out makes
                the fit underdetermined (it alone fixes a coefficient).
        """
        zeta, kappa, gap = _networks(zeta, kappa, gap, 4)
        design = _design(zeta, kappa)
        if torch.linalg.matrix_rank(design) < 3:
            raise ValueError("zeta, kappa and a constant are collinear over these networks.")
        q = torch.linalg.qr(design).Q
        residual = gap - q @ (q.T @ gap)
        leverage = q.square().sum(1)
        if (1 - leverage).min() < 1e-10:
            raise ValueError(
                "Leaving out one of these networks leaves the fit underdetermined; "
                "add networks with more varied zeta and kappa."
            )
        return float((residual / (1 - leverage)).abs().mean())
