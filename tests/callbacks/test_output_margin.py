"""OutputMargin logs the train probe's normalized margin percentile of the final weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from gapwatch import OutputMargin
from gapwatch.callbacks._proxy import NotApplicableError
from gapwatch.callbacks.output_margin import MarginProxy

from .conftest import fit, read_scalars


def numpy_margin_q10(logits: np.ndarray, targets: np.ndarray, q: float = 0.1) -> float:
    """Jiang et al.'s 10th-percentile margin over the total variation, in numpy."""
    rows = np.arange(len(targets))
    true = logits[rows, targets]
    others = logits.copy()
    others[rows, targets] = -np.inf
    margins = true - others.max(1)
    return float(np.quantile(margins, q) / np.sqrt(logits.var(0).sum()))


def test_logged_margin_matches_numpy_on_the_final_weights(tmp_path):
    callback = OutputMargin(probe_size=128)
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    _, model = fit(tmp_path, [callback], max_epochs=2, logger=logger, log_every_n_steps=1)
    probe = callback._probes.train
    model.eval()
    with torch.no_grad():
        logits = model(probe.inputs).double().cpu().numpy()
    expected = numpy_margin_q10(logits, probe.targets.cpu().numpy())
    logged = read_scalars(logger.log_dir)["gapwatch/margin_q10"]
    assert logged[max(logged)] == pytest.approx(expected, rel=1e-5)
    # Training separates the classes: the margin grows from its value at the start.
    assert logged[max(logged)] > logged[0]


def test_margin_is_exact_when_the_probe_is_split_between_processes():
    """The statistics of two shards, summed, give the whole probe's quantile."""
    from gapwatch.callbacks._probes import Probe, Probes
    from gapwatch.callbacks._proxy import Context, Outputs

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 10, generator=generator) * 3
    targets = torch.randint(0, 10, (37,), generator=generator)
    whole = Probe(torch.zeros(37, 1), targets)
    proxy = MarginProxy()
    proxy.setup(torch.nn.Identity(), Probes(None, whole), 10)
    summed: dict[str, torch.Tensor] = {}
    for rank in range(3):
        shard = whole.shard(rank, 3)
        context = Context(generator, 8, rank=rank, world_size=3, num_outputs=10)
        outputs = Outputs(None, logits[rank::3])
        stats = proxy.statistics(torch.nn.Identity(), Probes(None, shard), outputs, context)
        summed = {k: summed.get(k, 0) + v for k, v in stats.items()}
    expected = numpy_margin_q10(logits.double().numpy(), targets.numpy())
    assert proxy.finalize(summed)["margin_q10"] == pytest.approx(expected, rel=1e-12)


def test_a_regression_model_is_refused_naming_the_alternatives():
    from gapwatch.callbacks._probes import Probe, Probes

    probes = Probes(None, Probe(torch.zeros(4, 2), torch.zeros(4)))
    with pytest.raises(NotApplicableError, match="GeneralizationMonitor"):
        MarginProxy().setup(torch.nn.Linear(2, 1), probes, 1)
    with pytest.raises(ValueError, match=r"quantile must lie in \[0, 1\]"):
        MarginProxy(1.5)
