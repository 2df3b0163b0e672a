"""The cross-run report on a real, tiny sweep made by ``examples/sweep_digits.py``."""

from __future__ import annotations

import csv
import importlib.util
import math
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.stats
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.image import imread

from gapwatch import GapEstimator, GeneralizationMonitor
from gapwatch.report import (
    CORRELATION_FIELDS,
    ReportError,
    build_report,
    fit_gap,
    kendall,
    pearson,
    write_report,
)
from gapwatch.report_runs import hyperparameters
from gapwatch.report_stats import LARGER_GENERALIZES_BETTER
from tests.callbacks.conftest import fit, read_scalars
from tests.test_report_stats import brute_force

SWEEP_SCRIPT = Path(__file__).parents[1] / "examples" / "sweep_digits.py"
TINY = {
    "epochs": 2,
    "probe_size": 64,
    "accelerator": "cpu",
    "devices": 1,
    "limit_train_batches": 4,
    "limit_val_batches": 1,
    "log_every_n_steps": 1,
    "every_n_epochs": 1,
    "figures_every_n_evaluations": 1000,  # figures at the first and last only: they are slow
}
PROXIES = {
    "ablation_kappa", "ablation_zeta", "bias_fraction", "jacobian_norm", "log_norm_product",
    "normalized_test_loss", "normalized_train_loss", "predicted_test_loss",
    "predicted_test_loss_bias", "sensitivity", "margin_q10", "distance_from_init",
    "prediction_changes",
}  # fmt: skip
MEASURED = ["test_loss", "gap", "test_acc", "train_acc", "train_loss"]


