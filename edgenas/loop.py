"""The one training loop under search, population search and retraining.

The callers differ in what a step does and what they evaluate; the rest is here, once: resume, step cadence,
metrics, the NaN/Inf stop, progress lines, checkpoints, and closing files whether the run ends or fails.

    loop = Loop(name=workdir, checkpoint_dir=..., metrics_paths=[...], total_steps=..., ...)
    result = loop.run(state, step_fn, diverged=..., log_fields=..., epoch_summary=...)

`run` restores the latest good checkpoint (or starts at step 0), then for each step:

  1. `step_fn(state, step) -> (state, metrics)`. The metrics stay on the device: the loop does not wait for a
     step to finish before dispatching the next, so the host builds and transfers the next batch while the
     device computes. They come back to the host in one transfer at the steps that need them (every
     `log_every` steps, an epoch's end, before a checkpoint, at the end), as records: a float per scalar, and
     for a population a float64 vector (one entry per member) per metric with a leading axis;
  2. the NaN stop: `diverged(step, record)`, on every step's record in order when they arrive, says what became
     NaN or Inf (None if nothing did), and the run raises NonFiniteLossError naming the first such step, keeping
     its last good checkpoint (records are checked before any checkpoint is written). A state holding NaN/Inf
     is never saved either;
  3. at the end of an epoch and every `log_every` steps, `log_fields(state, step, epoch_end)` adds the caller's
     fields (evaluation, epoch, ...) and one line per member goes to its `metrics.jsonl`;
  4. the progress line; at the end of an epoch, then, `epoch_summary(record, progress_line)`'s line if any;
  5. a checkpoint every `checkpoint_every` steps, and one after the last step.

Ctrl-C (SIGINT) ends the step in progress, saves a checkpoint there and raises Interrupted (a second Ctrl-C stops
at once, keeping the latest checkpoint); the launchers print "interrupted at step N; rerun the same command to
resume" and exit 130. A loop in another thread stops the same way when the event of `stop_when` is set.

Batches and random draws are functions of (seed, step), so a run restarted on the same workdir ends where an
uninterrupted run would. In a multi-host run every process runs the loop; process 0 writes the metrics files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from edgenas import checkpoint as ckpt_lib
from edgenas import metrics as metrics_lib
from edgenas.console import say

Record = dict[str, Any]


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or Inf; the run stops and keeps its last good checkpoint."""


class Interrupted(KeyboardInterrupt):
  """Ctrl-C stopped the loop after `step` steps, its checkpoints closed. A KeyboardInterrupt, so that no
  `except Exception` on the way up swallows it."""

  def __init__(self, step: int):
    super().__init__(f"interrupted at step {step}; rerun the same command to resume")
    self.step = step


@dataclasses.dataclass(frozen=True)
class Result:
  state: Any
  seconds: float  # in this process's loop
  train_seconds: float  # also counting the runs before a restart when the loop carries it, else == seconds


