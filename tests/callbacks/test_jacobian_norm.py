"""JacobianNorm logs what the functional computes on the same probes and weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from gapwatch import JacobianNorm
from gapwatch.callbacks._proxy import Context
from gapwatch.functional import jacobian_norm

from .conftest import fit


def test_jacobian_norm_exact(tmp_path):
    callback = JacobianNorm(method="exact", output="logits", probe_size=64)
    _, model = fit(tmp_path, [callback], max_epochs=1)
    expected = jacobian_norm(
        model, callback._probes.heldout.inputs, method="exact", output="logits"
    )
    assert callback.history[-1]["jacobian_norm"] == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("heldout", ["val", "none"])
def test_the_jacobian_pass_gives_the_probe_logits_to_the_other_metrics(tmp_path, heldout, device):
    # The projection's forward pass runs with the graph and hands its logits on: the
    # losses must be what a plain pass gives, on whichever probe the norm is measured.
    callback = JacobianNorm(probe_size=64, heldout=heldout, figures_every_n_evaluations=0)
    _, model = fit(tmp_path, [callback], max_epochs=1)
    model.eval()
    probes, final = callback._probes, callback.history[-1]
    with torch.no_grad():
        train_loss = F.cross_entropy(model(probes.train.inputs), probes.train.targets)
    assert final["train_loss"] == pytest.approx(train_loss.item(), rel=1e-5)
    if heldout == "val":
        with torch.no_grad():
            test_loss = F.cross_entropy(model(probes.heldout.inputs), probes.heldout.targets)
        assert final["test_loss"] == pytest.approx(test_loss.item(), rel=1e-5)
    draws = Context(torch.Generator(), 1, seed=callback.seed).draws(probes.unlabeled)
    expected = jacobian_norm(model, probes.unlabeled.inputs, generator=draws)
    assert final["jacobian_norm"] == pytest.approx(expected.item(), rel=1e-5)
