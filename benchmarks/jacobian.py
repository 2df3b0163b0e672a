"""Cases 2 and 3: the Jacobian norm's projection estimate and its exact method.

Case 2 checks the projection method's accuracy against ``exact`` and its cost against
one ``output_sensitivity`` call. Case 3 times the exact method against its lower bound,
one forward and K batched backward passes written as a plain loop, and against the two
ways torch offers to get whole Jacobians: a per-sample ``autograd.functional.jacobian``
loop and ``vmap(jacrev(...))``. All norms are of the softmax Jacobian (the default).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from common import (
    Sizes,
    conv_net,
    digits_split,
    random_images,
    row,
    seeded,
    time_round_robin,
    train_steps,
)
from torch import Tensor, nn
from torch.func import jacrev, vmap

from gapwatch.demo import digits_cnn
from gapwatch.functional import DEFAULT_BATCH_SIZE, jacobian_norm, output_sensitivity

#: The issue's target for ``exact`` at its defaults against a per-sample autograd loop.
LOOP_TARGET = 3.0


def _close(a: Tensor, b: Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-7))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def projection_cases(sizes: Sizes) -> list[dict[str, Any]]:
    """Case 2: an untrained (near-uniform softmax) and a trained (confident) digits CNN."""
    num_probes, steps = sizes.pick((512, 300), (64, 30))
    train_x, train_y, probes, _ = digits_split(num_probes)
    trained = train_steps(seeded(digits_cnn), train_x, train_y, steps)
    settings = [
        ("untrained digits CNN", seeded(digits_cnn)),
        (f"digits CNN trained for {steps} SGD steps", trained),
    ]
    return [
        _projection(f"{name}, 1x8x8, {num_probes} probes", model, probes, sizes)
        for name, model in settings
    ]


def _projection(setting: str, model: nn.Module, probes: Tensor, sizes: Sizes) -> dict[str, Any]:
    """Worst relative error of the mean norm over generator seeds, and the cost against S."""
    exact = jacobian_norm(model, probes, method="exact")
    seeds = range(sizes.pick(5, 2))
    estimates = torch.stack([jacobian_norm(model, probes, generator=_generator(s)) for s in seeds])
    timings = time_round_robin(
        {
            "projection": lambda: jacobian_norm(model, probes, generator=_generator(0)),
            "S": lambda: output_sensitivity(model, probes, generator=_generator(0)),
        },
        sizes,
    )
    every_row = jacobian_norm(model, probes, num_projections=10, generator=_generator(0))
    return row(
        2,
        "jacobian_projection",
        f"{setting}, defaults",
        metrics={
            "worst_rel_error": float((estimates - exact).abs().max() / exact),
            "exact_mean_norm": float(exact),
            "projection_vs_S": timings.ratio("projection", "S"),
        },
        targets={"worst_rel_error": ("<=", 0.03), "projection_vs_S": ("<=", 4.0)},
        checks={"projection_of_all_K_rows_equals_exact": _close(every_row, exact)},
        seconds={k: timings.median(k) for k in timings.seconds},
        note=f"error: worst of {len(seeds)} generator seeds; S: output_sensitivity defaults",
    )


def _softmax_of(model: nn.Module) -> Callable[[Tensor], Tensor]:
    return lambda x: model(x.unsqueeze(0)).softmax(dim=1).squeeze(0)


def lower_bound(model: nn.Module, inputs: Tensor) -> Tensor:
    """Per-sample norms from one forward and K batched backward passes: the plain loop."""
    if len(inputs) > DEFAULT_BATCH_SIZE:
        # In the chunks ``exact`` runs by default, so the ratio measures its overhead only.
        return torch.cat([lower_bound(model, part) for part in inputs.split(DEFAULT_BATCH_SIZE)])
    x = inputs.clone().requires_grad_(True)
    probabilities = model(x).softmax(dim=1)
    squared = torch.zeros(len(x))
    for k in range(probabilities.shape[1]):
        (grad,) = torch.autograd.grad(probabilities[:, k].sum(), x, retain_graph=True)
        squared += grad.square().flatten(1).sum(dim=1)
    return squared.sqrt()


def autograd_loop(model: nn.Module, inputs: Tensor) -> Tensor:
    """One ``torch.autograd.functional.jacobian`` call per sample."""
    f = _softmax_of(model)
    return torch.stack([torch.autograd.functional.jacobian(f, x).norm() for x in inputs])


def vmap_jacrev(model: nn.Module, inputs: Tensor) -> Tensor:
    """Whole per-sample Jacobians ``[N, K, ...]`` from ``vmap(jacrev(f))``."""
    return vmap(jacrev(_softmax_of(model)))(inputs).flatten(1).norm(dim=1)


def exact_cases(sizes: Sizes) -> list[dict[str, Any]]:
    """Case 3: a small conv net on digits with K = 10 and 100, and on CIFAR-shaped inputs."""
    num_probes, num_looped = sizes.pick((256, 32), (32, 4))
    *_, probes, _ = digits_split(num_probes)
    rows = [_exact(k, probes, num_looped, sizes) for k in (10, 100)]
    return [*rows, _exact_cifar(sizes)]


def _exact(outputs: int, probes: Tensor, num_looped: int, sizes: Sizes) -> dict[str, Any]:
    model = seeded(lambda: conv_net(outputs))
    timings = time_round_robin(
        {
            "exact": lambda: jacobian_norm(model, probes, method="exact", reduction="none"),
            "lower_bound": lambda: lower_bound(model, probes),
            "vmap_jacrev": lambda: vmap_jacrev(model, probes),
            "autograd_loop": lambda: autograd_loop(model, probes[:num_looped]),
        },
        sizes,
    )
    exact, results = timings.results["exact"], timings.results
    scale = len(probes) / num_looped
    return row(
        3,
        "jacobian_exact",
        f"K={outputs}, conv net, 1x8x8, {len(probes)} probes, defaults",
        metrics={
            "exact_vs_lower_bound": timings.ratio("exact", "lower_bound"),
            "speedup_vs_autograd_loop": scale * timings.ratio("autograd_loop", "exact"),
            "speedup_vs_vmap_jacrev": timings.ratio("vmap_jacrev", "exact"),
        },
        targets={
            "exact_vs_lower_bound": ("<=", 1.3),
            "speedup_vs_autograd_loop": (">=", LOOP_TARGET),
            "speedup_vs_vmap_jacrev": (">=", 1.0),
        },
        checks={
            "equals_lower_bound": _close(exact, results["lower_bound"]),
            "equals_vmap_jacrev": _close(exact, results["vmap_jacrev"]),
            "equals_autograd_loop": _close(exact[:num_looped], results["autograd_loop"]),
        },
        seconds={k: timings.median(k) for k in timings.seconds},
        note=f"autograd loop timed on {num_looped} probes and scaled by {scale:g}; "
        f"lower bound in chunks of {DEFAULT_BATCH_SIZE}",
    )


def _exact_cifar(sizes: Sizes) -> dict[str, Any]:
    """The issue's case: 512 CIFAR-shaped inputs, where one chunk of all rows is slow.

    ``batch_size=None`` (one chunk of all rows) is timed for the record.
    """
    num_probes, num_looped = sizes.pick((512, 16), (32, 2))
    model = seeded(lambda: conv_net(10, in_channels=3))
    probes = random_images(num_probes, (3, 32, 32))

    timings = time_round_robin(
        {
            "exact": lambda: jacobian_norm(model, probes, method="exact", reduction="none"),
            "exact_unchunked": lambda: jacobian_norm(
                model, probes, method="exact", reduction="none", batch_size=None
            ),
            "lower_bound": lambda: lower_bound(model, probes),
            "autograd_loop": lambda: autograd_loop(model, probes[:num_looped]),
        },
        sizes,
    )
    exact, results = timings.results["exact"], timings.results
    scale = len(probes) / num_looped
    return row(
        3,
        "jacobian_exact",
        f"K=10, conv net, 3x32x32, {num_probes} probes, defaults",
        metrics={
            "exact_vs_lower_bound": timings.ratio("exact", "lower_bound"),
            "speedup_vs_autograd_loop": scale * timings.ratio("autograd_loop", "exact"),
            "default_speedup_vs_unchunked": timings.ratio("exact_unchunked", "exact"),
        },
        targets={
            "exact_vs_lower_bound": ("<=", 1.3),
            "speedup_vs_autograd_loop": (">=", LOOP_TARGET),
        },
        checks={
            "equals_lower_bound": _close(exact, results["lower_bound"]),
            "equals_unchunked": _close(exact, results["exact_unchunked"]),
            "equals_autograd_loop": _close(exact[:num_looped], results["autograd_loop"]),
        },
        seconds={k: timings.median(k) for k in timings.seconds},
        note=f"autograd loop timed on {num_looped} probes and scaled by {scale:g}; "
        f"lower bound in chunks of {DEFAULT_BATCH_SIZE}",
    )
