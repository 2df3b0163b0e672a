"""Speed and memory of gapwatch against naive baselines, measured in one run.

Usage::

    python benchmarks/run.py [--quick] [--repeats N] [--min-seconds S] [--threads T]
                             [--out FILE] [--cases 1,3]

Prints the machine, then one JSON line per case and setting (ratios against baselines
timed in the same run, their targets, pass/fail, and checks that gapwatch and the
baselines computed the same results), then a markdown summary. The exit status is 1 if a
results check failed; a missed speed target is reported, not an error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import ablation
import jacobian
import memory
import others
import sensitivity
import suite
import torch
from common import Sizes

CASES: dict[int, Callable[[Sizes], list[dict[str, Any]]]] = {
    1: sensitivity.run,
    2: jacobian.projection_cases,
    3: jacobian.exact_cases,
    4: ablation.run,
    5: suite.run,
    6: memory.run,
    7: others.run,
}


def machine(threads: int, sizes: Sizes) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": version("lightning"),
        "torchvision": version("torchvision"),
        "gapwatch": version("gapwatch"),
        "quick": sizes.quick,
        "repeats": sizes.repeats,
        "min_seconds": sizes.min_seconds,
    }


def summary(rows: list[dict[str, Any]]) -> str:
    """A markdown table: one line per target and one per failed check."""
    lines = ["| case | setting | metric | measured | target | pass |", "|---|---|---|---:|---|---|"]
    for r in rows:
        label = f"{r['case']} {r['name']}"
        for metric, target in r["targets"].items():
            verdict = "yes" if r["pass"][metric] else "**no**"
            measured = f"{r['metrics'][metric]:.4g}"
            lines.append(
                f"| {label} | {r['setting']} | {metric} | {measured} | {target} | {verdict} |"
            )
        for check, ok in r["checks"].items():
            if not ok:
                lines.append(f"| {label} | {r['setting']} | {check} | FAILED | true | **no** |")
    return "\n".join(lines)


def quiet() -> None:
    """Keep the output to the measurements: no Lightning banners or advice."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"lightning\..*")


def main(argv: list[str] | None = None) -> int:
    """Run the cases, print and save the results; 1 if a results check failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat (smoke test)")
    parser.add_argument("--repeats", type=int, help="least timed rounds (default 5, quick 1)")
    parser.add_argument(
        "--min-seconds", type=float, help="more rounds for cheap cases (default 2, quick 0)"
    )
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads (default: torch's, as users run)"
    )
    parser.add_argument("--out", type=Path, help="also write the JSON lines to this file")
    parser.add_argument("--cases", default=",".join(map(str, CASES)), help="e.g. 1,3")
    args = parser.parse_args(argv)
    defaults = (1, 0.0) if args.quick else (5, 2.0)
    sizes = Sizes(
        args.quick,
        args.repeats or defaults[0],
        defaults[1] if args.min_seconds is None else args.min_seconds,
    )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quiet()
    lines = [{"machine": machine(torch.get_num_threads(), sizes)}]
    print(json.dumps(lines[0]), flush=True)
    start = time.perf_counter()
    rows = []
    for case in map(int, args.cases.split(",")):
        for result in CASES[case](sizes):
            rows.append(result)
            print(json.dumps(result), flush=True)
    lines += rows
    if args.out is not None:
        args.out.write_text("".join(json.dumps(line) + "\n" for line in lines))
    print(f"\n{summary(rows)}\n\nTotal {time.perf_counter() - start:.0f} s.")
    if sizes.quick:
        print("Quick sizes are too small for the targets: pass/fail here only shows plumbing.")
    return int(not all(all(r["checks"].values()) for r in rows))


if __name__ == "__main__":
    sys.exit(main())
