"""Zhao et al.: unit-ablation sparsity zeta and kappa track the generalization gap.

The family follows the paper's label-corruption experiment (Fig. 2, appendix) on
scikit-learn's digits: a share in {0, 0.2, 0.4, 0.6, 0.8, 1.0} of the training labels is
replaced by random classes, and each network is trained until it fits its (corrupted)
training set, train accuracy above 0.99, with a ``UnitAblation`` callback attached and
``EarlyStopping`` watching the callback's ``train_acc``. Two architectures: a VGG in
miniature (four 3x3 convs, two hidden fully connected layers; the last conv is ablated,
as the paper ablates VGG16's ``block5_conv3``) and the demo's two-conv CNN with a linear
head. Both without BatchNorm and Dropout, trained with Adam: with the demo's SGD they fit
only about half of fully random labels in 150 epochs. Claims checked (issue 7, item 4):

1. zeta rises and kappa falls with the corruption (Spearman rank correlation >= 0.8 and
   <= -0.8: a monotone trend up to a swap or two);
2. ``GapEstimator`` (eq. 7) fitted on the family has Pearson >= 0.9 between estimated and
   measured gaps; its leave-one-out error is reported.

Eq. 3's turning point ``n0_r`` is the *last* maximum of ``E_r`` (the end of the plateau
after which the paper says accuracy "would drop abruptly"): a network at 100% train
accuracy starts ``E_r`` at its maximum, so a first maximum would always be ``n = 0``.
This experiment is what showed it; ``unit_ablation`` now takes the last maximum, and,
as the authors' code does, before ``n = M`` (issue 15): for the class an all-zero layer
predicts ``E_r(M) = 1`` is always a maximum. kappa is logged as eq. 5 is printed
(``kappa="paper"``); the authors' signed mean (``kappa="authors"``) is computed from the
same final curves and its trend reported beside it.

``python -m experiments.zhao [--reduced]`` prints the tables and writes them, with a
figure, to ``experiments/results/zhao``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import EarlyStopping
from matplotlib import pyplot as plt
from scipy.stats import spearmanr
from torch import nn

from experiments.common import OUT, main, save_figure, train, write_table
from experiments.forouzesh import Classifier
from gapwatch import GapEstimator, UnitAblation
from gapwatch.demo import DigitsDataModule, digits_cnn
from gapwatch.functional import AblationResult
from gapwatch.functional.ablation import ablation_summary

CORRUPTION = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
FIT = 0.99  # train accuracy above which a network counts as fitted
TREND = 0.8  # |Spearman rho| that counts as rising or falling
PEARSON = 0.9
LR = 2e-3
EVERY = 5  # epochs between evaluations: one ablation costs about two training epochs
MAX_EPOCHS = 150
# 270 training digits: random labels are fitted in ~70 epochs; the other 1,527 are held out.
VAL_FRACTION = 0.85


def vgg_like(width: int = 16, hidden: int = 64) -> nn.Sequential:
    """VGG in miniature for ``[N, 1, 8, 8]`` digits; its last conv's ReLU is module ``"8"``.

    Two blocks of two 3x3 convs (``width`` then ``2 * width`` channels), each block
    followed by 2x2 max pooling, then two hidden fully connected layers and the classifier.
    """
    layers: list[nn.Module] = []
    for c_in, c_out in ((1, width), (width, 2 * width)):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
        layers += [nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    layers += [nn.Flatten(), nn.Linear(2 * width * 4, hidden), nn.ReLU()]
    layers += [nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)]
    return nn.Sequential(*layers)


#: name -> (network builder, ablated layer inside the LightningModule)
ARCHS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "vgg-like": (vgg_like, "net.8"),
    "cnn-2conv": (lambda: digits_cnn(16, batch_norm=False, dropout=0.0), "net.5"),
}


def fit(arch: str, corruption: float) -> dict[str, Any]:
    """Train one network until it fits its training labels; summarize the last evaluation.

    The callback evaluates every ``EVERY`` epochs; between evaluations ``EarlyStopping``
    sees the last value, so training stops at the first evaluation above ``FIT``.
    """
    seed_everything(0, verbose=False)
    build, layer = ARCHS[arch]
    ablation = UnitAblation(layer=layer, every_n_epochs=EVERY)
    fitted = EarlyStopping(
        monitor="gapwatch/train_acc", mode="max", stopping_threshold=FIT, patience=MAX_EPOCHS
    )
    data = DigitsDataModule(label_noise=corruption, val_fraction=VAL_FRACTION)
    model = Classifier(build(), lr=LR)
    # Validating at the evaluations only: nothing here reads the validation loop's metrics.
    history = train(
        model, data, [ablation, fitted], max_epochs=MAX_EPOCHS, check_val_every_n_epoch=EVERY
    )
    final = history[-1]
    result: AblationResult = ablation.proxies[-1].last_result  # the final evaluation's
    authors = ablation_summary(result.curves, result.curves_reversed, chance=0.1, kappa="authors")
    return {
        "arch": arch,
        "corruption": corruption,
        "epochs": (len(history) - 1) * EVERY,  # step 0, then one evaluation per EVERY
        "train_acc": final["train_acc"],
        "test_acc": final["test_acc"],
        "gap": final["gap"],
        "zeta": final["ablation_zeta"],
        "kappa": final["ablation_kappa"],
        "kappa_authors": float(authors.kappa),
        "n0": float(result.n0.float().mean()),
        "n0_r": float(result.n0_r.float().mean()),
    }


def _column(runs: list[dict[str, Any]], key: str) -> list[float]:
    return [run[key] for run in runs]


def _gap_fit(runs: list[dict[str, Any]], kappa: str = "kappa") -> tuple[GapEstimator, float, float]:
    """Eq. 7 fitted on ``runs``: the estimator, its Pearson r and leave-one-out error.

    ``kappa``: the column used for kappa, ``"kappa"`` (eq. 5) or ``"kappa_authors"``.
    """
    columns = [_column(runs, key) for key in ("zeta", kappa, "gap")]
    estimator = GapEstimator().fit(*columns)
    return estimator, estimator.pearson(*columns), GapEstimator.leave_one_out(*columns)


def check(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The measured numbers with one ``claim_*`` boolean per claim, and the claims table."""
    m: dict[str, Any] = {"min_train_acc": min(_column(runs, "train_acc"))}
    m["claim_fitted"] = m["min_train_acc"] > FIT
    claims = [
        {
            "claim": f"every network fits its training labels (train acc > {FIT})",
            "measured": f"lowest train acc {m['min_train_acc']:.3f}",
            "holds": m["claim_fitted"],
        }
    ]
    groups = {arch: [run for run in runs if run["arch"] == arch] for arch in ARCHS}
    groups = {name: members for name, members in groups.items() if members}
    for arch, members in groups.items():
        corruption = _column(members, "corruption")
        trends = (("zeta", 1, "rises"), ("kappa", -1, "falls"), ("kappa_authors", -1, "falls"))
        for key, sign, verb in trends:
            rho = _spearman(corruption, _column(members, key))
            m[f"spearman_{key}_{arch}"] = rho
            m[f"claim_{key}_{verb}_{arch}"] = sign * rho >= TREND
            claims.append(
                {
                    "claim": f"[{arch}] {key} {verb} with corruption",
                    "measured": f"Spearman {rho:+.2f}; {_series(members, key)}",
                    "holds": m[f"claim_{key}_{verb}_{arch}"],
                }
            )
    if len(groups) > 1:
        groups["all"] = runs
    fits = (("kappa", "", ""), ("kappa_authors", "_authors", " (authors' kappa)"))
    for (name, members), (kappa, suffix, label) in itertools.product(groups.items(), fits):
        estimator, pearson, loo = _gap_fit(members, kappa)
        m[f"pearson{suffix}_{name}"], m[f"loo_mae{suffix}_{name}"] = pearson, loo
        m[f"claim_pearson{suffix}_{name}"] = pearson >= PEARSON
        claims.append(
            {
                "claim": f"[{name}] GapEstimator{label} Pearson >= {PEARSON}",
                "measured": f"Pearson {pearson:.3f} over {len(members)} networks, "
                f"leave-one-out mean abs error {loo:.3f}; {estimator!r}",
                "holds": m[f"claim_pearson{suffix}_{name}"],
            }
        )
    return m, claims


