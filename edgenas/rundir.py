"""The run directory (`--workdir`) every launcher writes: resolved config, metrics, progress, final results.

A run started again on the same workdir resumes; it must not silently continue under another configuration or
overwrite a result it already finished. The helpers here enforce that:
  - `prepare_workdir` writes `config.json` on the first start and, on a restart, refuses a config that differs
    in any field that changes results (fields that only change logging or checkpoint cadence may differ);
  - `MetricsWriter` appends `metrics.jsonl` and, on resume, drops the lines an interrupted run wrote after its
    last checkpoint, so the file reads as if the run had never stopped;
  - `atomic_write_json` / `refuse_overwrite` write results (arch.json, report.json, ...) whole or not at all.
In a multi-host run only process 0 should write files here (`jax.process_index() == 0`).
Metrics and progress lines are `edgenas.metrics`.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Iterable, Mapping

from absl import logging

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
# Config fields (leaf names or dotted paths) that change how a run reports or checkpoints, not what it computes;
# a resumed run may change them.
VOLATILE_FIELDS = frozenset({
    "log_every", "log_every_steps", "progress_every", "progress_every_steps",
    "checkpoint_every", "checkpoint_every_steps", "save_every", "keep_checkpoints", "max_to_keep",
    "data_dir", "workdir",
})


class RunDirError(RuntimeError):
  """A run directory that cannot be used as asked; the message names the file and the problem."""


class ConfigMismatchError(RunDirError):
  """A restart on a workdir whose saved config differs in fields that change results."""


class FinishedResultError(RunDirError):
  """A result file exists already; writing it again would overwrite finished work."""


# --------------------------------------------------------------------------------------------------------------
# JSON files


def to_jsonable(obj: Any) -> Any:
  """Plain JSON types for configs and metrics: ConfigDicts/mappings, tuples, numpy/JAX scalars and arrays."""
  if hasattr(obj, "to_dict") and callable(obj.to_dict):  # ml_collections ConfigDict / FrozenConfigDict
    obj = obj.to_dict()
  if isinstance(obj, Mapping):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if obj is None or isinstance(obj, (bool, int, str)):
    return obj
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else str(obj)  # JSON has no NaN/Inf; keep them readable
  if hasattr(obj, "tolist"):  # numpy and JAX arrays and scalars
    return to_jsonable(obj.tolist())
  raise RunDirError(f"cannot write {type(obj).__name__} value {obj!r} as JSON")


def atomic_write_json(path: str, obj: Any, *, overwrite: bool = True) -> None:
  """Writes `obj` as JSON so readers see the old file or the complete new one, never a partial write.

  With overwrite=False an existing file raises FinishedResultError.
  """
  if not overwrite:
    refuse_overwrite(path)
  text = json.dumps(to_jsonable(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def refuse_overwrite(path: str) -> None:
  """Raises FinishedResultError if `path` exists: a finished result is never silently replaced."""
  if os.path.exists(path):
    raise FinishedResultError(f"{path} exists already: this run finished that step. Use a new --workdir, or "
                              f"delete {path} yourself to redo it.")


def read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise RunDirError(f"{path}: no such file") from None
  except json.JSONDecodeError as e:
    raise RunDirError(f"{path}: not valid JSON ({e})") from None


# --------------------------------------------------------------------------------------------------------------
# Workdir and config


def prepare_workdir(workdir: str, config: Any, volatile_fields: Iterable[str] = VOLATILE_FIELDS) -> bool:
  """Creates `workdir` and records `config` there; returns whether this is a restart of an earlier run.

  On the first start the resolved config is written to `config.json`. On a restart the saved config must match
  `config` in every field except `volatile_fields` (leaf names or dotted paths); otherwise ConfigMismatchError
  lists the differing fields. The saved config.json is kept as written by the first start.
  """
  os.makedirs(workdir, exist_ok=True)
  config_path = os.path.join(workdir, CONFIG_FILE)
  resolved = json.loads(json.dumps(to_jsonable(config)))  # the form it has on disk, for a like-for-like compare
  if not os.path.exists(config_path):
    atomic_write_json(config_path, resolved)
    return False
  saved = read_json(config_path)
  differences = config_differences(saved, resolved)
  volatile = set(volatile_fields)
  fatal = [d for d in differences if not _is_volatile(d[0], volatile)]
  if fatal:
    listing = "; ".join(f"{field}: saved {_show(old)}, now {_show(new)}" for field, old, new in fatal)
    raise ConfigMismatchError(f"{config_path}: this workdir holds a run with another configuration; refusing to "
                              f"resume it with different {', '.join(d[0] for d in fatal)} ({listing}). "
                              f"Use a new --workdir, or restore the original values.")
  for field, old, new in differences:
    logging.info("resuming %s with %s changed from %s to %s (does not change results)", workdir, field,
                 _show(old), _show(new))
  return True


_MISSING = object()


def config_differences(saved: Any, current: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
  """(dotted field, saved value, current value) for every leaf that differs; missing leaves show as <missing>."""
  if isinstance(saved, dict) and isinstance(current, dict):
    differences = []
    for key in sorted(set(saved) | set(current)):
      differences += config_differences(saved.get(key, _MISSING), current.get(key, _MISSING),
                                        f"{prefix}.{key}" if prefix else key)
    return differences
  return [] if saved == current else [(prefix or "<config>", saved, current)]


def _is_volatile(field: str, volatile: set[str]) -> bool:
  return field in volatile or field.rsplit(".", 1)[-1] in volatile


def _show(value: Any) -> str:
  return "<missing>" if value is _MISSING else json.dumps(value)
