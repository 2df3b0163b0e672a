"""The full suite in real runs: every contract name, shared forward pass, non-interference."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from gapwatch import GeneralizationMonitor, JacobianNorm, UnitAblation
from gapwatch.demo import DigitsClassifier, DigitsDataModule

from .conftest import fit, make_trainer, read_scalars

DESIGN_NAMES = [
    "test_loss",
    "test_acc",
    "train_loss",
    "train_acc",
    "gap",
    "sensitivity",
    "predicted_test_loss",
    "predicted_test_loss_bias",
    "bias_fraction",
    "jacobian_norm",
    "normalized_train_loss",
    "normalized_test_loss",
    "log_norm_product",
    "ablation_zeta",
    "ablation_kappa",
    "estimated_gap",
    "transitions",
    "margin_q10",
    "distance_from_init",
]


def test_every_contract_name_at_step_zero_and_each_epoch(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    monitor = GeneralizationMonitor(
        transitions=True, max_images=8, gap_coefficients=(1.0, -1.0, 0.0), probe_size=128
    )
    fit(tmp_path, [monitor], logger=logger, max_epochs=3)
    scalars = read_scalars(logger.log_dir)
    expected_steps = [0, *sorted(scalars["val_loss"])]
    assert len(expected_steps) == 4
    for name in DESIGN_NAMES:
        tag = f"gapwatch/{name}"
        assert tag in scalars, f"{tag} was never logged"
        assert sorted(scalars[tag]) == expected_steps, tag
        assert all(torch.isfinite(torch.tensor(v)) for v in scalars[tag].values()), tag
    final = monitor.history[-1]
    assert final["estimated_gap"] == pytest.approx(final["ablation_zeta"] - final["ablation_kappa"])
    assert final["gap"] == pytest.approx(final["train_acc"] - final["test_acc"])
    assert 0 <= final["ablation_zeta"] <= 1
    assert 0 <= final["ablation_kappa"] <= 1
    assert 0 < final["bias_fraction"] < 1


def _rows_into_first_layer(tmp_path, monitor: GeneralizationMonitor) -> list[int]:
    """Rows of every batch that enters the model's first layer during a 3-step epoch.

    The first layer, not the model: the split model of unit ablation calls its layers.
    """
    seed_everything(0, verbose=False)
    model = DigitsClassifier(width=8)
    rows: list[int] = []

    def count(_module, args):
        if isinstance(args[0], torch.Tensor):  # torch.fx tracing passes proxies
            rows.append(args[0].shape[0])

    model.net[0].register_forward_pre_hook(count)
    trainer = make_trainer(
        tmp_path, callbacks=[monitor], max_epochs=1, limit_train_batches=3, limit_val_batches=1
    )
    trainer.fit(model, datamodule=DigitsDataModule())
    return rows


def test_one_clean_forward_per_probe_shared_by_loss_sensitivity_and_normalized_loss(tmp_path):
    monitor = GeneralizationMonitor(jacobian=False, ablation=False, probe_size=100, batch_size=1000)
    rows = _rows_into_first_layer(tmp_path, monitor)
    # The setup checks' 2 rows each (the number of outputs, whether they are probabilities);
    # at step 0 and at the epoch's end one clean pass over each
    # probe (held-out 100, train 100) and one noisy pass (100), nothing else; between them
    # 3 training batches of 64, and the validation batch of 256 last.
    evaluation = [100, 100, 100]
    assert rows == [2, 2, *evaluation, 64, 64, 64, *evaluation, 256]


def test_jacobian_and_ablation_run_the_shared_passes_that_their_work_starts_with(tmp_path):
    monitor = GeneralizationMonitor(probe_size=100, batch_size=1000)
    rows = _rows_into_first_layer(tmp_path, monitor)
    # Setup: 2 rows each to count the outputs, to see whether they are probabilities, to
    # find the ablation layer and to check its shape. Each evaluation: the Jacobian's
    # pass over the held-out probe (which gives its clean logits too), the train probe's
    # pass that keeps the ablation layer, and the noisy pass of the sensitivity: three
    # passes of 100 rows, nothing else.
    evaluation = [100, 100, 100]
    assert rows == [2, 2, 2, 2, *evaluation, 64, 64, 64, *evaluation, 256]
    assert {"jacobian_norm", "ablation_zeta", "test_loss", "train_loss"} <= set(monitor.history[-1])


def test_proxies_that_are_not_offered_a_pass_run_their_own(tmp_path):
    # Without held-out data the Jacobian takes the train probe's pass, so unit ablation
    # captures its layer by itself; the numbers must not depend on who ran the pass.
    def run(callbacks):
        fit(tmp_path, callbacks, max_epochs=1, limit_train_batches=2)
        return [c.history for c in callbacks]

    options = {"probe_size": 64, "heldout": "none", "figures_every_n_evaluations": 0}
    (suite,) = run([GeneralizationMonitor(sensitivity=False, normalized_loss=False, **options)])
    alone = run([JacobianNorm(**options), UnitAblation(**options, prefix="ablation/")])
    for name, source in [("jacobian_norm", alone[0]), ("ablation_zeta", alone[1])]:
        for mine, theirs in zip(suite, source, strict=True):
            assert mine[name] == pytest.approx(theirs[name], rel=1e-6), name
    for mine, theirs in zip(suite, alone[1], strict=True):
        assert mine["ablation_kappa"] == pytest.approx(theirs["ablation_kappa"], rel=1e-6)


def _train(tmp_path, callbacks):
    seed_everything(0, verbose=False)
    model = DigitsClassifier(width=8, weight_decay=1e-4)  # BatchNorm, Dropout, SGD momentum
    make_trainer(tmp_path, callbacks=callbacks, max_epochs=2).fit(
        model, datamodule=DigitsDataModule(seed=3)
    )
    return model


def test_training_is_bitwise_identical_with_and_without_the_full_suite(tmp_path):
    plain = _train(tmp_path / "plain", [])
    monitor = GeneralizationMonitor(transitions=True, max_images=4, jacobian_method="exact")
    watched = _train(tmp_path / "watched", [monitor])
    assert len(monitor.history) == 3
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), watched.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), f"{name} differs"


def test_callback_passes_leave_grads_buffers_and_modes_alone(tmp_path):
    seed_everything(0, verbose=False)
    model = DigitsClassifier(width=8)
    monitor = GeneralizationMonitor(transitions=True, max_images=4, probe_size=64)
    trainer = make_trainer(tmp_path, callbacks=[monitor], max_epochs=1)
    trainer.fit(model, datamodule=DigitsDataModule())
    model.train()
    model.net[1].eval()  # a user's frozen BatchNorm must stay frozen
    for i, p in enumerate(model.parameters()):
        p.grad = torch.full_like(p, float(i))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    grads = [p.grad.clone() for p in model.parameters()]
    monitor._done_at = None
    monitor._evaluate(trainer, model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert flags == [m.training for m in model.modules()]
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
