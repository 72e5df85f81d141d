"""The run directory (`--workdir`) every launcher writes: resolved config, metrics, progress, final results.

A run started again on the same workdir resumes; it must not silently continue under another configuration or
overwrite a result it already finished. The helpers here enforce that:
  - `prepare_workdir` writes `config.json` on the first start and, on a restart, refuses a config that differs
    in any field that changes results (fields that only change logging or checkpoint cadence may differ);
  - `MetricsWriter` appends `metrics.jsonl` and, on resume, drops the lines an interrupted run wrote after its
    last checkpoint, so the file reads as if the run had never stopped;
  - `atomic_write_json` / `refuse_overwrite` write results (arch.json, report.json, ...) whole or not at all.
In a multi-host run only process 0 should write files here (`jax.process_index() == 0`).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any, Callable, Iterable, Mapping

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


# --------------------------------------------------------------------------------------------------------------
# Metrics


class MetricsWriter:
  """Appends one JSON object per line to a metrics file, flushed line by line so a killed run loses nothing.

  `resume_step`: the step of the checkpoint a run resumed from. Lines of the interrupted run with a larger step
  are dropped (they will be computed again), as is a line cut off mid-write. None keeps the file as it is.
  """

  def __init__(self, path: str, resume_step: int | None = None):
    self.path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if resume_step is not None and os.path.exists(path):
      self._truncate_after(resume_step)
    self._file = open(path, "a")

  def _truncate_after(self, step: int) -> None:
    kept, dropped = [], 0
    with open(self.path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          dropped += 1  # a line the killed process did not finish
          continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
          dropped += 1
          continue
        kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
      logging.info("%s: dropped %d lines written after step %d by the interrupted run", self.path, dropped, step)
      with open(self.path + ".tmp", "w") as f:
        f.writelines(kept)
      os.replace(self.path + ".tmp", self.path)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Appends {"step": step, **metrics}; numpy/JAX scalars become plain numbers."""
    record = {"step": int(step), **to_jsonable(dict(metrics))}
    self._file.write(json.dumps(record, sort_keys=True) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
  """All records of a metrics.jsonl file, in order."""
  records = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise RunDirError(f"{path}: line {number} is not valid JSON ({e})") from None
  return records


# --------------------------------------------------------------------------------------------------------------
# Progress


def format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
  """Logs `step s/total (p%)  r steps/s  i img/s  ETA t` every `every_steps` steps (and at the last step).

  Rates are measured over the steps since the previous line, so the first line (which includes compilation)
  does not skew later ones; the ETA uses the latest rate. `clock` and `log` are injectable for tests.
  """

  def __init__(self, total_steps: int, *, batch_size: int | None = None, every_steps: int = 100,
               start_step: int = 0, clock: Callable[[], float] = time.monotonic,
               log: Callable[[str], None] = logging.info):
    if total_steps < 1 or every_steps < 1:
      raise RunDirError(f"Progress needs total_steps and every_steps >= 1, got {total_steps}, {every_steps}")
    self.total_steps, self.batch_size, self.every_steps = total_steps, batch_size, every_steps
    self._clock, self._log = clock, log
    self._last_step, self._last_time = start_step, clock()

  def update(self, step: int) -> str | None:
    """Call after finishing `step` (0-based); returns the line it logged, if any."""
    done = step + 1
    if done % self.every_steps and done != self.total_steps:
      return None
    now = self._clock()
    elapsed, steps = now - self._last_time, done - self._last_step
    self._last_step, self._last_time = done, now
    if steps <= 0:
      return None
    rate = steps / elapsed if elapsed > 0 else float("inf")
    parts = [f"step {done}/{self.total_steps} ({100.0 * done / self.total_steps:.1f}%)", f"{rate:.2f} steps/s"]
    if self.batch_size:
      parts.append(f"{rate * self.batch_size:.0f} img/s")
    remaining = self.total_steps - done
    parts.append(f"ETA {format_duration(remaining / rate) if rate != float('inf') else '0s'}")
    line = "  ".join(parts)
    self._log(line)
    return line
