"""Where a callback's perturbation proxies act, decided once at setup.

Floating-point inputs are perturbed themselves unless the user names a module
(``perturb_at=``). Integer inputs (token ids, uint8 images) and keyword inputs are
perturbed at the output of a module instead: the first ``nn.Embedding`` of a text model,
otherwise the first module with a floating-point output (see
:func:`gapwatch.functional._perturb.default_perturb_at`), said once in an info line.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from gapwatch.callbacks._probes import Probes
from gapwatch.callbacks._proxy import NotApplicableError, Stats
from gapwatch.functional._perturb import (
    check_module_output,
    default_perturb_at,
    module_output_squares,
)


def resolve_perturb_at(
    model: nn.Module, probes: Probes, perturb_at: str | None, what: str
) -> str | None:
    """The module path whose output ``what`` perturbs, or ``None`` for the inputs.

    Raises:
        NotApplicableError: If the inputs cannot be perturbed and no module qualifies.
    """
    probe = probes.unlabeled
    device = next(iter(model.parameters()), torch.empty(0)).device
    if perturb_at is not None:
        check_module_output(model, probe.inputs[:2].to(device), perturb_at)
        return perturb_at
    try:
        path = default_perturb_at(model, probe.inputs[:2].to(device))
    except ValueError as error:
        raise NotApplicableError(f"{what} cannot perturb this model, but {error}") from None
    if path is not None:
        kind = probe.inputs.dtype if isinstance(probe.inputs, Tensor) else "keyword inputs"
        rank_zero_info(
            f"gapwatch: the inputs are {kind}; {what} perturbs the output of {path!r} "
            "instead (set `perturb_at=` to choose another module)."
        )
    return path


def second_moment_stats(
    model: nn.Module, inputs: object, path: str | None, batch_size: int | None
) -> Stats:
    """Sum and count of the perturbed variable's squared entries (eq. 9's ``E[x^2]``)."""
    if path is None:
        assert isinstance(inputs, Tensor)
        values = inputs.double().square()
        return {"x2_sum": values.sum(), "x2_count": values.new_tensor(values.numel())}
    if not len(inputs):  # type: ignore[arg-type]
        zero = torch.zeros((), dtype=torch.float64)
        return {"x2_sum": zero, "x2_count": zero.clone()}
    squares, counts = module_output_squares(model, inputs, path, batch_size)
    return {"x2_sum": squares.sum(), "x2_count": counts.sum()}
