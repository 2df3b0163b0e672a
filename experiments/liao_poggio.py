"""Liao & Poggio: the normalized train loss predicts the normalized held-out loss.

The family follows the paper's Fig. 12 (and appendix D) on scikit-learn's digits: the
demo's ReLU MLP (two hidden layers of 64), trained with the demo's SGD, that differ only
in the scale of their initial weights, each trained with a ``NormalizedLoss`` callback
attached. Claims checked (issue 7, item 3):

1. across the family, the normalized held-out loss is a linear function of the
   normalized train loss (R^2 >= 0.9; the paper reports a slope near 1);
2. the unnormalized losses are not (R^2 < 0.9).

And one open question, measured rather than assumed: is the normalized train loss, which
needs no held-out data, a usable ``EarlyStopping`` signal? Each network is trained once
with ``EarlyStopping(monitor="gapwatch/normalized_train_loss", min_delta=1e-5,
patience=3)``, the recipe of ``NormalizedLoss``'s docstring for values that differ only
in the 4th or 5th decimal, and once without; the stop is compared with the epochs of the
best held-out loss and accuracy. The stopped run must retrace the start of the full run
exactly (checked), which also shows that neither callback changes training.

``python -m experiments.liao_poggio [--reduced]`` prints the tables and writes them, with
a figure, to ``experiments/results/liao_poggio``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback, EarlyStopping
from matplotlib import pyplot as plt

from experiments.common import OUT, main, save_figure, train, write_table
from gapwatch import NormalizedLoss
from gapwatch.demo import DigitsClassifier, DigitsDataModule, digits_mlp

WIDTH = 64
LINEAR = 0.9  # R^2 that counts as "linear"
LN_K = math.log(DigitsDataModule.num_classes)
MONITOR = "gapwatch/normalized_train_loss"
STOPPING = {"min_delta": 1e-5, "patience": 3}


def fit(scale: float, epochs: int, *callbacks: Callback) -> list[dict[str, float]]:
    """Train the MLP initialized at ``scale`` with ``NormalizedLoss`` (and ``callbacks``).

    Returns:
        The callback's history: step 0, then one evaluation per epoch.
    """
    seed_everything(0, verbose=False)
    model = DigitsClassifier(arch="mlp", width=WIDTH)
    model.net = digits_mlp(WIDTH, init_scale=scale)  # the demo's MLP, rescaled at init
    data = DigitsDataModule(flatten=True)
    return train(model, data, [NormalizedLoss(), *callbacks], max_epochs=epochs)


def measure(scale: float, epochs: int) -> dict[str, Any]:
    """One network: its final losses and where EarlyStopping on the normalized loss stops."""
    stopper = EarlyStopping(monitor=MONITOR, **STOPPING)
    stopped = fit(scale, epochs, stopper)
    full = stopped if len(stopped) > epochs else fit(scale, epochs)
    test_loss = [row["test_loss"] for row in full]
    test_acc = [row["test_acc"] for row in full]
    stop = len(stopped) - 1  # epochs trained when EarlyStopping fired (or the cap)
    best = int(np.argmin(test_loss))
    final = full[-1]
    return {
        "init_scale": scale,
        "train_acc": final["train_acc"],
        "test_acc": final["test_acc"],
        "train_loss": final["train_loss"],
        "test_loss": final["test_loss"],
        # Normalized losses sit just below ln K; the distance to it carries the signal.
        "lnK-normalized_train": LN_K - final["normalized_train_loss"],
        "lnK-normalized_test": LN_K - final["normalized_test_loss"],
        "stopped": stopper.stopped_epoch > 0,
        "stop_epoch": stop,
        "best_test_loss_epoch": best,
        "best_test_acc_epoch": int(np.argmax(test_acc)),
        "test_loss_at_stop": test_loss[stop],
        "best_test_loss": test_loss[best],
        "retraced": stopped == full[: len(stopped)],
        "history": full,
    }


def r_squared(x: list[float], y: list[float]) -> float:
    """R^2 of the least-squares line of ``y`` on ``x`` (the squared Pearson r)."""
    return float(np.corrcoef(x, y)[0, 1] ** 2)


def check(runs: list[dict[str, Any]], epochs: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The measured numbers with one ``claim_*`` boolean per claim, and the claims table."""
    # Distances to ln K: an affine change of both axes, so R^2 and the slope are unchanged.
    normalized = [
        [run[key] for run in runs] for key in ("lnK-normalized_train", "lnK-normalized_test")
    ]
    slope = float(np.polyfit(*normalized, 1)[0])
    m: dict[str, Any] = {
        "networks": len(runs),
        "r2_normalized": r_squared(*normalized),
        "slope_normalized": slope,
        "r2_unnormalized": r_squared(
            [run["train_loss"] for run in runs], [run["test_loss"] for run in runs]
        ),
        "stops_before_cap": sum(run["stop_epoch"] < epochs for run in runs),
        "stop_minus_best_loss_epoch": [
            run["stop_epoch"] - run["best_test_loss_epoch"] for run in runs
        ],
        "retraced": all(run["retraced"] for run in runs),
    }
    m["claim_normalized_linear"] = m["r2_normalized"] >= LINEAR
    m["claim_unnormalized_not_linear"] = m["r2_unnormalized"] < LINEAR
    claims = [
        {
            "claim": f"normalized test vs train loss linear (R^2 >= {LINEAR})",
            "measured": f"R^2 {m['r2_normalized']:.5f}, slope {slope:.3f} over "
            f"{len(runs)} networks",
            "holds": m["claim_normalized_linear"],
        },
        {
            "claim": f"unnormalized test vs train loss not linear (R^2 < {LINEAR})",
            "measured": f"R^2 {m['r2_unnormalized']:.3f}",
            "holds": m["claim_unnormalized_not_linear"],
        },
        {
            "claim": "(open question) EarlyStopping on normalized_train_loss stops near "
            "the best held-out loss",
            "measured": f"stopped before the {epochs}-epoch cap in {m['stops_before_cap']} "
            f"of {len(runs)} runs; stop minus best-loss epoch: "
            f"{m['stop_minus_best_loss_epoch']}",
            "holds": "see networks table",
        },
    ]
    return m, claims


