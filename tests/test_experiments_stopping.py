"""The stopping experiment, reduced: two real digits runs and every rule replayed on them."""

from __future__ import annotations

import math

import pytest
from experiments import stopping

from gapwatch.demo import DigitsDataModule

pytestmark = pytest.mark.slow


def test_the_two_halves_of_the_held_out_samples_are_disjoint() -> None:
    data = stopping._halves(DigitsDataModule)(seed=0)
    data.setup()
    val, test = data.val_set, data.test_set
    assert set(val.indices).isdisjoint(test.indices)
    assert len(val) + len(test) == len(val.dataset)


def test_every_rule_is_scored_on_real_runs() -> None:
    epochs = 8
    rows = []
    for run in (stopping.family()[0], stopping.family()[4]):  # digits MLP: SGD, Adam
        curves = stopping.train(run, epochs)
        assert all(len(values) == epochs for values in curves.values())
        found = stopping.regrets(curves, stopping.RULES)
        assert [row["rule"] for row in found] == [rule.name for rule in stopping.RULES]
        for row in found:
            assert row["loss_regret"] >= 0
            assert row["checkpoint_loss_regret"] >= 0
            assert 1 <= row["checkpoint"] <= row["check"] <= epochs
        rows += [{**run, "best_epoch": 1, **row} for row in found]
    table = stopping.table(rows, epochs)
    assert table.startswith("2 runs, 8 epochs each")
    for rule in stopping.RULES:
        assert f"| {rule.name} | " in table
    assert not any(math.isnan(row["loss_regret"]) for row in rows)
