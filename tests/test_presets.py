"""The LightningCLI presets in the top-level ``callbacks/`` folder load and run."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI

from gapwatch import ProbeCallback
from gapwatch.demo import DigitsClassifier, DigitsDataModule

PRESETS = sorted((Path(__file__).parents[1] / "callbacks").glob("*.yaml"))


def _cli(config: Path, tmp_path: Path, *overrides: str) -> LightningCLI:
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
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            *overrides,
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


def test_the_early_stopping_preset_stops_and_keeps_the_fewest_changes(tmp_path):
    preset = Path(__file__).parents[1] / "callbacks" / "early_stopping.yaml"
    cli = _cli(preset, tmp_path, "--trainer.max_epochs=40", "--trainer.limit_train_batches=1.0")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    stopper, keeper = cli.trainer.early_stopping_callback, cli.trainer.checkpoint_callback
    assert stopper.monitor == keeper.monitor == "gapwatch/prediction_changes"
    assert 0 < stopper.stopped_epoch < 39, "the preset should stop these digits runs early"
    (watcher,) = [c for c in cli.trainer.callbacks if isinstance(c, ProbeCallback)]
    # Epoch-end evaluations are logged at the epoch's last step.
    per_epoch = cli.trainer.num_training_batches
    changes = [(h["prediction_changes"], (int(h["step"]) + 1) // per_epoch - 1)
               for h in watcher.history[1:]]  # fmt: skip
    fewest = min(changes, key=lambda pair: pair[0])[1]  # the first least, as the checkpoint
    assert Path(keeper.best_model_path).name == f"fewest-changes-epoch={fewest}.ckpt"


def test_misspelt_argument_is_rejected_with_its_name(tmp_path, capsys):
    text = (Path(__file__).parents[1] / "callbacks" / "full_suite.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("probe_size", "probe_sise"))
    with pytest.raises(SystemExit):
        _cli(bad, tmp_path)
    assert "probe_sise" in capsys.readouterr().err
