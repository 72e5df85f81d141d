"""Metrics of a run and its progress lines: `metrics.jsonl` and TensorBoard events through clu.metric_writers,
steps/s and ETA through clu.periodic_actions.

Metrics go through clu.metric_writers: MetricsWriter is a clu MultiWriter of a JsonlWriter (`metrics.jsonl`, in
the format it always had: one object per line, keys sorted) and a TensorBoardWriter (event files in
`<dir of metrics.jsonl>/tensorboard/`, TENSORBOARD_DIR; `tensorboard --logdir <workdir>` finds them). Like
clu's create_default_writer, only process 0 writes. Both are synchronous and flush every write, so a killed run
loses nothing and a resume can cut both back to its checkpoint. TensorFlow is not imported: it is an export-only
dependency, clu's SummaryWriter needs it (so TensorBoardWriter writes events with the tensorboard package alone),
and clu.metric_writers' __init__ imports it (so that package is registered lazily, see
_register_lazy_clu_metric_writers).

Progress is a clu.periodic_actions.ReportProgress: clu's cadence and steps/s measure, its `steps_per_sec` and
`uptime` scalars for a writer, its `timed()` breakdown. It keeps its own line (the format launchers print and
tests pin) rather than clu's work-unit note, which outside Google only repeats it in the INFO log. Its injectable
clock needs no patching: clu's PeriodicAction takes the time as an argument.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import socket
import struct
import sys
import time
from typing import Any, Callable, Mapping

from absl import logging
import clu
import jax
import numpy as np
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
from tensorboard.plugins.histogram import summary_v2 as histogram_summary
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.summary.writer import record_writer
from tensorboard.util import tensor_util

from edgenas import rundir


# --------------------------------------------------------------------------------------------------------------
# Metrics

TENSORBOARD_DIR = "tensorboard"
# TensorFlow-free names of clu.metric_writers, by the submodule that defines them.
_CLU_WRITERS_WITHOUT_TF = {"MetricWriter": "interface", "MultiWriter": "multi_writer",
                           "LoggingWriter": "logging_writer", "AsyncWriter": "async_writer",
                           "AsyncMultiWriter": "async_writer", "ensure_flushes": "async_writer"}


def _register_lazy_clu_metric_writers() -> None:
  """Makes `clu.metric_writers` importable without TensorFlow.

  Its __init__ imports SummaryWriter and with it TensorFlow (seconds to import; not installed without the
  `export` extra), and Python runs a package's __init__ before any submodule, so even
  `from clu.metric_writers import interface` imports TensorFlow. This registers the package as a lazy module
  instead: the names above load from their TF-free submodules, submodules import as usual, and any other name
  (SummaryWriter, create_default_writer, ...) first runs the real __init__, so other code sees the whole package.
  """
  name = "clu.metric_writers"
  if name in sys.modules:
    return  # imported already, for real or by this function
  spec = importlib.util.find_spec(name)
  package = importlib.util.module_from_spec(spec)
  loaded = False

  def __getattr__(attr: str) -> Any:  # PEP 562: called only for names the module does not have yet
    nonlocal loaded
    if attr in _CLU_WRITERS_WITHOUT_TF:
      return getattr(importlib.import_module(f"{name}.{_CLU_WRITERS_WITHOUT_TF[attr]}"), attr)
    if not attr.startswith("__") and importlib.util.find_spec(f"{name}.{attr}") is not None:
      return importlib.import_module(f"{name}.{attr}")  # `from clu.metric_writers import multi_writer`
    if loaded or attr.startswith("__"):
      raise AttributeError(f"module {name!r} has no attribute {attr!r}")
    loaded = True
    spec.loader.exec_module(package)
    return getattr(package, attr)

  package.__getattr__ = __getattr__
  sys.modules[name] = package
  clu.metric_writers = package


_register_lazy_clu_metric_writers()
# pylint: disable=g-import-not-at-top,wrong-import-position,g-bad-import-order
from clu import periodic_actions  # needs the lazy package above
from clu.metric_writers import interface as clu_writers
from clu.metric_writers import multi_writer
# pylint: enable=g-import-not-at-top,wrong-import-position,g-bad-import-order


def is_writer_process(process_index: int | None = None) -> bool:
  """Whether this process writes run files: process 0 only, as in clu's create_default_writer on multi-host."""
  return (jax.process_index() if process_index is None else process_index) == 0


