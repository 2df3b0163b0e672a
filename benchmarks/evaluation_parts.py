"""One regular evaluation of ``GeneralizationMonitor()`` and each proxy's share of it.

Trains the demo's digits CNN for one step with the callback at its defaults (figures
off), then calls the evaluation ``repeats`` times and prints, as one JSON line, the
median seconds of the whole evaluation and of each active proxy's ``statistics``. Made
to compare code revisions (run it from two checkouts, alternating)::

    PYTHONPATH=src python benchmarks/evaluation_parts.py [repeats]
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
import warnings
from collections import defaultdict
from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything

from gapwatch import GeneralizationMonitor
from gapwatch.demo import DigitsClassifier, DigitsDataModule


def main(repeats: int = 9) -> dict[str, Any]:
    """Time ``repeats`` evaluations (the first one, warming up, is left out)."""
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    seed_everything(0, verbose=False)
    callback = GeneralizationMonitor(figures_every_n_evaluations=0)
    trainer = Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback], num_sanity_val_steps=0,
        limit_val_batches=0,
    )  # fmt: skip
    model = DigitsClassifier()
    trainer.fit(model, datamodule=DigitsDataModule())
    spent: dict[str, list[float]] = defaultdict(list)
    for proxy in callback._active:
        proxy.statistics = _timed(proxy.statistics, spent[type(proxy).__name__])
    total = []
    for _ in range(repeats):
        callback._done_at, callback.last_step = None, -1  # evaluate the same step again
        start = time.perf_counter()
        callback._evaluate(trainer, model)
        total.append(time.perf_counter() - start)
    found = {"evaluation": statistics.median(total[1:])}
    found |= {name: statistics.median(times[1:]) for name, times in spent.items()}
    return found


def _timed(function: Any, into: list[float]) -> Any:
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - start)

    return timed


if __name__ == "__main__":
    print(json.dumps(main(*map(int, sys.argv[1:2]))))