def tiny_sweep(logdir: Path, widths: tuple[int, ...], noises: tuple[float, ...]) -> list[Path]:
    """Run the example's ``sweep`` function with a few batches per run."""
    spec = importlib.util.spec_from_file_location("sweep_digits", SWEEP_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sweep(logdir, widths=widths, noises=noises, lrs=(0.05,), **TINY)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six sweep runs, plus one run that logged the losses and the gap but no proxy."""
    root = tmp_path_factory.mktemp("sweep")
    tiny_sweep(root, widths=(4, 16), noises=(0.0, 0.5, 1.0))
    monitor = GeneralizationMonitor(
        sensitivity=False,
        jacobian=False,
        normalized_loss=False,
        ablation=False,
        margin=False,
        distance_from_init=False,
        prediction_changes=False,
        probe_size=64,
    )
    logger = TensorBoardLogger(root, name="losses_only")
    fit(root, [monitor], logger=logger, max_epochs=1, limit_train_batches=4, log_every_n_steps=1)
    return root


@pytest.fixture(scope="module")
def written(logdir: Path) -> tuple[Any, list[Path]]:
    report = build_report(logdir)
    return report, write_report(report, logdir / "out")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def values(rows: list[dict[str, str]], name: str) -> np.ndarray:
    return np.array([float(row[name]) if row[name] else math.nan for row in rows])


def section(markdown: str, title: str) -> str:
    return markdown.split(f"## {title}")[1].split("\n## ")[0]


def table_rows(markdown: str, title: str) -> list[list[str]]:
    """The cells of the data rows of the table in section ``title``."""
    lines = [line for line in section(markdown, title).splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_runs_table_holds_the_final_value_of_every_metric(logdir: Path, written: Any) -> None:
    _, paths = written
    names = ["report.md", "runs.csv", "correlations.csv", "rankings.csv"]
    assert [p.name for p in paths[:4]] == names
    rows = read_csv(paths[1])
    expected = [f"w{w}_noise{n}_lr0.05/version_0" for w in (4, 16) for n in (0.0, 0.5, 1.0)]
    assert [row["run"] for row in rows] == ["losses_only/version_0", *expected]
    assert list(rows[0])[:6] == ["run", *MEASURED]
    assert set(rows[0]) == {"run", *MEASURED, *PROXIES}  # no within-run corr/<proxy>
    for row in rows:
        # Read back independently: the value at the highest step of each tag.
        logged = read_scalars(logdir / row["run"])
        assert "gapwatch/corr/sensitivity" in logged or row["run"].startswith("losses")
        for name, cell in row.items():
            if name != "run" and cell:
                steps = logged[f"gapwatch/{name}"]
                assert float(cell) == steps[max(steps)], (row["run"], name)
    rendered = table_rows(paths[0].read_text(), "Runs\n")
    assert [cells[0] for cells in rendered] == [row["run"] for row in rows]


def test_runs_with_missing_metrics_are_reported(written: Any) -> None:
    report, paths = written
    assert list(report.missing) == ["losses_only/version_0"]
    assert set(report.missing["losses_only/version_0"]) == PROXIES
    partial = read_csv(paths[1])[0]
    assert partial["ablation_zeta"] == ""
    assert float(partial["test_loss"]) > 0
    listed = section(paths[0].read_text(), "Runs with missing metrics")
    assert "`losses_only/version_0`: ablation_kappa, ablation_zeta," in listed


def test_correlations_match_scipy_on_the_csv(written: Any) -> None:
    _, paths = written
    runs, table = read_csv(paths[1]), read_csv(paths[2])
    assert list(table[0]) == CORRELATION_FIELDS
    assert {row["proxy"] for row in table} == PROXIES
    for row in table:
        for target in ("test_loss", "gap"):
            x, y = values(runs, row["proxy"]), values(runs, target)
            keep = np.isfinite(x) & np.isfinite(y)
            assert int(row[f"n_{target}"]) == keep.sum()
            r = scipy.stats.pearsonr(x[keep], y[keep]).statistic
            tau = scipy.stats.kendalltau(x[keep], y[keep]).statistic
            assert float(row[f"pearson_{target}"]) == pytest.approx(r, abs=1e-12)
            assert float(row[f"kendall_{target}"]) == pytest.approx(tau, abs=1e-12)
    rendered = table_rows(paths[0].read_text(), "Correlation")
    assert [cells[0] for cells in rendered] == [row["proxy"] for row in table]
    assert rendered[0][2] == f"{float(table[0]['pearson_test_loss']):.4g}"


def test_gap_estimator_is_fitted_across_runs_with_its_leave_one_out_error(written: Any) -> None:
    report, paths = written
    runs = [row for row in read_csv(paths[1]) if row["ablation_zeta"]]
    zeta, kappa, gap = (values(runs, n) for n in ("ablation_zeta", "ablation_kappa", "gap"))
    fit = report.gap_fit
    assert len(runs) == 6
    assert fit["runs"] == [row["run"] for row in runs]
    loo = GapEstimator.leave_one_out(zeta, kappa, gap)
    assert fit["loo_error"] == pytest.approx(loo, rel=1e-12)
    estimator = GapEstimator().fit(zeta, kappa, gap)
    np.testing.assert_allclose(fit["coefficients"], estimator.coefficients, rtol=1e-10)
    assert fit["pearson"] == pytest.approx(estimator.pearson(zeta, kappa, gap), rel=1e-10)
    markdown = section(paths[0].read_text(), "Gap estimated")
    assert f"| {loo:.4g} |" in markdown
    assert "fitted on 6 runs" in markdown
    assert fit_gap(report.runs[:4]) is None  # the partial run and 3 others: too few


def test_plots_are_valid_images(written: Any) -> None:
    _, paths = written
    plots = {p.stem: p for p in paths if p.suffix == ".png"}
    assert set(plots) == PROXIES | {"gap_fit"}
    markdown = paths[0].read_text()
    for name, path in plots.items():
        image = imread(path)
        assert image.ndim == 3
        assert min(image.shape[:2]) > 100
        assert image.std() > 0
        assert f"![{name}]({path.name})" in markdown


def test_pearson_and_kendall_tau_b_match_scipy_with_ties() -> None:
    x = np.array([0.3, 0.1, 0.1, 2.0, 0.5, 0.5, 0.5])
    y = np.array([1.0, -1.0, 0.0, 3.0, 0.0, 2.0, 2.0])
    assert pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y).statistic, abs=1e-12)
    assert kendall(x, y) == pytest.approx(scipy.stats.kendalltau(x, y).statistic, abs=1e-12)
    # Scale-free: a proxy of order 1e-9 correlates like any other.
    assert pearson(x * 1e-9, y) == pytest.approx(pearson(x, y), abs=1e-12)
    assert math.isnan(pearson(np.ones(4), y[:4]))
    assert math.isnan(kendall(np.ones(4), y[:4]))


def test_nothing_to_report_is_a_clear_error(tmp_path: Path, logdir: Path) -> None:
    with pytest.raises(ReportError, match="does not exist"):
        build_report(tmp_path / "absent")
    with pytest.raises(ReportError, match="no TensorBoard event files"):
        build_report(tmp_path)
    with pytest.raises(ReportError, match=re.escape("'other/'; pass the prefix")):
        build_report(logdir, prefix="other/")


def test_rankings_use_the_runs_hyperparameters(logdir: Path, written: Any) -> None:
    report, paths = written
    sweep_runs = [r for r in report.runs if not r["run"].startswith("losses")]
    saved = [yaml.safe_load((logdir / r["run"] / "hparams.yaml").read_text()) for r in sweep_runs]
    assert {(s["width"], s["label_noise"], s["lr"]) for s in saved} == {
        (w, n, 0.05) for w in (4, 16) for n in (0.0, 0.5, 1.0)
    }
    # lr and the callback's settings take one value; the losses-only run saved no noise.
    assert report.axes == ["label_noise", "width"]
    assert report.excluded == {"losses_only/version_0": "lacks label_noise"}
    rankings = {row["proxy"]: row for row in read_csv(paths[3])}
    assert set(rankings) == PROXIES
    settings = [{"label_noise": s["label_noise"], "width": s["width"]} for s in saved]
    for proxy, row in rankings.items():
        mu, gap = values(sweep_runs, proxy), values(sweep_runs, "gap")
        oriented = -mu if proxy in LARGER_GENERALIZES_BETTER else mu
        psi = brute_force(settings, report.axes, mu, gap)[0]
        _, worst, typical = brute_force(settings, report.axes, oriented, gap)
        assert float(row["psi"]) == pytest.approx(psi, abs=1e-12), proxy
        assert float(row["worst_sign_error"]) == pytest.approx(worst, abs=1e-12)
        assert float(row["mean_sign_error"]) == pytest.approx(typical, abs=1e-12)
        assert int(row["runs"]) == 6
        assert int(row["pairs_gap"]) == 15
        assert int(row["psi_pairs"]) == 3 * 1 + 2 * 3  # width pairs at 3 noises, noise triples
    listed = section(paths[0].read_text(), "How each proxy ranks")
    assert "- `losses_only/version_0`: lacks label_noise" in listed
    assert len(table_rows(paths[0].read_text(), "How each proxy ranks")) >= len(PROXIES)


def test_hyperparameters_fall_back_to_the_hparams_entry(logdir: Path, tmp_path: Path) -> None:
    run = logdir / "w4_noise0.5_lr0.05" / "version_0"
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "hparams.yaml").unlink()
    from_file, from_events = hyperparameters(run), hyperparameters(copy)
    assert from_events["width"] == from_file["width"] == 4
    assert from_events["label_noise"] == from_file["label_noise"] == 0.5
    assert from_events["gapwatch/probe_size"] == 64
