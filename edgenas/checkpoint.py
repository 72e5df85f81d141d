"""Checkpoints of a train state: a thin layer over `orbax.checkpoint.CheckpointManager`.

Each checkpoint step holds two orbax items:
  - `state`: the pytree (params, optimizer state, RNG keys, ...), written with `StandardSave`;
  - `meta`:  small JSON: the caller's metadata (data position, anything JSON-able) plus a fingerprint of the
             state's structure (leaf paths, shapes, dtypes), written with `JsonSave`.

What this layer adds to orbax:
  - restoring the latest *good* checkpoint: a step whose files are truncated, garbled or missing is logged as a
    warning naming the step, moved aside (`<step>.corrupt`) so a resumed run can save that step again, and the
    previous step is tried;
  - a structure check before orbax is asked to restore, so restoring another architecture's checkpoint says which
    leaves differ instead of raising from deep inside orbax/tensorstore;
  - a guard that refuses to checkpoint a non-finite state, so a run that diverges keeps its last good checkpoint.

A failed restore is quiet apart from that one warning. orbax runs a restore in a fresh asyncio loop and gathers
one tensorstore read per array; the first failing read ends the gather and orbax closes the loop while the other
reads are still in flight, and each of them then fails to post its result to the closed loop, printing an "Event
loop is closed" traceback from tensorstore's threads (about 80 for a search state). `_loops_finish_their_reads`
lets those reads finish before the loop closes, so nothing is left to post to a closed loop.

Saves are asynchronous; `close()` (or leaving the `with` block) waits for them to finish. In a multi-host run
every process makes the same calls (orbax coordinates who writes what). Two checkpointers saving at once from two
threads (the pipeline's baselines beside its main stages) would share orbax's process-wide "current operation
id", and one save's background commit then waits for the other's signal until it times out; so a save first waits
for any other checkpointer's save still in flight (`_SAVES`).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

_STATE = "state"
_META = "meta"
_CORRUPT_SUFFIX = ".corrupt"
_MAX_LISTED = 8  # differing leaves named in a mismatch message
_DRAIN_SECONDS = 60.0  # in-flight reads of a failed restore get this long to finish before the loop closes


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or read; the message names the directory and step."""


class CheckpointMismatchError(CheckpointError):
  """The checkpoint on disk has a different structure from the state it is restored into."""


class NonFiniteStateError(CheckpointError):
  """Refused to checkpoint a state holding NaN or Inf (the previous checkpoint stays the latest)."""


@dataclasses.dataclass(frozen=True)
class Restored:
  step: int
  state: Any
  metadata: dict[str, Any]


