"""Forouzesh et al. (2020), Section V-E: output sensitivity S against the held-out MSE.

A regression network has one output (K = 1): the ``OutputSensitivity`` callback then logs
S and, as ``test_loss``, the held-out mean squared error. The family mirrors the paper's
Fig. 5 on the Boston housing data the paper used (506 districts, 13 features; shipped
with ``mlxtend``, so nothing is downloaded): ReLU MLPs of three and five hidden layers and
several widths, from several initialization seeds, each trained with full-batch Adam until
it (nearly) interpolates the same 70% training split. Claim checked (issue 7, item 5): S correlates
positively with the held-out MSE across the family. Reported beside it: the Pearson r of
the logs, of the means over seeds (the paper averages over runs), and that the callback's
``test_loss`` equals an independent held-out MSE.

``python -m experiments.regression [--reduced]`` prints the tables and writes them, with
a figure, to ``experiments/results/regression``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch import LightningDataModule, LightningModule, seed_everything
from matplotlib import pyplot as plt
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from experiments.common import OUT, main, save_figure, train, write_table
from gapwatch import OutputSensitivity

EVERY = 50  # epochs between evaluations (and validations)


class HousingDataModule(LightningDataModule):
    """Boston housing (``mlxtend``), split, with inputs and target standardized on train.

    A held-out MSE of 1 is that of predicting the train mean.

    Args:
        val_fraction: Share of the districts held out.
        seed: Seeds the split.
    """

    def __init__(self, val_fraction: float = 0.3, seed: int = 0) -> None:
        super().__init__()
        self.val_fraction = val_fraction
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        """Load, split and standardize."""
        from mlxtend.data import boston_housing_data

        features, target = boston_housing_data()
        x = torch.tensor(features, dtype=torch.float32)
        y = torch.tensor(target, dtype=torch.float32)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        n_val = round(self.val_fraction * len(y))
        val, train = order[:n_val], order[n_val:]
        x = (x - x[train].mean(0)) / x[train].std(0)
        y = (y - y[train].mean()) / y[train].std()
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])

    def train_dataloader(self) -> DataLoader:
        """The whole training split as one batch."""
        return DataLoader(self.train_set, batch_size=len(self.train_set))

    def val_dataloader(self) -> DataLoader:
        """The held-out districts."""
        return DataLoader(self.val_set, batch_size=len(self.val_set))


class Regressor(LightningModule):
    """A ReLU MLP with one output, trained on the MSE with Adam.

    Args:
        width: Hidden units per layer.
        depth: Hidden layers.
        in_features: Input features.
        lr: Adam's learning rate.
    """

    def __init__(self, width: int, depth: int, in_features: int = 13, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        for d_in in [in_features] + [width] * (depth - 1):
            layers += [nn.Linear(d_in, width), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Predictions ``[N, 1]``."""
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """One MSE step."""
        x, y = batch
        return F.mse_loss(self(x).squeeze(1), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Held-out MSE."""
        x, y = batch
        self.log("val_mse", F.mse_loss(self(x).squeeze(1), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam."""
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])


def fit(width: int, depth: int, seed: int, epochs: int) -> dict[str, Any]:
    """Train one regressor with ``OutputSensitivity`` attached; its final numbers.

    ``seed`` seeds the initialization only: every network sees the same split. The train
    MSE is the callback's, on its train probe (as many districts as are held out).
    """
    seed_everything(seed, verbose=False)
    model, data = Regressor(width, depth), HousingDataModule()
    data.setup()
    x, y = data.val_set.tensors
    # A held-out probe of every held-out district, so test_loss can be checked below; the
    # same noise draws for every network.
    watcher = OutputSensitivity(every_n_epochs=EVERY, probe_size=len(y))
    history = train(model, data, [watcher], max_epochs=epochs, check_val_every_n_epoch=EVERY)
    with torch.no_grad():
        mse = F.mse_loss(model(x).squeeze(1), y).item()
    final = history[-1]
    return {
        "width": width,
        "depth": depth,
        "seed": seed,
        "train_mse": final["train_loss"],
        "test_mse": final["test_loss"],
        "S": final["sensitivity"],
        "test_mse_independent": mse,
    }


def check(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The measured numbers with one ``claim_*`` boolean, and the claims table."""
    s = np.array([run["S"] for run in runs])
    mse = np.array([run["test_mse"] for run in runs])
    independent = np.array([run["test_mse_independent"] for run in runs])
    configs = sorted({(run["depth"], run["width"]) for run in runs})
    groups = [[r for r in runs if (r["depth"], r["width"]) == config] for config in configs]
    mean_s = [np.mean([r["S"] for r in group]) for group in groups]
    mean_mse = [np.mean([r["test_mse"] for r in group]) for group in groups]
    m: dict[str, Any] = {
        "networks": len(runs),
        "pearson_s_mse": float(np.corrcoef(s, mse)[0, 1]),
        "pearson_s_mse_seed_means": float(np.corrcoef(mean_s, mean_mse)[0, 1]),
        "pearson_log_s_mse": float(np.corrcoef(np.log(s), np.log(mse))[0, 1]),
        "test_mse_min": float(mse.min()),
        "test_mse_max": float(mse.max()),
        "train_mse_max": max(run["train_mse"] for run in runs),
        "callback_mse_error": float(np.abs(mse / independent - 1).max()),
    }
    m["claim_positive_correlation"] = m["pearson_s_mse"] > 0
    claims = [
        {
            "claim": "S correlates positively with the held-out MSE",
            "measured": f"Pearson {m['pearson_s_mse']:.3f} (logs: {m['pearson_log_s_mse']:.3f}; "
            f"means over seeds: {m['pearson_s_mse_seed_means']:.3f}) over {m['networks']} "
            f"networks; held-out MSE {m['test_mse_min']:.2f}-{m['test_mse_max']:.2f}, "
            f"train MSE <= {m['train_mse_max']:.2g}",
            "holds": m["claim_positive_correlation"],
        }
    ]
    return m, claims


def plot(runs: list[dict[str, Any]], path: Path) -> Path:
    """Held-out MSE against S, one colour per depth, marker size growing with width."""
    figure, ax = plt.subplots(figsize=(5.5, 4.2))
    for depth in sorted({run["depth"] for run in runs}):
        group = [run for run in runs if run["depth"] == depth]
        ax.scatter(
            [r["S"] for r in group], [r["test_mse"] for r in group],
            s=[8 * np.log2(r["width"]) ** 1.5 for r in group], label=f"{depth} hidden layers",
        )  # fmt: skip
    ax.set(xscale="log", xlabel="S (K = 1)", ylabel="held-out MSE", title="size: width")
    ax.legend()
    return save_figure(figure, path)


def run(reduced: bool = False, out: Path = OUT / "regression") -> dict[str, Any]:
    """Train the family, write ``networks.{md,csv}``, ``claims.{md,csv}`` and ``figure.png``.

    Args:
        reduced: One depth and one seed instead of two of each.
        out: Directory of the outputs.

    Returns:
        The measured numbers and the ``claim_*`` boolean of :func:`check`.
    """
    widths = (16, 32, 64, 128, 256)
    depths, seeds, epochs = ((3,), (0,), 400) if reduced else ((3, 5), (0, 1), 400)
    runs = [fit(w, d, seed, epochs) for d in depths for w in widths for seed in seeds]
    result, claims = check(runs)
    result["table"] = write_table(out / "networks", runs)
    result["claims"] = write_table(out / "claims", claims)
    result["figure"] = plot(runs, out / "figure")
    return result


if __name__ == "__main__":
    main(run, __doc__)
