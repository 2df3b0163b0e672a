"""The ``gapwatch`` command line, through its console script and ``python -m``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gapwatch.cli import main
from tests.test_report import tiny_sweep

SCRIPT = Path(sys.executable).with_name("gapwatch")


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    tiny_sweep(root, widths=(4,), noises=(0.0, 0.5, 1.0))
    return root


def run(*command: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=120
    )


def test_report_command_writes_into_logdir_by_default(logdir: Path) -> None:
    done = run(sys.executable, "-m", "gapwatch.cli", "report", logdir)
    assert done.returncode == 0, done.stderr
    assert f"Read 3 runs below {logdir}." in done.stdout
    assert "Best rank agreement with test_loss:" in done.stdout
    assert "Granulated Kendall Psi with the gap over label_noise:" in done.stdout
    assert "No gap fit: it needs" in done.stdout  # three runs are too few for eq. 7
    out = logdir / "gapwatch-report"
    for name in ("report.md", "runs.csv", "correlations.csv", "sensitivity.png"):
        assert f"  {out / name}\n" in done.stdout
        assert (out / name).is_file()


def test_report_options(logdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(logdir), "--out", str(tmp_path / "custom")]) == 0
    assert (tmp_path / "custom" / "runs.csv").read_text().count("\n") == 1 + 3
    assert main(["report", str(logdir), "--prefix", "elsewhere/"]) == 2
    assert "--prefix" in capsys.readouterr().err


def test_help_lists_the_commands(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit, match="0"):
        main(["--help"])
    assert "report" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="0"):
        main(["report", "--help"])
    assert "--out" in capsys.readouterr().out


def test_missing_or_empty_logdir_exits_with_2(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert SCRIPT.is_file(), "the console script is missing: pip install -e ."
    done = run(SCRIPT, "report", tmp_path / "absent")
    assert done.returncode == 2
    assert (
        done.stderr
        == f"gapwatch report: error: log directory '{tmp_path / 'absent'}' does not exist.\n"
    )
    assert main(["report", str(tmp_path)]) == 2
    assert "no TensorBoard event files" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        main([])  # a command is required


def test_the_command_line_does_not_import_lightning():
    code = "import sys, gapwatch.cli; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