@dataclasses.dataclass(frozen=True)
class Loop:
  """Where and at what cadence one run steps; `run` steps it."""

  name: str  # opens the NaN message: the workdir, or "population"
  checkpoint_dir: str
  metrics_paths: Sequence[str]  # one per member; a population's metrics vectors are split over them
  total_steps: int
  steps_per_epoch: int
  images_per_step: int  # for the progress line's img/s
  log_every: int
  checkpoint_every: int
  keep_checkpoints: int | None
  advice: str  # closes the NaN message: what to change
  resuming: str = "resuming from checkpoint step"
  carry_seconds: bool = False  # keep the training time in the checkpoints, so a restart reports the total

  def run(self, state, step_fn: Callable[[Any, int], tuple[Any, Mapping]], *,
          diverged: Callable[[int, Record], str | None],
          log_fields: Callable[[Any, int, bool], Mapping] | None = None,
          epoch_summary: Callable[[Record, str | None], str | None] | None = None,
          log: Callable[[str], None] = say) -> Result:
    """Steps `state` from its latest checkpoint to `total_steps`; see the module docstring."""
    total = self.total_steps
    with contextlib.ExitStack() as closing:
      ckpt, restored = ckpt_lib.Checkpointer.open_for_resume(
          self.checkpoint_dir, state, save_every=self.checkpoint_every, keep=self.keep_checkpoints)
      closing.callback(ckpt.close)
      start, seconds_before = 0, 0.0
      if restored is not None:
        state, start = restored.state, restored.step + 1
        seconds_before = float(restored.metadata.get("train_seconds", 0.0))
        log(f"{self.resuming} {restored.step}")
      writers = []
      if jax.process_index() == 0:
        for path in self.metrics_paths:
          writers.append(metrics_lib.MetricsWriter(path, resume_step=restored.step if restored else -1))
          closing.callback(writers[-1].close)
      # Steps/s and uptime go to TensorBoard beside the metrics (the first member's, for a population).
      progress = metrics_lib.Progress(max(1, total), batch_size=self.images_per_step, every_steps=self.log_every,
                                 start_step=start, log=log, writer=writers[0].tensorboard if writers else None)
      t_loop = time.time()

      def save(step: int, state, force: bool = False) -> None:
        metadata = {"step": step}
        if self.carry_seconds:
          metadata["train_seconds"] = seconds_before + time.time() - t_loop
        try:
          ckpt.save(step, state, metadata, force=force)
        except ckpt_lib.NonFiniteStateError:
          self._stop(ckpt, f"the parameters became NaN/Inf at step {step}")

      stop = closing.enter_context(_stop_on_sigint())
      done = start  # steps finished, for the Interrupted message
      pending: list[tuple[int, Mapping]] = []  # (step, metrics still on the device) since the last fetch

      def fetch() -> Record:
        """Every pending step's metrics in one transfer, checked in step order; the newest step's record."""
        steps, host = [p[0] for p in pending], jax.device_get([p[1] for p in pending])
        pending.clear()
        record = {}
        for step_i, metrics_i in zip(steps, host):
          record = _host_record(metrics_i, len(self.metrics_paths))
          problem = diverged(step_i, record)
          if problem:
            self._stop(ckpt, problem)
        return record

      try:
        for step in range(start, total):
          state, metrics = step_fn(state, step)
          pending.append((step, metrics))
          epoch_end = (step + 1) % self.steps_per_epoch == 0 or step + 1 == total
          logged = epoch_end or (step + 1) % self.log_every == 0
          if logged or step % self.checkpoint_every == 0 or step + 1 == total or stop:
            record = fetch()
          if logged:
            if log_fields is not None:
              record.update(log_fields(state, step, epoch_end))
            for i, writer in enumerate(writers):
              writer.write(step, {key: _member(value, i) for key, value in record.items()})
          line = progress.update(step)
          summary = epoch_summary(record, line) if epoch_end and epoch_summary is not None else None
          if summary:
            log(summary)
          save(step, state)
          done = step + 1
          if stop and done < total:
            save(step, state, force=True)  # the rerun resumes exactly here
            raise Interrupted(done)
      except Interrupted:
        raise
      except KeyboardInterrupt:  # a second Ctrl-C, or one the handler could not catch: stop now
        raise Interrupted(done) from None
      if total > 0:
        save(total - 1, state, force=True)
    seconds = time.time() - t_loop
    return Result(state=state, seconds=seconds, train_seconds=seconds_before + seconds)

  def _stop(self, ckpt: ckpt_lib.Checkpointer, problem: str) -> None:
    ckpt.wait()  # the message names the latest checkpoint on disk
    raise NonFiniteLossError(
        f"{self.name}: {problem}; stopping. The last good checkpoint is step {ckpt.latest_step()} in "
        f"{ckpt.directory}. {self.advice}")


_thread = threading.local()  # .stop_event: see stop_when


@contextlib.contextmanager
def stop_when(event: threading.Event):
  """Loops this thread runs inside the block stop as at a Ctrl-C once `event` is set: after the step in
  progress, with a checkpoint there, raising Interrupted. For a loop in a thread other than the main one, which
  never sees SIGINT: the pipeline sets the event of the baselines it runs beside the main stages when those stop."""
  outer = getattr(_thread, "stop_event", None)
  _thread.stop_event = event
  try:
    yield
  finally:
    _thread.stop_event = outer


class _EventFlag:
  """True once the event is set: what `_stop_on_sigint` yields in a thread under `stop_when`."""

  def __init__(self, event: threading.Event):
    self._event = event

  def __bool__(self) -> bool:
    return self._event.is_set()


@contextlib.contextmanager
def _stop_on_sigint():
  """Yields a list that becomes non-empty at the first Ctrl-C, which then no longer raises KeyboardInterrupt
  (the loop stops after the step in progress, with a checkpoint there); a second Ctrl-C raises as usual.

  Only where SIGINT still has Python's default handler, in the main thread of a single-process run: a
  multi-host run's processes must stop at one step together, and a caller's own handler is left alone. In
  another thread, the flag is the event of `stop_when`, if any."""
  stop: list[bool] = []
  if threading.current_thread() is not threading.main_thread():
    event = getattr(_thread, "stop_event", None)
    yield stop if event is None else _EventFlag(event)
    return
  if jax.process_count() > 1 or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
    yield stop
    return

  def on_sigint(signum, frame):
    del signum, frame
    stop.append(True)
    signal.signal(signal.SIGINT, signal.default_int_handler)

  signal.signal(signal.SIGINT, on_sigint)
  try:
    yield stop
  finally:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def non_finite(record: Record, keys: Sequence[str]) -> list[str]:
  """The keys of `record` (among `keys`) whose value, or any member's value, is NaN or Inf."""
  return [key for key in keys if key in record and not np.all(np.isfinite(record[key]))]


def _host_record(host: Mapping, members: int) -> Record:
  """A step's fetched metrics: scalars as floats, per-member vectors cut to the members (a population is padded
  to fill the devices)."""
  return {key: float(v) if np.ndim(v) == 0 else np.asarray(v, np.float64)[:members] for key, v in host.items()}


def _member(value, i: int):
  return float(value[i]) if np.ndim(value) else value
