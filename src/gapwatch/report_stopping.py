"""Where early-stopping rules would have stopped a run, and what stopping there cost.

A rule is an ``EarlyStopping(monitor=..., mode="min", min_delta=..., patience=...)``
replayed on a logged curve: :func:`stop_index` decides as Lightning's callback does at
each check (a non-finite value stops; a value below the best by more than ``min_delta``
resets the count; ``patience`` checks in a row without one stop). One full-length run
therefore shows every rule's stop at once. A stop's regret is the held-out loss (and
error) there minus the best over the checked evaluations: what a user who trusted the
rule gave up against an oracle that knew the held-out curve.

:func:`checked_steps` picks, from a run's logged steps, the evaluations an
``EarlyStopping`` would have seen: not step 0 (before training) and not the extra
log-spaced early points of ``log_steps``, which no monitor reads. ``patience`` counts
those evaluations, so it means epochs only for a run that evaluated once an epoch; the
audit names each run's :func:`cadence`. (An ``EarlyStopping`` attached to a run makes
gapwatch evaluate at each of its checks, whatever ``every_n_epochs`` says.)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["LABEL_FREE_RULES", "Rule", "audit_run", "cadence", "checked_steps", "regrets",
           "stop_index", "summary"]  # fmt: skip


@dataclass(frozen=True)
class Rule:
    """An ``EarlyStopping(monitor=prefix + monitor, mode="min", ...)`` to replay.

    Attributes:
        monitor: The metric's name without the logger prefix (``"prediction_changes"``).
        min_delta: Lightning's ``min_delta``: the least decrease that counts as one.
        patience: Checks in a row without a decrease before it stops.
    """

    monitor: str
    min_delta: float
    patience: int

    @property
    def name(self) -> str:
        """``monitor (min_delta, patience)``, as tables show it."""
        return f"{self.monitor} ({self.min_delta:g}, {self.patience})"


#: The label-free rules the report audits: the recommended preset's and the paper's.
LABEL_FREE_RULES = (
    Rule("prediction_changes", 0.0, 5),
    Rule("normalized_train_loss", 1e-5, 5),
)


#: The regrets :func:`regrets` gives per rule, and :func:`summary` sums up.
REGRETS = ("loss_regret", "error_regret", "checkpoint_loss_regret", "checkpoint_error_regret")


def stop_index(values: Sequence[float], min_delta: float, patience: int) -> int | None:
    """The check at which ``EarlyStopping(mode="min")`` stops, or ``None`` if it never does.

    Args:
        values: The monitored value at each check, in order.
        min_delta: Lightning's ``min_delta`` (a decrease must exceed it).
        patience: Checks without a decrease after which it stops.

    Returns:
        The index into ``values`` of the check that stopped training.
    """
    best, wait = math.inf, 0
    for index, value in enumerate(values):
        if not math.isfinite(value):  # check_finite=True, Lightning's default
            return index
        if value + min_delta < best:
            best, wait = value, 0
        else:
            wait += 1
            if wait >= patience:
                return index
    return None


def checked_steps(steps: Sequence[int], log_steps: int = 0) -> list[int]:
    """The logged steps an ``EarlyStopping`` on a gapwatch metric would have checked.

    Args:
        steps: Every step the run logged its held-out loss at.
        log_steps: The callback's ``log_steps``: steps 1, 2, ..., ``2**(log_steps - 1)``
            were extra early evaluations (an epoch-end evaluation that falls on one of
            them is dropped too; the runs this matters for have epochs of one step).

    Returns:
        The steps in increasing order, without step 0 and the log-spaced extras.
    """
    extra = {2**k for k in range(log_steps)}
    return sorted(step for step in set(steps) if step > 0 and step not in extra)


def regrets(
    curves: Mapping[str, Sequence[float]],
    rules: Sequence[Rule],
    loss: str = "test_loss",
    accuracy: str = "test_acc",
) -> list[dict[str, Any]]:
    """Each rule's stop on aligned curves and its regret in held-out loss and error.

    Args:
        curves: ``{metric: value at each check}``, every list of the same length; NaN
            where a metric was not logged at a check (the rule skips that check).
        rules: The rules to replay.
        loss: The held-out loss the regret is measured in.
        accuracy: The held-out accuracy (its regret is in error, ``1 - accuracy``);
            absent from ``curves``: no error regret (NaN).

    Returns:
        One dict per rule whose monitor is in ``curves``: ``rule``, ``stopped`` (False:
        it never stopped, so training ran to the last check), ``check`` (the 1-based check
        it stopped at, or the last one), ``loss``, ``loss_regret``, ``error_regret``, and
        the same for the model a ``ModelCheckpoint(monitor=..., mode="min")`` beside it
        would have kept (the first least value up to the stop): ``checkpoint``,
        ``checkpoint_loss_regret``, ``checkpoint_error_regret``.
    """
    held_out = list(curves[loss])
    error = [1 - a for a in curves.get(accuracy, [math.nan] * len(held_out))]
    best_loss, best_error = _least(held_out), _least(error)
    found = []
    for rule in rules:
        if rule.monitor not in curves:
            continue
        monitored = curves[rule.monitor]
        present = [i for i, v in enumerate(monitored) if not math.isnan(v)]
        if not present:
            continue
        stop = stop_index([monitored[i] for i in present], rule.min_delta, rule.patience)
        seen = present if stop is None else present[: stop + 1]
        at = seen[-1] if stop is not None else len(held_out) - 1
        kept = min(seen, key=lambda i: (monitored[i], i))  # strict improvements only
        found.append(
            {
                "rule": rule.name,
                "stopped": stop is not None,
                "check": at + 1,
                "loss": held_out[at],
                "loss_regret": held_out[at] - best_loss,
                "error_regret": error[at] - best_error,
                "checkpoint": kept + 1,
                "checkpoint_loss_regret": held_out[kept] - best_loss,
                "checkpoint_error_regret": error[kept] - best_error,
            }
        )
    return found


def _least(values: Sequence[float]) -> float:
    return min((v for v in values if math.isfinite(v)), default=math.nan)


def cadence(every_n_epochs: object = 1, every_n_train_steps: object = None) -> str:
    """How often a run's callback evaluated, in words: what the audit's patience counts.

    Args:
        every_n_epochs: The callback's ``every_n_epochs``, as its hparams entry holds it.
        every_n_train_steps: Its ``every_n_train_steps`` (``None`` or ``"None"``: unset).

    Returns:
        ``"every epoch"``, ``"every 2 epochs"``, ``"every epoch and every 50 steps"``, ...
    """
    epochs = int(every_n_epochs) if isinstance(every_n_epochs, (int, float, str)) else 1
    words = "every epoch" if epochs == 1 else f"every {epochs} epochs"
    if every_n_train_steps not in (None, "None", "", 0):
        words += f" and every {int(str(every_n_train_steps))} steps"
    return words


def audit_run(
    curves: Mapping[str, Mapping[int, float]],
    log_steps: int = 0,
    rules: Sequence[Rule] = LABEL_FREE_RULES,
    evaluated: str = "every epoch",
) -> list[dict[str, Any]]:
    """Where each rule would have stopped one logged run, and what it would have cost.

    Args:
        curves: ``{metric: {step: value}}`` as the report reads them (names unprefixed).
        log_steps: The run's ``log_steps`` setting (its extra early points are not checks).
        rules: The rules to replay.
        evaluated: The run's :func:`cadence`, copied into each row.

    Returns:
        :func:`regrets`' rows with ``step`` (the logged step of the stop), ``checks``
        (how many evaluations a monitor would have seen) and ``evaluated``; ``[]`` for a
        run without a held-out loss or without a check.
    """
    if "test_loss" not in curves:
        return []
    steps = checked_steps(list(curves["test_loss"]), log_steps)
    if not steps:
        return []
    names = {"test_loss", "test_acc", *(rule.monitor for rule in rules)} & set(curves)
    aligned = {name: [curves[name].get(step, math.nan) for step in steps] for name in names}
    rows = regrets(aligned, rules)
    return [
        {**row, "step": steps[row["check"] - 1], "checks": len(steps), "evaluated": evaluated}
        for row in rows
    ]


def summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per rule over many runs' :func:`regrets`: median and worst regret, stops made.

    Args:
        rows: :func:`regrets` outputs of several runs, concatenated.

    Returns:
        One dict per rule, in first-seen order: ``rule``, ``runs``, ``stopped``,
        ``median_check``, and ``median_<regret>`` and ``worst_<regret>`` for each of
        :data:`REGRETS`.
    """
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(row["rule"], []).append(row)
    table = []
    for rule, found in grouped.items():
        entry: dict[str, Any] = {
            "rule": rule,
            "runs": len(found),
            "stopped": sum(r["stopped"] for r in found),
            "median_check": statistics.median(r["check"] for r in found),
        }
        for kind in REGRETS:
            values = [r[kind] for r in found if math.isfinite(r[kind])]
            entry[f"median_{kind}"] = statistics.median(values) if values else math.nan
            entry[f"worst_{kind}"] = max(values, default=math.nan)
        table.append(entry)
    return table
