"""Replaying early-stopping rules: Lightning's decisions, real runs, and the report's audit."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from gapwatch import GeneralizationMonitor
from gapwatch.report import build_report, summarize, write_report
from gapwatch.report_runs import read_run
from gapwatch.report_stopping import (
    LABEL_FREE_RULES,
    Rule,
    audit_run,
    cadence,
    checked_steps,
    regrets,
    stop_index,
    summary,
)
from tests.callbacks.conftest import fit, read_scalars


def lightning_stop(values: list[float], min_delta: float, patience: int) -> int | None:
    """The check at which Lightning's own ``EarlyStopping`` logic says stop."""
    callback = EarlyStopping(monitor="x", mode="min", min_delta=min_delta, patience=patience)
    for index, value in enumerate(values):
        should_stop, _ = callback._evaluate_stopping_criteria(torch.tensor(value))
        if should_stop:
            return index
    return None


@pytest.mark.parametrize("seed", range(40))
def test_stop_index_decides_as_lightnings_early_stopping(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Noisy, trending, with exact ties: where `min_delta` and strictness matter.
    values = np.round(np.cumsum(rng.normal(-0.01, 0.05, 30)), 2).tolist()
    if seed % 5 == 0:
        values[rng.integers(30)] = math.nan
    min_delta = float(rng.choice([0.0, 0.01, 0.05]))
    patience = int(rng.integers(1, 6))
    assert stop_index(values, min_delta, patience) == lightning_stop(values, min_delta, patience)


def test_checked_steps_leave_out_step_zero_and_the_log_spaced_points() -> None:
    steps = [0, 1, 2, 4, 8, 20, 40, 60]
    assert checked_steps(steps, log_steps=4) == [20, 40, 60]
    assert checked_steps(steps, log_steps=0) == [1, 2, 4, 8, 20, 40, 60]


def test_regret_is_the_held_out_loss_at_the_stop_minus_the_best() -> None:
    curves = {
        "test_loss": [1.0, 0.6, 0.5, 0.7, 0.8, 0.9],
        "test_acc": [0.5, 0.8, 0.9, 0.85, 0.8, 0.7],
        "a": [3.0, 2.0, 2.5, 2.6, 2.7, 2.8],  # stops at the 4th check (index 3) with patience 2
        "b": [3.0, 2.0, 1.0, 0.5, 0.4, 0.3],  # never stops
        "c": [math.nan, 2.0, 3.0, 1.0, 1.0, 1.0],  # absent at the first check, then stops
    }
    rows = regrets(curves, [Rule("a", 0.0, 2), Rule("b", 0.0, 2), Rule("c", 0.0, 2)])
    a, b, c = rows
    assert (a["stopped"], a["check"]) == (True, 4)
    assert a["loss_regret"] == pytest.approx(0.7 - 0.5)
    assert a["error_regret"] == pytest.approx(0.15 - 0.1)
    assert (a["checkpoint"], a["checkpoint_loss_regret"]) == (2, pytest.approx(0.6 - 0.5))
    assert (b["stopped"], b["check"]) == (False, 6)
    assert b["checkpoint"] == 6
    assert b["loss_regret"] == pytest.approx(0.9 - 0.5)
    # c's checks are indices 1..5: best 1.0 at index 3, no decrease at 4 and 5.
    assert (c["stopped"], c["check"], c["checkpoint"]) == (True, 6, 4)  # the first least
    table = summary(rows + rows)
    assert [row["runs"] for row in table] == [2, 2, 2]
    assert table[0]["worst_loss_regret"] == pytest.approx(0.2)


def light_monitor(**options: int) -> GeneralizationMonitor:
    return GeneralizationMonitor(
        sensitivity=False, jacobian=False, ablation=False, figures_every_n_evaluations=0,
        **options,
    )  # fmt: skip


def test_the_audit_stops_a_logged_run_where_early_stopping_stopped_it(tmp_path: Path) -> None:
    """One run with ``EarlyStopping`` attached, one without: the audit of the second stops
    at the step the first stopped at, read from the second's event files."""
    rule = Rule("prediction_changes", 0.0, 1)
    stopper = EarlyStopping(monitor=f"gapwatch/{rule.monitor}", patience=rule.patience)
    keeper = ModelCheckpoint(tmp_path / "kept", monitor=stopper.monitor, mode="min")
    logger = TensorBoardLogger(tmp_path, name="stopped", version=0)
    stopped, _ = fit(tmp_path, [light_monitor(), stopper, keeper], logger=logger, max_epochs=10)
    assert stopped.current_epoch < 9, "the rule should stop this run before its end"
    logger = TensorBoardLogger(tmp_path, name="full", version=0)
    fit(tmp_path, [light_monitor()], logger=logger, max_epochs=10)
    curves = {
        tag.removeprefix("gapwatch/"): values
        for tag, values in read_scalars(tmp_path / "full").items()
    }
    (row,) = audit_run(curves, rules=[rule])
    assert row["stopped"]
    seen = read_scalars(tmp_path / "stopped")["gapwatch/test_loss"]
    assert row["step"] == max(seen)  # the stopped run's last evaluation
    assert seen == {s: v for s, v in curves["test_loss"].items() if s <= row["step"]}
    assert row["checks"] == 10
    best = min(v for s, v in curves["test_loss"].items() if s > 0)
    assert row["loss_regret"] == pytest.approx(curves["test_loss"][row["step"]] - best)
    # Checks are epoch ends here: check k is epoch k - 1 in the checkpoint's name.
    assert f"epoch={row['checkpoint'] - 1}-" in Path(keeper.best_model_path).name

    report = build_report(tmp_path)
    audited = [r for r in report.stopping if r["run"] == "full/version_0"]
    assert [r["rule"] for r in audited] == [r.name for r in LABEL_FREE_RULES]
    expected = {r["rule"]: r for r in audit_run(curves)}
    for found in audited:
        assert found["step"] == expected[found["rule"]]["step"]
        assert found["loss_regret"] == pytest.approx(expected[found["rule"]]["loss_regret"])
    write_report(report, tmp_path / "out")
    with (tmp_path / "out" / "stopping.csv").open(newline="") as file:
        assert len(list(csv.DictReader(file))) == len(report.stopping)
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## Stopping audit" in markdown
    assert "prediction_changes (0, 5)" in markdown
    assert "Stopping on prediction_changes (0, 5): stopped" in summarize(report)


def test_a_run_without_held_out_data_is_not_audited() -> None:
    assert audit_run({"train_loss": {0: 1.0, 10: 0.5}}) == []


def test_the_audit_leaves_out_the_log_spaced_points_of_a_logged_run(tmp_path: Path) -> None:
    """``log_steps`` is read from the hparams entry (hparams.yaml holds the model's only)."""
    monitor = light_monitor(log_steps=3)
    logger = TensorBoardLogger(tmp_path, name="early", version=0, default_hp_metric=False)
    fit(tmp_path, [monitor], logger=logger, max_epochs=4)
    assert (tmp_path / "early" / "version_0" / "hparams.yaml").is_file()
    report = build_report(tmp_path)
    # Read for the audit, kept out of the sweep's hyperparameters (no ranking axis).
    assert read_run(tmp_path / "early" / "version_0").settings["gapwatch/log_steps"] == 3
    assert "gapwatch/log_steps" not in report.hparams[0]
    # Steps 1, 2 and 4 were extra evaluations; a monitor saw the 4 epoch ends.
    assert [row["checks"] for row in report.stopping] == [4, 4]


def test_the_audit_names_what_its_patience_counts(tmp_path: Path) -> None:
    """A run that evaluated every 2 epochs is audited at those evaluations, and says so."""
    monitor = light_monitor(every_n_epochs=2)
    logger = TensorBoardLogger(tmp_path, name="sparse", version=0, default_hp_metric=False)
    fit(tmp_path, [monitor], logger=logger, max_epochs=6)
    report = build_report(tmp_path)
    assert {row["evaluated"] for row in report.stopping} == {"every 2 epochs"}
    assert {row["checks"] for row in report.stopping} == {3}
    write_report(report, tmp_path / "out")
    assert "every 2 epochs" in (tmp_path / "out" / "report.md").read_text()


def test_cadence_in_words() -> None:
    assert cadence() == "every epoch"
    assert cadence("3", "None") == "every 3 epochs"
    assert cadence(1, 50) == "every epoch and every 50 steps"
