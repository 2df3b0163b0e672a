"""The LightningCLI presets in the top-level ``callbacks/`` folder load and run."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI

from gapwatch import ProbeCallback
from gapwatch.demo import DigitsClassifier, DigitsDataModule

PRESETS = sorted((Path(__file__).parents[1] / "callbacks").glob("*.yaml"))


def _cli(config: Path, tmp_path: Path) -> LightningCLI:
    return LightningCLI(
        DigitsClassifier,
        DigitsDataModule,
        run=False,
        save_config_callback=None,
        args=[
            "--config", str(config),
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=2",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )  # fmt: skip


def test_there_are_presets():
    assert {p.name for p in PRESETS} >= {"full_suite.yaml", "light.yaml", "early_stopping.yaml"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_builds_and_trains(preset, tmp_path):
    cli = _cli(preset, tmp_path)
    watchers = [c for c in cli.trainer.callbacks if isinstance(c, ProbeCallback)]
    assert watchers, "the preset configures no gapwatch callback"
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    for watcher in watchers:
        assert next(int(h["step"]) for h in watcher.history) == 0
        assert len(watcher.history) >= 2
    assert any(k.startswith("gapwatch/") for k in cli.trainer.callback_metrics)


def test_misspelt_argument_is_rejected_with_its_name(tmp_path, capsys):
    text = (Path(__file__).parents[1] / "callbacks" / "full_suite.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("probe_size", "probe_sise"))
    with pytest.raises(SystemExit):
        _cli(bad, tmp_path)
    assert "probe_sise" in capsys.readouterr().err
