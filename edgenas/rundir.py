"""The run directory (`--workdir`) every launcher writes: resolved config, metrics, progress, final results.

A run started again on the same workdir resumes; it must not silently continue under another configuration or
overwrite a result it already finished. The helpers here enforce that:
  - `prepare_workdir` writes `config.json` on the first start and, on a restart, refuses a config that differs
    in any field that changes results (fields that only change logging or checkpoint cadence may differ);
  - `MetricsWriter` appends `metrics.jsonl` and, on resume, drops the lines an interrupted run wrote after its
    last checkpoint, so the file reads as if the run had never stopped;
  - `atomic_write_json` / `refuse_overwrite` write results (arch.json, report.json, ...) whole or not at all;
  - `workdir_lock` lets one process at a time write a workdir (`<workdir>/.lock`).
In a multi-host run only process 0 should write files here (`jax.process_index() == 0`) and take the lock.
Metrics and progress lines are `edgenas.metrics`.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import socket
import sys
import tempfile
import threading
import time
from typing import Any, Iterable, Iterator, Mapping

from absl import logging

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
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


class WorkdirLockedError(RunDirError):
  """Another process holds the workdir's lock; the message names it (pid, host, since when, command)."""


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
  lists the differing fields. The saved config.json is kept as written by the first start. Call it once the
  config is known to be valid: a config.json written by a run that was then refused would refuse the corrected
  command (`check_resume` compares without writing).
  """
  if check_resume(workdir, config, volatile_fields):
    return True
  os.makedirs(workdir, exist_ok=True)
  atomic_write_json(os.path.join(workdir, CONFIG_FILE), _resolved(config))
  return False


def check_resume(workdir: str, config: Any, volatile_fields: Iterable[str] = VOLATILE_FIELDS) -> bool:
  """Whether `workdir` holds a run's config.json, after checking that `config` may resume it (as
  `prepare_workdir` does); writes nothing."""
  config_path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(config_path):
    return False
  resolved = _resolved(config)
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


def _resolved(config: Any) -> Any:
  return json.loads(json.dumps(to_jsonable(config)))  # the form it has on disk, for a like-for-like compare


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
# One writer per workdir

_held: dict[str, "_Lock"] = {}  # real path -> the lock this process holds there (re-entrant)
_held_guard = threading.Lock()


class _Lock:
  def __init__(self, fd: int, path: str, created: list[str]):
    self.fd, self.path, self.created, self.depth = fd, path, created, 1  # created: directories, deepest first


@contextlib.contextmanager
def workdir_lock(workdir: str, primary: bool | None = None) -> Iterator[None]:
  """Holds `workdir`'s exclusive lock for the block, creating the directory if needed.

  The lock is an flock on `<workdir>/.lock`, a file naming its holder (pid, host, since when, command) for the
  message a second launcher exits with (WorkdirLockedError). The kernel drops an flock when its process dies, so a
  lock file left by a killed run on this host is taken over with a warning; one naming another host is refused
  (that process may be alive where this one cannot see it): the message says to delete it. Re-entrant within a
  process: a launcher holding its workdir calls library stages that lock it again, and a pipeline's stages lock
  their own sub-directories. On release the file is removed, and so are the directories this lock created if
  nothing else was written there: a run refused before it started leaves no trace.

  `primary`: whether this process takes the lock. All processes of a multi-host run share one workdir, so only
  process 0 does (the default asks `jax.process_index() == 0`).
  """
  if primary is None:
    import jax  # only here: the launchers lock before importing JAX, passing `primary`
    primary = jax.process_index() == 0
  if not primary:
    yield
    return
  key = os.path.realpath(workdir)
  with _held_guard:
    lock = _held.get(key)
    if lock is not None:
      lock.depth += 1
    else:
      lock = _held[key] = _acquire(workdir)
  try:
    yield
  finally:
    with _held_guard:
      lock.depth -= 1
      if lock.depth == 0:
        del _held[key]
        _release(lock)


def _acquire(workdir: str) -> _Lock:
  path = os.path.join(workdir, LOCK_FILE)
  for _ in range(10):  # retried only while another process removes the directory or lock file under us
    created = _missing_dirs(workdir)
    try:
      os.makedirs(workdir, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
      raise RunDirError(f"{workdir}: exists and is not a directory (or a parent of it is a file); --workdir must "
                        f"name a directory") from None
    except OSError as e:
      raise RunDirError(f"{workdir}: cannot create the run directory ({e.strerror})") from None
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:
      continue
    except OSError as e:
      raise RunDirError(f"{workdir}: cannot write in the run directory ({e.strerror})") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise RunDirError(f"{path}: cannot lock it ({e.strerror})") from None
      raise WorkdirLockedError(f"{workdir} is in use by {_describe(_read_holder(path))}; wait for it to finish "
                               f"or stop it, or use another --workdir") from None
    try:
      if os.fstat(fd).st_ino != os.stat(path).st_ino:
        os.close(fd)  # we locked a file its holder removed on release; lock the new one
        continue
    except FileNotFoundError:
      os.close(fd)
      continue
    try:
      _take_over(fd, path)
    except BaseException:
      os.close(fd)
      raise
    return _Lock(fd, path, created)
  raise RunDirError(f"{path}: could not take the lock (the directory keeps changing under this process)")


def _take_over(fd: int, path: str) -> None:
  """Checks what a lock file we now hold the flock on says, then writes ourselves into it."""
  previous = _read_holder(path)
  host = socket.gethostname()
  if previous and previous.get("pid") != os.getpid():
    if previous.get("host") != host:
      raise WorkdirLockedError(f"{path} names {_describe(previous)}, whose state this host cannot see; if that "
                               f"run is no longer running, delete {path}")
    state = "no longer running" if not _alive(previous.get("pid")) else "holds no lock on it"
    logging.warning("taking over the stale lock %s of %s, which is %s", path, _describe(previous), state)
  record = dict(pid=os.getpid(), host=host, since=time.strftime("%Y-%m-%d %H:%M:%S"), command=_command()[:300])
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)


def _release(lock: _Lock) -> None:
  try:
    if os.fstat(lock.fd).st_ino == os.stat(lock.path).st_ino:
      os.remove(lock.path)  # before unlocking: whoever opens it next creates a new file
  except OSError:
    pass
  os.close(lock.fd)
  for directory in lock.created:  # only while still empty
    try:
      os.rmdir(directory)
    except OSError:
      break


def _missing_dirs(workdir: str) -> list[str]:
  """The directories that creating `workdir` makes, deepest first."""
  missing, path = [], os.path.abspath(workdir)
  while not os.path.lexists(path) and os.path.dirname(path) != path:
    missing.append(path)
    path = os.path.dirname(path)
  return missing


def _command() -> str:
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  program = f"python -m {spec.name}" if spec is not None and spec.name else (sys.argv[0] if sys.argv else "python")
  return " ".join([program] + sys.argv[1:])


def _read_holder(path: str) -> dict | None:
  try:
    with open(path) as f:
      holder = json.loads(f.read() or "null")
    return holder if isinstance(holder, dict) else None
  except (OSError, ValueError):
    return None


def _describe(holder: dict | None) -> str:
  if not holder:
    return "another process (starting up)"
  command = f": {holder['command']}" if holder.get("command") else ""
  return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}{command}"


def _alive(pid: Any) -> bool:
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, owned by another user
  return True