def tree_fingerprint(tree) -> dict[str, dict[str, Any]]:
  """{leaf path: {"shape": [...], "dtype": "..."}} of a pytree of arrays or ShapeDtypeStructs."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): {"shape": [int(d) for d in np.shape(leaf)], "dtype": str(getattr(leaf, "dtype", type(leaf).__name__))}
          for path, leaf in leaves}


def describe_mismatch(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
  """Human-readable differences between two fingerprints; empty when the structures agree.

  Only paths and shapes count: a dtype difference is a cast orbax performs on restore, not a different model.
  """
  problems = []
  missing = [p for p in expected if p not in saved]
  extra = [p for p in saved if p not in expected]
  reshaped = [p for p in expected if p in saved and list(saved[p]["shape"]) != list(expected[p]["shape"])]
  if missing:
    problems.append(f"{len(missing)} leaves expected but not in the checkpoint: {_listing(missing)}")
  if extra:
    problems.append(f"{len(extra)} leaves in the checkpoint but not expected: {_listing(extra)}")
  if reshaped:
    shapes = [f"{p} saved {tuple(saved[p]['shape'])} expected {tuple(expected[p]['shape'])}" for p in reshaped]
    problems.append(f"{len(reshaped)} leaves with another shape: {_listing(shapes)}")
  return problems


def _listing(items: list[str]) -> str:
  shown = ", ".join(items[:_MAX_LISTED])
  return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


class _FinishingLoop(asyncio.SelectorEventLoop):
  """An event loop that, when closed with tasks still pending, first lets them finish (see the module docstring)."""

  def close(self) -> None:
    if not self.is_running() and not self.is_closed():
      pending = asyncio.all_tasks(self)
      if pending:
        done, late = self.run_until_complete(asyncio.wait(pending, timeout=_DRAIN_SECONDS))
        for task in late:
          task.cancel()
        for task in done:  # retrieved, so asyncio does not log "Task exception was never retrieved" for each
          if not task.cancelled():
            task.exception()
    super().close()


class _FinishingPolicy(asyncio.DefaultEventLoopPolicy):

  def new_event_loop(self) -> asyncio.AbstractEventLoop:
    return _FinishingLoop()


@contextlib.contextmanager
def _loops_finish_their_reads():
  """orbax calls made inside get event loops that finish their pending reads before closing.

  The policy is process-wide, so it is set only for the duration of a restore; a loop another thread creates
  meanwhile merely waits for its own tasks before closing.
  """
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_FinishingPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)


def _all_finite(tree) -> bool:
  floats = [leaf for leaf in jax.tree_util.tree_leaves(tree)
            if np.issubdtype(getattr(leaf, "dtype", np.int32), np.inexact)]
  if all(getattr(leaf, "is_fully_addressable", True) for leaf in floats):
    # One batched transfer and numpy: ~15 ms for 800 leaves, against ~100 ms dispatching jnp op by op.
    return all(bool(np.isfinite(leaf).all()) for leaf in jax.device_get(floats))
  # Arrays spread over processes cannot be fetched whole; reduce them where they live.
  return all(bool(jnp.isfinite(leaf).all()) for leaf in floats)


class _SavesInFlight:
  """The checkpoint managers with an asynchronous save possibly still running, across threads."""

  def __init__(self):
    self.lock = threading.Lock()
    self.managers: set = set()

  def start(self, manager, save: Callable[[], bool]) -> bool:
    """Waits for every other manager's save, then starts this one with `save()`."""
    with self.lock:
      for other in list(self.managers):
        if other is not manager:
          other.wait_until_finished()
          self.managers.discard(other)
      started = save()
      self.managers.add(manager)
      return started

  def finished(self, manager) -> None:
    with self.lock:
      self.managers.discard(manager)


_SAVES = _SavesInFlight()


