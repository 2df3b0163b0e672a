"""The ``gapwatch`` command line: ``gapwatch report LOGDIR [--out DIR] [--prefix P] [--axes A]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gapwatch import __version__
from gapwatch.report import ReportError, build_report, summarize, write_report


def _report(args: argparse.Namespace) -> int:
    try:
        report = build_report(args.logdir, prefix=args.prefix, axes=args.axes)
    except ReportError as error:
        print(f"gapwatch report: error: {error}", file=sys.stderr)
        return 2
    paths = write_report(report, args.out or args.logdir / "gapwatch-report")
    print(summarize(report))
    print("Wrote:", *(f"  {path}" for path in paths), sep="\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subcommand per tool."""
    parser = argparse.ArgumentParser(
        prog="gapwatch", description="Tools for gapwatch logs of generalization proxies."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", required=True)
    report = commands.add_parser(
        "report",
        help="compare the final proxies of many runs with their held-out loss and gap",
        description="Read the TensorBoard logs of every run below LOGDIR (a sweep) and write "
        "a table of each run's final gapwatch metrics, the across-run correlations of each "
        "proxy with the held-out loss and the gap, how each proxy ranks the runs (Kendall's "
        "tau, granulated Psi over the hyperparameter axes, worst-case sign error), the "
        "ablation-sparsity gap fit and scatter plots.",
    )
    report.add_argument("logdir", type=Path, help="root of the runs' TensorBoard logs")
    report.add_argument(
        "--out", type=Path, help="output directory (default: LOGDIR/gapwatch-report)"
    )
    report.add_argument("--prefix", default="gapwatch/", help="tag prefix of the gapwatch scalars")
    report.add_argument(
        "--axes",
        nargs="+",
        metavar="NAME",
        help="hyperparameters that define the sweep's axes for Psi and the sign error "
        "(default: every one in the runs' hparams.yaml that varies)",
    )
    report.set_defaults(handler=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``gapwatch`` subcommand.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` by default.

    Returns:
        The exit code: 0 on success, 2 on a usage error or a log directory without runs.
    """
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