class JsonlWriter(clu_writers.MetricWriter):
  """clu MetricWriter of metrics.jsonl: one JSON object per line, flushed line by line so a killed run loses nothing.

  Each write_scalars/write_texts call is one line {"step": step, **values}, keys sorted; values may be anything
  `to_jsonable` takes (numpy/JAX scalars and arrays, bools, strings). Images, histograms and other arrays go to
  TensorBoard only, hyperparameters to config.json.
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

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {"step": int(step), **rundir.to_jsonable(dict(scalars))}
    self._file.write(json.dumps(record, sort_keys=True) + "\n")
    self._file.flush()

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    self.write_scalars(step, texts)

  def write_summaries(self, step, values, metadata=None) -> None:
    pass

  def write_images(self, step, images) -> None:
    pass

  def write_videos(self, step, videos) -> None:
    pass

  def write_audios(self, step, audios, *, sample_rate) -> None:
    pass

  def write_histograms(self, step, arrays, num_buckets=None) -> None:
    pass

  def write_hparams(self, hparams) -> None:
    pass

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


_EVENT_FILE_IDS = itertools.count()


class TensorBoardWriter(clu_writers.MetricWriter):
  """clu MetricWriter of TensorBoard event files, written with the tensorboard package alone (no TensorFlow).

  clu's own SummaryWriter needs TensorFlow and its TorchTensorboardWriter needs PyTorch. Scalars are written as
  `simple_value`s (float32), which every TensorBoard reader takes; values that are not a real number (strings,
  vectors) are skipped. Histograms, texts, hyperparameters and raw tensor summaries are supported too; images,
  videos and audio are not (encoding them needs TensorFlow). Each write is one event, flushed at once, so a
  killed run loses nothing. `resume_step` drops the events of earlier files in `logdir` with a larger step (and
  a record cut off mid-write), as JsonlWriter does with lines, so the curves read as if the run never stopped.
  """

  def __init__(self, logdir: str, resume_step: int | None = None):
    self.logdir = logdir
    os.makedirs(logdir, exist_ok=True)
    if resume_step is not None:
      _truncate_events_after(logdir, resume_step)
    # The name TensorBoard's loaders look for (".tfevents."). They read a directory's files in name order, so
    # the name sorts by creation time (nanoseconds, zero-padded: a resumed run's file comes after the one it
    # continues even within the same second) and the pid and counter keep it unique.
    now = time.time_ns()
    name = (f"events.out.tfevents.{now // 10**9:010d}.{socket.gethostname()}.{now:020d}.{os.getpid()}."
            f"{next(_EVENT_FILE_IDS):06d}")
    self.path = os.path.join(logdir, name)
    self._records = record_writer.RecordWriter(open(self.path, "wb"))
    self._add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _add(self, event: event_pb2.Event) -> None:
    self._records.write(event.SerializeToString())
    self._records.flush()

  def _add_summary(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    if values:
      self._add(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    values = []
    for tag, value in scalars.items():
      number = _real_scalar(value)
      if number is None:
        logging.log_first_n(logging.INFO, "TensorBoard: skipping %s, not a real number", 1, tag)
      else:
        values.append(summary_pb2.Summary.Value(tag=tag, simple_value=number))
    self._add_summary(step, values)

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Mapping[str, int] | None = None) -> None:
    values = []
    for tag, array in arrays.items():
      buckets = (num_buckets or {}).get(tag) or None  # clu's write_values passes 0 for "not given"
      values += histogram_summary.histogram_pb(tag, np.asarray(array), buckets=buckets).value
    self._add_summary(step, values)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    self._add_summary(step, [v for tag, text in texts.items() for v in text_summary.text_pb(tag, text).value])

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._add_summary(0, list(hparams_summary.hparams_pb(dict(hparams)).value))

  def write_summaries(self, step: int, values: Mapping[str, Any],
                      metadata: Mapping[str, Any] | None = None) -> None:
    protos = []
    for tag, value in values.items():
      md = (metadata or {}).get(tag)
      if isinstance(md, bytes):
        md = summary_pb2.SummaryMetadata.FromString(md)
      protos.append(summary_pb2.Summary.Value(tag=tag, tensor=tensor_util.make_tensor_proto(np.asarray(value)),
                                              metadata=md))
    self._add_summary(step, protos)

  def write_images(self, step, images) -> None:
    logging.log_first_n(logging.WARNING, "TensorBoardWriter does not write images", 1)

  def write_videos(self, step, videos) -> None:
    logging.log_first_n(logging.WARNING, "TensorBoardWriter does not write videos", 1)

  def write_audios(self, step, audios, *, sample_rate) -> None:
    logging.log_first_n(logging.WARNING, "TensorBoardWriter does not write audio", 1)

  def flush(self) -> None:
    self._records.flush()

  def close(self) -> None:
    self._records.close()


def _real_scalar(value: Any) -> float | None:
  if isinstance(value, (str, bytes)):
    return None
  array = np.asarray(value)
  return float(array.reshape(())) if array.size == 1 and array.dtype.kind in "biuf" else None


def _read_tf_records(path: str) -> tuple[list[bytes], bool]:
  """The records of a TFRecord file, and whether it ended on a whole record (a killed writer may leave half one).

  A record is: uint64 length, masked CRC32C of the length, data, masked CRC32C of the data (little-endian), as
  tensorboard's RecordWriter writes it; its reader needs TensorFlow.
  """
  masked_crc32c = pywrap_tensorflow.masked_crc32c
  with open(path, "rb") as f:
    blob = f.read()
  records, offset = [], 0
  while offset < len(blob):
    header = blob[offset:offset + 12]
    if len(header) < 12 or struct.unpack("<I", header[8:])[0] != masked_crc32c(header[:8]):
      return records, False
    end = offset + 12 + struct.unpack("<Q", header[:8])[0]
    data, footer = blob[offset + 12:end], blob[end:end + 4]
    if len(footer) < 4 or struct.unpack("<I", footer)[0] != masked_crc32c(data):
      return records, False
    records.append(data)
    offset = end + 4
  return records, True


def _truncate_events_after(logdir: str, step: int) -> None:
  """Drops events with a step above `step` (and unfinished records) from the event files in `logdir`."""
  for name in sorted(os.listdir(logdir)):
    path = os.path.join(logdir, name)
    if ".tfevents." not in name or not os.path.isfile(path):
      continue
    records, whole = _read_tf_records(path)
    kept = [r for r in records if (e := event_pb2.Event.FromString(r)).step <= step or e.HasField("file_version")]
    if whole and len(kept) == len(records):
      continue
    logging.info("%s: dropped %d events written after step %d by the interrupted run", path,
                 len(records) - len(kept), step)
    if all(event_pb2.Event.FromString(r).HasField("file_version") for r in kept):
      os.remove(path)  # nothing left but the header
      continue
    records_out = record_writer.RecordWriter(open(path + ".tmp", "wb"))
    for record in kept:
      records_out.write(record)
    records_out.close()
    os.replace(path + ".tmp", path)


class MetricsWriter:
  """A run's metrics: `metrics.jsonl` plus TensorBoard events, through a clu MultiWriter of JsonlWriter and
  TensorBoardWriter (events in `tensorboard_dir`, by default `<dir of path>/tensorboard/`).

  `resume_step`: the step of the checkpoint a run resumed from; both files drop what the interrupted run wrote
  after it (see JsonlWriter). Only process 0 writes (`process_index`, default jax.process_index()); elsewhere
  every method does nothing and no file is touched.
  Attributes: `writer`, the clu MetricWriter of both, for clu-style code (clu.metric_writers.write_values);
  `tensorboard`, the TensorBoard part alone, for values that stay out of metrics.jsonl (Progress's steps/s).
  """

  def __init__(self, path: str, resume_step: int | None = None, *, tensorboard_dir: str | None = None,
               process_index: int | None = None):
    self.path = path
    self.tensorboard_dir = tensorboard_dir or os.path.join(os.path.dirname(os.path.abspath(path)), TENSORBOARD_DIR)
    writers = []
    self.tensorboard: clu_writers.MetricWriter = multi_writer.MultiWriter([])
    if is_writer_process(process_index):
      self.tensorboard = TensorBoardWriter(self.tensorboard_dir, resume_step)
      writers = [JsonlWriter(path, resume_step), self.tensorboard]
    self.writer: clu_writers.MetricWriter = multi_writer.MultiWriter(writers)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Appends {"step": step, **metrics}; numpy/JAX scalars become plain numbers."""
    self.writer.write_scalars(int(step), metrics)

  def close(self) -> None:
    self.writer.close()

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
          raise rundir.RunDirError(f"{path}: line {number} is not valid JSON ({e})") from None
  return records


# --------------------------------------------------------------------------------------------------------------
# Progress


def format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress(periodic_actions.ReportProgress):
  """Logs `step s/total (p%)  r steps/s  i img/s  ETA t` every `every_steps` steps (and at the last step).

  A clu ReportProgress: clu decides when to report (every `every_steps` steps and at `total_steps`, never on time
  alone) and what it measures (steps/s since the previous report; the ETA uses the latest rate). The first step
  after a (re)start compiles, so the first line's rate starts after it: its ETA excludes compile time (a line right
  after that first step, with nothing timed yet, shows `ETA ?`). `progress.timed("eval")` adds clu's time breakdown,
  and `writer` (a clu MetricWriter, e.g. MetricsWriter.tensorboard) gets clu's `steps_per_sec` and `uptime`
  scalars. Only the line (clu's has 1-decimal rates and whole minutes) and that first interval differ from
  clu's. `clock` is passed as clu's timestamp argument, so tests can drive it; `log` is injectable too. Call
  `update` once per step, in order, as clu requires.
  """

  def __init__(self, total_steps: int, *, batch_size: int | None = None, every_steps: int = 100,
               start_step: int = 0, clock: Callable[[], float] = time.monotonic,
               log: Callable[[str], None] = logging.info, writer: clu_writers.MetricWriter | None = None):
    if total_steps < 1 or every_steps < 1:
      raise rundir.RunDirError(f"Progress needs total_steps and every_steps >= 1, got {total_steps}, {every_steps}")
    super().__init__(num_train_steps=total_steps, writer=writer, every_steps=every_steps, every_secs=None)
    self.total_steps, self.batch_size, self.every_steps = total_steps, batch_size, every_steps
    self._clock, self._log, self._line = clock, log, None
    self._start_time = clock()
    self._compiled: tuple[int, float] | None = None  # (steps done, time) at the end of the first, compiling step
    self(start_step, self._start_time)  # clu's first call records where the rate starts; it never reports

  def update(self, step: int) -> str | None:
    """Call after finishing `step` (0-based); returns the line it logged, if any."""
    self._line = None
    t = self._clock()
    self(step + 1, t)  # clu counts steps done
    if self._compiled is None:
      self._compiled = (step + 1, t)
    return self._line

  def _apply(self, step: int, t: float) -> None:
    since_step, since_time = self._previous_step, self._previous_time
    if self._compiled is not None and since_step < self._compiled[0]:
      since_step, since_time = self._compiled  # the interval holds the compiling step: time from its end
    elapsed, steps = t - since_time, step - since_step
    rate = steps / elapsed if elapsed > 0 else math.inf
    parts = [f"step {step}/{self.total_steps} ({100.0 * step / self.total_steps:.1f}%)", f"{rate:.2f} steps/s"]
    if self.batch_size:
      parts.append(f"{rate * self.batch_size:.0f} img/s")
    if step >= self.total_steps or not math.isfinite(rate):
      eta = "0s"
    elif self._compiled is None:  # right after the first step, whose time is mostly compilation
      eta = "?"
    else:
      eta = format_duration((self.total_steps - step) / rate)
    parts.append(f"ETA {eta}")
    if self._time_per_part:  # filled by clu's `with progress.timed(name):`
      total = time.monotonic() - self._t0
      parts.append(", ".join(f"{100 * dt / total:.1f}% {name}" for name, dt in sorted(self._time_per_part.items())))
    self._line = "  ".join(parts)
    self._log(self._line)
    if self._writer is not None:  # at the 0-based step of the step just done, the x-axis MetricsWriter.write uses
      self._writer.write_scalars(step - 1, {"steps_per_sec": rate, "uptime": t - self._start_time})
