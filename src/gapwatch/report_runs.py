"""Reading a sweep's runs: their gapwatch scalars (curves, final values) and hyperparameters.

A run is a directory of TensorBoard event files. Its hyperparameters are read from the
``hparams.yaml`` Lightning's ``TensorBoardLogger`` saves beside the events (the model's and
the data module's ``save_hyperparameters``, and gapwatch's settings); a run without that
file falls back to the hparams plugin entry in its event files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

HPARAMS_FILE = "hparams.yaml"

Scalar = bool | int | float | str | None


class ReportError(Exception):
    """The log directory holds nothing to report on."""


def find_runs(logdir: str | Path) -> list[Path]:
    """Every directory below ``logdir`` (itself included) that holds TensorBoard event files.

    Args:
        logdir: Root of a sweep's logs.

    Returns:
        The run directories, in natural order (``w8`` before ``w16``).

    Raises:
        ReportError: If ``logdir`` is not a directory or holds no event files.
    """
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise ReportError(f"log directory {str(logdir)!r} does not exist.")
    runs = {file.parent for file in logdir.rglob("*tfevents*") if file.is_file()}
    if not runs:
        raise ReportError(f"no TensorBoard event files below {str(logdir)!r}.")
    return sorted(runs, key=_natural_order)


def _natural_order(path: Path) -> list[Any]:
    # Sweeps name runs by numbers: w8 should come before w16.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


class Run(NamedTuple):
    """What the report reads from one run's directory.

    Attributes:
        final: ``{name: value at the highest step}``, as :func:`final_scalars` gives it.
        hparams: The flattened hyperparameters, as :func:`hyperparameters` gives them.
        settings: The callbacks' settings, as :func:`callback_settings` gives them.
        curves: ``{name: {step: value}}`` of every scalar under the prefix (a step logged
            twice, as a resumed run does, keeps its last value).
    """

    final: dict[str, float]
    hparams: dict[str, Scalar]
    settings: dict[str, Scalar]
    curves: dict[str, dict[int, float]]


def read_run(run_dir: str | Path, prefix: str = "gapwatch/") -> Run:
    """A run's final scalars, hyperparameters, settings and curves, read from its files once."""
    accumulator = _load(run_dir)
    curves = _curves(accumulator, prefix)
    final = {name: curve[max(curve)] for name, curve in curves.items()}
    hparams = hyperparameters(run_dir, accumulator)
    return Run(final, hparams, callback_settings(accumulator, prefix), curves)


def final_scalars(run_dir: str | Path, prefix: str = "gapwatch/") -> dict[str, float]:
    """The last logged value of every scalar whose tag starts with ``prefix``.

    Args:
        run_dir: One run's directory; all its event files are read, in order (steps a
            resumed run logged again replace the earlier ones).
        prefix: Tag prefix; it is removed from the returned names.

    Returns:
        ``{name: value at the highest step}``.
    """
    return _final(_load(run_dir), prefix)


def hyperparameters(
    run_dir: str | Path, accumulator: EventAccumulator | None = None
) -> dict[str, Scalar]:
    """The run's hyperparameters, flattened to ``{"a.b": value}``; ``{}`` if none were saved.

    Args:
        run_dir: One run's directory.
        accumulator: Its events, already loaded (read again if ``None`` and needed).

    Returns:
        Values from ``hparams.yaml`` if the run has one, else from the hparams plugin entry.
        Values that are neither numbers, strings nor booleans are given as their text.
    """
    path = Path(run_dir) / HPARAMS_FILE
    if path.is_file():
        loaded = yaml.load(path.read_text(), Loader=_TolerantLoader)  # a SafeLoader subclass
        return _flatten(loaded) if isinstance(loaded, dict) else {}
    return _plugin_hparams(accumulator if accumulator is not None else _load(run_dir))


def callback_settings(accumulator: EventAccumulator, prefix: str) -> dict[str, Scalar]:
    """The callbacks' own settings (``gapwatch/log_steps``, ...), from the hparams entry.

    The callback writes them into that entry at fit end, after Lightning saved
    ``hparams.yaml``, which it never rewrites; so they are read from the entry even where
    the run has the file. They are no hyperparameters of the sweep (no ranking axes).

    Args:
        accumulator: The run's events, loaded.
        prefix: The callbacks' prefix.
    """
    entry = _plugin_hparams(accumulator)
    return {name: value for name, value in entry.items() if name.startswith(prefix)}


def _load(run_dir: str | Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator


def _final(accumulator: EventAccumulator, prefix: str) -> dict[str, float]:
    return {name: curve[max(curve)] for name, curve in _curves(accumulator, prefix).items()}


def _curves(accumulator: EventAccumulator, prefix: str) -> dict[str, dict[int, float]]:
    curves = {}
    for tag in accumulator.Tags()["scalars"]:
        if tag.startswith(prefix):
            events = sorted(accumulator.Scalars(tag), key=lambda e: (e.step, e.wall_time))
            curves[tag[len(prefix) :]] = {e.step: float(e.value) for e in events}
    return curves


class _TolerantLoader(yaml.SafeLoader):
    """A safe loader that reads Python-specific tags (tuples, objects) as plain data."""


def _plain(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


_TolerantLoader.add_multi_constructor("tag:yaml.org,2002:python/", _plain)
_TolerantLoader.add_multi_constructor("!", _plain)


def _flatten(values: dict, parent: str = "") -> dict[str, Scalar]:
    flat: dict[str, Scalar] = {}
    for key, value in values.items():
        name = f"{parent}{key}"
        if isinstance(value, dict):
            flat |= _flatten(value, f"{name}.")
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def _plugin_hparams(accumulator: EventAccumulator) -> dict[str, Scalar]:
    from tensorboard.plugins.hparams import plugin_data_pb2

    try:
        contents = accumulator.PluginTagToContent("hparams")
    except KeyError:
        return {}
    found: dict[str, Scalar] = {}
    for content in contents.values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if not data.HasField("session_start_info"):
            continue
        for name, value in data.session_start_info.hparams.items():
            kind = value.WhichOneof("kind")
            found[name] = None if kind in (None, "null_value") else getattr(value, kind)
    return found