def _spearman(x: list[float], y: list[float]) -> float:
    # Rounded: the rho of a few ranks is a simple fraction (0.8 for four) that the
    # computation misses by an ulp, which would flip a ``>= TREND`` comparison.
    return round(float(spearmanr(x, y).statistic), 9)


def _series(runs: list[dict[str, Any]], key: str) -> str:
    return " / ".join(f"{run[key]:.2f}" for run in runs)


def plot(runs: list[dict[str, Any]], path: Path) -> Path:
    """Zeta and kappa against the corruption, and eq. 7's estimated gap against the measured."""
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for color, arch in enumerate(ARCHS):
        members = [run for run in runs if run["arch"] == arch]
        if not members:
            continue
        corruption = _column(members, "corruption")
        style = {"color": f"C{color}", "marker": "o"}
        axes[0].plot(corruption, _column(members, "zeta"), label=f"{arch}: zeta", **style)
        axes[1].plot(corruption, _column(members, "kappa"), label=f"{arch}: eq. 5", **style)
        authors = _column(members, "kappa_authors")
        axes[1].plot(corruption, authors, "--", label=f"{arch}: authors' code", **style)
        estimator, _, _ = _gap_fit(members)
        estimate = estimator.predict(_column(members, "zeta"), _column(members, "kappa"))
        axes[2].scatter(_column(members, "gap"), estimate.tolist(), label=arch, c=f"C{color}")
    axes[2].plot([0, 1], [0, 1], "k:", label="estimate = gap")
    axes[0].set(xlabel="label corruption", ylabel="zeta (eq. 6)")
    axes[1].set(xlabel="label corruption", ylabel="kappa (eq. 6)")
    axes[2].set(xlabel="measured gap (train acc - test acc)", ylabel="eq. 7 estimate")
    for ax in axes:
        ax.legend()
    return save_figure(figure, path)


def run(reduced: bool = False, out: Path = OUT / "zhao") -> dict[str, Any]:
    """Train the family, write ``networks.{md,csv}``, ``claims.{md,csv}`` and ``figure.png``.

    Args:
        reduced: The VGG-like network at four corruption levels (about half a minute)
            instead of both architectures at six.
        out: Directory of the outputs.

    Returns:
        The measured numbers and ``claim_*`` booleans of :func:`check`, plus the markdown
        tables (``table``, ``claims``) and the figure's path (``figure``).
    """
    archs = ["vgg-like"] if reduced else list(ARCHS)
    levels = (0.0, 0.4, 0.8, 1.0) if reduced else CORRUPTION
    runs = [fit(arch, level) for arch in archs for level in levels]
    result, claims = check(runs)
    result["table"] = write_table(out / "networks", runs)
    result["claims"] = write_table(out / "claims", claims)
    result["figure"] = plot(runs, out / "figure")
    return result


if __name__ == "__main__":
    main(run, __doc__)