class Checkpointer:
  """Saves a train state every `save_every` steps into `directory`, keeps the newest `keep`.

  Typical use in a train loop:

      with Checkpointer(workdir + "/checkpoints", save_every=100, keep=3) as ckpt:
        restored = ckpt.restore_latest(state)          # None on a fresh start
        if restored: state, start = restored.state, restored.step + 1
        for step in range(start, total):
          state = train_step(state, ...)
          ckpt.save(step, state, {"epoch": ...})       # writes only when step % save_every == 0
        ckpt.save(total - 1, state, force=True)
  """

  def __init__(self, directory: str, *, save_every: int = 1, keep: int | None = 3, async_save: bool = True):
    if save_every < 1:
      raise CheckpointError(f"{directory}: save_every must be >= 1, got {save_every}")
    if keep is not None and keep < 1:
      raise CheckpointError(f"{directory}: keep must be >= 1 or None (keep all), got {keep}")
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                           enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(_STATE, _META))

  # -- writing

  def save(self, step: int, state, metadata: Mapping[str, Any] | None = None, *, force: bool = False) -> bool:
    """Starts an (async) save of `state` at `step` when the interval says so, or always with `force`.

    Returns whether a save was started. Raises NonFiniteStateError rather than checkpoint NaN/Inf.
    """
    if not (force or self._manager.should_save(step)):
      return False
    if step in self._manager.all_steps():
      return False  # already written (e.g. the final forced save landing on an interval step)
    if not _all_finite(state):
      raise NonFiniteStateError(f"{self.directory}: state at step {step} holds NaN or Inf; not saved. "
                                f"The latest good checkpoint is step {self.latest_step()}.")
    meta = {"user": dict(metadata or {}), "tree": tree_fingerprint(state)}
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)})
    return _SAVES.start(self._manager, lambda: self._manager.save(step, args=args, force=True))

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    _SAVES.finished(self._manager)
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- reading

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  @classmethod
  def open_for_resume(cls, directory: str, target, *, save_every: int = 1, keep: int | None = 3
                      ) -> tuple["Checkpointer", Restored | None]:
    """Opens `directory` and restores its latest good checkpoint into `target`'s structure (None on a fresh
    start). If restoring fails, the manager is closed before the error propagates, so no save thread lingers."""
    ckpt = cls(directory, save_every=save_every, keep=keep)
    try:
      return ckpt, ckpt.restore_latest(target)
    except BaseException:
      ckpt.close()
      raise

  def restore_latest(self, target) -> Restored | None:
    """Restores the newest readable checkpoint into the structure of `target`; None if there is none.

    `target` is the state as freshly initialised (leaves come back as the same kinds: jax.Array with its
    sharding, numpy array, Python scalar), or its abstract form (`jax.ShapeDtypeStruct`s; give them shardings
    to get jax.Arrays back, else numpy arrays): it fixes the pytree types, dtypes and shardings of the result. Corrupt newer steps are warned about and
    moved aside. Raises CheckpointMismatchError if the checkpoint is of another structure, and CheckpointError
    if checkpoints exist but none is readable.
    """
    self.wait()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    expected = tree_fingerprint(abstract)
    with _loops_finish_their_reads():
      return self._restore_newest_good(abstract, expected)

  def _restore_newest_good(self, abstract, expected) -> Restored | None:
    failures = []
    for step in reversed(self.steps()):
      try:
        meta = self._restore_meta(step)
      except Exception as e:  # noqa: BLE001 - any failure to read means this step is unusable
        failures.append(self._set_aside(step, f"metadata unreadable ({_short(e)})"))
        continue
      problems = describe_mismatch(meta.get("tree", {}), expected)
      if problems:
        raise CheckpointMismatchError(
            f"{self.directory}: checkpoint step {step} has a different structure from the state to restore "
            f"(another model or search space?): " + "; ".join(problems))
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **{_STATE: ocp.args.StandardRestore(abstract)}))
      except Exception as e:  # noqa: BLE001
        failures.append(self._set_aside(step, f"state unreadable ({_short(e)})"))
        continue
      return Restored(step=step, state=restored[_STATE], metadata=meta.get("user", {}))
    if failures:
      raise CheckpointError(f"{self.directory}: no readable checkpoint: " + "; ".join(failures))
    return None

  def _restore_meta(self, step: int) -> dict[str, Any]:
    meta = self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
    if not isinstance(meta, dict) or "tree" not in meta:
      raise CheckpointError(f"step {step}: '{_META}' item is not an edgenas checkpoint metadata object")
    return meta

  def _set_aside(self, step: int, reason: str) -> str:
    """Warns about a corrupt step and renames it so the manager no longer lists it (and can save it again)."""
    message = f"checkpoint step {step} in {self.directory} is corrupt: {reason}; falling back to an earlier step"
    logging.warning(message)
    if jax.process_index() == 0:
      step_dir = os.path.join(self.directory, str(step))
      aside = step_dir + _CORRUPT_SUFFIX
      suffix = 1
      while os.path.exists(aside):
        aside, suffix = f"{step_dir}{_CORRUPT_SUFFIX}{suffix}", suffix + 1
      if os.path.isdir(step_dir):
        os.replace(step_dir, aside)
    self._manager.reload()
    return message


def _short(error: Exception, limit: int = 300) -> str:
  text = " ".join(f"{type(error).__name__}: {error}".split())  # one line: the warning is one line
  return text if len(text) <= limit else text[:limit] + "..."