def plot(runs: list[dict[str, Any]], path: Path) -> Path:
    """Unnormalized and normalized test-vs-train losses, and the held-out loss over epochs.

    In the right panel a cross marks where EarlyStopping on the normalized train loss
    stopped, a circle the epoch of the best held-out loss.
    """
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for color, run in enumerate(runs):
        style = {"color": f"C{color}", "label": f"init x{run['init_scale']:g}"}
        axes[0].scatter(run["train_loss"], run["test_loss"], **style)
        axes[1].scatter(run["lnK-normalized_train"], run["lnK-normalized_test"], **style)
        test_loss = [row["test_loss"] for row in run["history"]]
        axes[2].plot(test_loss, **style)
        axes[2].plot(run["stop_epoch"], test_loss[run["stop_epoch"]], "x", ms=10, c=f"C{color}")
        axes[2].plot(run["best_test_loss_epoch"], min(test_loss), "o", mfc="none", c=f"C{color}")
    reach = max(run["lnK-normalized_train"] for run in runs)
    axes[1].plot([0, reach], [0, reach], "k:", label="test = train")
    axes[0].set(xscale="log", xlabel="train loss", ylabel="held-out loss", title="unnormalized")
    axes[1].set(
        xlabel="ln K - normalized train loss",
        ylabel="ln K - normalized held-out loss",
        title="normalized (layerwise Frobenius)",
    )
    axes[2].set(yscale="log", xlabel="epoch", ylabel="held-out loss", title="x: stop, o: best")
    axes[1].legend()
    return save_figure(figure, path)


def run(reduced: bool = False, out: Path = OUT / "liao_poggio") -> dict[str, Any]:
    """Train the family, write ``networks.{md,csv}``, ``claims.{md,csv}`` and ``figure.png``.

    Args:
        reduced: Four initialization scales and 30 epochs (about half a minute) instead of
            six scales and 60 epochs.
        out: Directory of the outputs.

    Returns:
        The measured numbers and ``claim_*`` booleans of :func:`check`, plus the markdown
        tables (``table``, ``claims``) and the figure's path (``figure``).
    """
    # Up to x6 every network fits its training set, as in the paper; x8 does not within
    # 60 epochs (train acc 0.998), and its outlying losses alone would make the
    # unnormalized R^2 0.9 (see the README).
    scales = (0.5, 2.0, 4.0, 6.0) if reduced else (0.25, 0.5, 1.0, 2.0, 4.0, 6.0)
    epochs = 30 if reduced else 60
    runs = [measure(scale, epochs) for scale in scales]
    result, claims = check(runs, epochs)
    rows = [{k: v for k, v in run.items() if k != "history"} for run in runs]
    result["table"] = write_table(out / "networks", rows)
    result["claims"] = write_table(out / "claims", claims)
    result["figure"] = plot(runs, out / "figure")
    return result


if __name__ == "__main__":
    main(run, __doc__)
