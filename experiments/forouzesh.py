"""Forouzesh, Salehi & Thiran (2020): output sensitivity S predicts the held-out loss.

The family follows the paper's Figs. 2 and 3 on scikit-learn's digits: ReLU MLPs of one
to three hidden layers and ReLU CNNs without BatchNorm or Dropout, of several widths, with
every parameter drawn from the standard normal distribution (so S and the held-out loss
span orders of magnitude, as in Fig. 2), plus MLPs with PyTorch's default initialization
(Fig. 3 compares initializations). Each network is trained with Adam to (near) zero train
loss with an ``OutputSensitivity`` callback attached. Claims checked (issue 7, item 1):

1. log S (before the softmax) against the log held-out loss: Pearson >= 0.8 over the
   networks that fit their training set;
2. S before the softmax correlates better than S after it;
3. eq. 9's predicted loss lies within a factor of 2 of the measured loss at the end;
4. while the callback reports a bias-dominated phase (``bias_fraction > 0.5``), the
   bias-aware prediction is closer to the held-out loss than the variance-only one, and at
   the end the two agree (within 5%).

``python -m experiments.forouzesh [--reduced]`` prints the tables and writes them, with
a figure, to ``experiments/results/forouzesh``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch import LightningModule, seed_everything
from matplotlib import pyplot as plt
from torch import Tensor, nn

from experiments.common import OUT, main, save_figure, train, write_table
from gapwatch import OutputSensitivity
from gapwatch.demo import DigitsDataModule, digits_cnn, digits_mlp
from gapwatch.functional import output_sensitivity

SIGMA = 0.1
FIT = 0.99  # train accuracy that counts as "near-zero train loss"
AGREE = 0.05  # relative difference under which the two predictions agree
Arch = Literal["mlp", "cnn"]
Init = Literal["normal", "default"]


@dataclass(frozen=True)
class Spec:
    """One network of the family: architecture, hidden layers (MLP), width and init."""

    arch: Arch
    depth: int
    width: int
    init: Init

    @property
    def name(self) -> str:
        """A short label such as ``mlp2x128-normal``."""
        shape = f"{self.depth}x{self.width}" if self.arch == "mlp" else str(self.width)
        return f"{self.arch}{shape}-{self.init}"

    def build(self) -> nn.Module:
        """The network, initialized; CNNs without BatchNorm and Dropout (Fig. 2(c))."""
        if self.arch == "mlp":
            net = digits_mlp(self.width, self.depth)
        else:
            net = digits_cnn(self.width, batch_norm=False, dropout=0.0)
        if self.init == "normal":
            with torch.no_grad():
                for parameter in net.parameters():
                    parameter.normal_()
        return net


def family(reduced: bool) -> list[Spec]:
    """The networks to train: all of Figs. 2(b), 2(c) and 3 in miniature, or a subset."""
    if reduced:
        return [
            Spec("mlp", 1, 256, "normal"),
            Spec("mlp", 2, 128, "normal"),
            Spec("mlp", 3, 64, "normal"),
            Spec("mlp", 3, 256, "normal"),
            Spec("mlp", 2, 64, "default"),
        ]
    mlps = [
        Spec("mlp", depth, width, init)
        for init in ("normal", "default")
        for depth in (1, 2, 3)
        for width in (64, 128, 256)
    ]
    return mlps + [Spec("cnn", 1, width, "normal") for width in (4, 8, 16)]


class Classifier(LightningModule):
    """Cross-entropy training of any network with Adam.

    Adam, because its steps do not scale with the gradient: standard-normal weights make
    the gradients of the early layers grow with every layer, which SGD cannot follow at a
    single learning rate for the whole family.

    Args:
        net: Maps ``[N, 1, 8, 8]`` digits to ``[N, 10]`` logits.
        lr: Adam's learning rate.
    """

    def __init__(self, net: nn.Module, lr: float = 3e-3) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, 10]``."""
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """One cross-entropy step."""
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Held-out loss, as a user's module would log it."""
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam."""
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def fit(spec: Spec, epochs: int, seed: int = 0) -> dict[str, Any]:
    """Train one network with ``OutputSensitivity`` attached; summarize its history."""
    seed_everything(seed, verbose=False)
    model = Classifier(spec.build())
    data = DigitsDataModule(seed=seed)
    history = train(model, data, [OutputSensitivity(sigma=SIGMA, seed=seed)], max_epochs=epochs)
    heldout = data.val_set.tensors[0]
    after = output_sensitivity(
        model.net,
        heldout,
        sigma=SIGMA,
        after_softmax=True,
        generator=torch.Generator().manual_seed(seed),
    )
    final = history[-1]
    return {
        "network": spec.name,
        "group": f"{spec.arch}-{spec.init}",
        "train_acc": final["train_acc"],
        "train_loss": final["train_loss"],
        "test_loss": final["test_loss"],
        "test_acc": final["test_acc"],
        "S": final["sensitivity"],
        "S_after_softmax": float(after),
        "predicted": final["predicted_test_loss"],
        "predicted/test": final["predicted_test_loss"] / final["test_loss"],
        "bias_fraction_step0": history[0]["bias_fraction"],
        **_phases(history),
        "history": history,
    }


def _phases(history: list[dict[str, float]]) -> dict[str, Any]:
    """Claim 4 on one run: who is closer in the bias-dominated phase, agreement at the end."""

    def miss(row: dict[str, float], key: str) -> float:
        return abs(math.log(row[key] / row["test_loss"]))

    early = [row for row in history if row["bias_fraction"] > 0.5]
    closer = [
        miss(row, "predicted_test_loss_bias") < miss(row, "predicted_test_loss") for row in early
    ]
    final = history[-1]
    disagreement = final["predicted_test_loss_bias"] / final["predicted_test_loss"] - 1
    return {
        "bias_phase_evals": len(early),
        "bias_aware_closer": sum(closer) / len(closer) if closer else float("nan"),
        "final_disagreement": disagreement,
    }


def log_pearson(runs: list[dict[str, Any]], x: str, y: str = "test_loss") -> float:
    """Pearson's r between the logs of two positive columns of ``runs``."""
    columns = np.log([[run[x] for run in runs], [run[y] for run in runs]])
    return float(np.corrcoef(columns)[0, 1])


def check(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The measured numbers with one ``claim_*`` boolean per claim, and the claims table."""
    fitted = [run for run in runs if run["train_acc"] >= FIT]
    log_s, log_loss = np.log([[run[k] for run in fitted] for k in ("S", "test_loss")])
    ratios = [run["predicted/test"] for run in fitted]
    phased = [run for run in runs if run["bias_phase_evals"] > 0]
    normal = [run for run in fitted if run["group"].endswith("normal")]
    m: dict[str, Any] = {
        "networks": len(runs),
        "fitted": len(fitted),
        "pearson_log_s_before": log_pearson(fitted, "S"),
        "pearson_log_s_after": log_pearson(fitted, "S_after_softmax"),
        # Within one initialization, so that the gap between the groups cannot carry r.
        "pearson_log_s_before_normal": log_pearson(normal, "S"),
        "pearson_log_s_after_normal": log_pearson(normal, "S_after_softmax"),
        # Eq. 9 says L ~ S^(1/2): the slope of log L on log S.
        "loglog_slope": float(np.polyfit(log_s, log_loss, 1)[0]),
        "eq9_ratio_min": min(ratios),
        "eq9_ratio_max": max(ratios),
        "with_bias_phase": len(phased),
        "bias_aware_closer_min": min((r["bias_aware_closer"] for r in phased), default=math.nan),
        "final_disagreement_max": max(abs(run["final_disagreement"]) for run in runs),
    }
    m["claim_correlation"] = m["pearson_log_s_before"] >= 0.8
    m["claim_before_beats_after"] = m["pearson_log_s_before"] > m["pearson_log_s_after"]
    m["claim_eq9_within_2x"] = all(0.5 <= ratio <= 2 for ratio in ratios)
    m["claim_bias_phase"] = bool(phased) and m["bias_aware_closer_min"] == 1.0
    m["claim_agree_late"] = m["final_disagreement_max"] < AGREE
    fitted_of = f"{m['fitted']} of {m['networks']} networks with train acc >= {FIT}"
    rows = [
        (
            "claim_correlation",
            "Pearson(log S, log L) >= 0.8",
            f"{m['pearson_log_s_before']:.3f} ({fitted_of}); standard-normal init alone: "
            f"{m['pearson_log_s_before_normal']:.3f}",
        ),
        (
            "claim_before_beats_after",
            "S before softmax correlates better than after",
            f"{m['pearson_log_s_before']:.3f} vs {m['pearson_log_s_after']:.3f}; "
            f"standard-normal init alone: {m['pearson_log_s_before_normal']:.3f} vs "
            f"{m['pearson_log_s_after_normal']:.3f}",
        ),
        (
            "claim_eq9_within_2x",
            "eq. 9 within 2x of L at the end",
            f"predicted/measured in [{m['eq9_ratio_min']:.2f}, {m['eq9_ratio_max']:.2f}]; "
            f"log-log slope {m['loglog_slope']:.2f} (eq. 9: 0.5)",
        ),
        (
            "claim_bias_phase",
            "bias-aware eq. 9 closer while bias_fraction > 0.5",
            f"closer at {m['bias_aware_closer_min']:.0%} of those evaluations "
            f"(worst run; {m['with_bias_phase']} runs have such a phase)",
        ),
        (
            "claim_agree_late",
            f"both predictions agree at the end (< {AGREE:.0%})",
            f"largest relative difference {m['final_disagreement_max']:.2%}",
        ),
    ]
    claims = [{"claim": text, "measured": got, "holds": m[flag]} for flag, text, got in rows]
    return m, claims


def plot(runs: list[dict[str, Any]], path: Path) -> Path:
    """Log-log loss against S before and after the softmax, and one run's two phases.

    Hollow markers: networks that did not fit their training set (left out of the claims).
    """
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    groups = {"mlp-normal": "o", "cnn-normal": "^", "mlp-default": "s"}
    for color, (group, marker) in enumerate(groups.items()):
        members = [run for run in runs if run["group"] == group]
        for ax, key in zip(axes[:2], ("S", "S_after_softmax"), strict=True):
            for fitted in (True, False):
                points = [run for run in members if (run["train_acc"] >= FIT) == fitted]
                ax.scatter(
                    [run[key] for run in points],
                    [run["test_loss"] for run in points],
                    marker=marker,
                    edgecolors=f"C{color}",
                    facecolors=f"C{color}" if fitted else "none",
                    label=group if fitted and points else None,
                )
    order = sorted(runs, key=lambda run: run["S"])
    axes[0].plot([r["S"] for r in order], [r["predicted"] for r in order], "k--", label="eq. 9")
    for ax, title in zip(axes[:2], ("S before softmax", "S after softmax"), strict=True):
        ax.set(xscale="log", yscale="log", xlabel=title, ylabel="held-out loss")
        ax.legend()
    phased = next((run for run in runs if run["bias_phase_evals"] > 0), runs[-1])
    _plot_phases(axes[2], phased)
    return save_figure(figure, path)


def _plot_phases(ax: plt.Axes, run: dict[str, Any]) -> None:
    history = run["history"]
    steps = [row["step"] for row in history]
    for key, label in (
        ("test_loss", "held-out loss"),
        ("predicted_test_loss", "eq. 9 (variance only)"),
        ("predicted_test_loss_bias", "eq. 9 with bias"),
    ):
        ax.plot(steps, [row[key] for row in history], label=label)
    ax.set(yscale="log", xlabel="step", title=run["network"])
    ax.legend(loc="upper right")
    twin = ax.twinx()
    twin.plot(steps, [row["bias_fraction"] for row in history], "k:")
    twin.set(ylabel="bias fraction (dotted)", ylim=(0, 1))


def run(reduced: bool = False, out: Path = OUT / "forouzesh") -> dict[str, Any]:
    """Train the family, write ``networks.{md,csv}``, ``claims.{md,csv}`` and ``figure.png``.

    Args:
        reduced: Five networks and fewer epochs (about half a minute) instead of 21.
        out: Directory of the outputs.

    Returns:
        The measured numbers and ``claim_*`` booleans of :func:`check`.
    """
    epochs = 25 if reduced else 40
    runs = [fit(spec, epochs) for spec in family(reduced)]
    result, claims = check(runs)
    rows = [{k: v for k, v in run.items() if k != "history"} for run in runs]
    result["table"] = write_table(out / "networks", rows)
    result["claims"] = write_table(out / "claims", claims)
    result["figure"] = plot(runs, out / "figure")
    return result


if __name__ == "__main__":
    main(run, __doc__)
