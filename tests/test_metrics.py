"""MetricsWriter's clu writers (metrics.jsonl and TensorBoard events) and Progress as a clu ReportProgress."""
import glob
import importlib.util
import os
import subprocess
import sys

from clu import periodic_actions
import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from edgenas import metrics as metrics_lib
from edgenas import rundir


def _scalars(logdir):
  """{tag: [(step, value), ...]} as TensorBoard's own loader reads `logdir`."""
  accumulator = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.SCALARS: 0})
  accumulator.Reload()
  return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_jsonl_bytes_are_unchanged(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with metrics_lib.MetricsWriter(path) as writer:
    writer.write(np.int64(3), {"train_ce": np.float32(0.5), "alpha": np.array([0.25, 0.75]), "qat": True,
                               "nan_loss": float("nan"), "epoch": 0})
    writer.write(4, {"train_ce": 0.125})
  with open(path, "rb") as f:
    assert f.read() == (b'{"alpha": [0.25, 0.75], "epoch": 0, "nan_loss": "nan", "qat": true, "step": 3, '
                        b'"train_ce": 0.5}\n{"step": 4, "train_ce": 0.125}\n')


def test_tensorboard_events_hold_the_scalars_written(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  writer = metrics_lib.MetricsWriter(path)
  for step in range(5):
    writer.write(step, {"train_ce": 1.0 / (step + 1), "epoch": step // 2, "qat": step >= 3,
                        "alpha": np.array([0.5, 0.5]), "note": "text"})
  logdir = os.path.join(str(tmp_path), metrics_lib.TENSORBOARD_DIR)
  scalars = _scalars(logdir)  # before close: each write is flushed
  assert sorted(scalars) == ["epoch", "qat", "train_ce"]  # vectors and strings are not scalars
  assert [s for s, _ in scalars["train_ce"]] == list(range(5))
  np.testing.assert_allclose([v for _, v in scalars["train_ce"]], [1.0 / (s + 1) for s in range(5)], rtol=1e-6)
  assert [v for _, v in scalars["qat"]] == [0.0, 0.0, 0.0, 1.0, 1.0]
  assert [v for _, v in scalars["epoch"]] == [0.0, 0.0, 1.0, 1.0, 2.0]
  writer.close()
  assert len(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))) == 1


def test_tensorboard_histograms_and_texts_are_readable(tmp_path):
  writer = metrics_lib.TensorBoardWriter(str(tmp_path))
  writer.write_histograms(2, {"alpha": np.linspace(0.0, 1.0, 50)}, num_buckets={"alpha": 5})
  writer.write_texts(2, {"arch": "mbconv3x3"})
  writer.close()
  accumulator = event_accumulator.EventAccumulator(str(tmp_path))
  accumulator.Reload()
  assert sorted(accumulator.Tags()["tensors"]) == ["alpha", "arch"]
  (histogram,) = accumulator.Tensors("alpha")
  assert histogram.step == 2 and tuple(d.size for d in histogram.tensor_proto.tensor_shape.dim) == (5, 3)
  (text,) = accumulator.Tensors("arch")
  assert text.tensor_proto.string_val == [b"mbconv3x3"]


def test_resume_drops_events_after_restored_step_and_partial_records(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  logdir = os.path.join(str(tmp_path), metrics_lib.TENSORBOARD_DIR)
  with metrics_lib.MetricsWriter(path) as writer:
    for step in range(6):
      writer.write(step, {"loss": 1.0 / (step + 1)})
  (first,) = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
  with open(first, "ab") as f:
    f.write(b"\x20\x00\x00\x00\x00\x00\x00\x00\x01")  # killed mid-record
  with open(path, "a") as f:
    f.write('{"step": 6, "lo')
  with metrics_lib.MetricsWriter(path, resume_step=3) as writer:
    for step in range(4, 8):
      writer.write(step, {"loss": 1.0 / (step + 1)})
  assert [r["step"] for r in metrics_lib.read_metrics(path)] == list(range(8))
  loss = _scalars(logdir)["loss"]
  assert [s for s, _ in loss] == list(range(8))  # each step once: 4 and 5 of the interrupted run are gone
  np.testing.assert_allclose([v for _, v in loss], [1.0 / (s + 1) for s in range(8)], rtol=1e-6)
  records, whole = metrics_lib._read_tf_records(first)
  assert whole and len(records) == 5  # the header and steps 0..3


def test_a_fresh_start_drops_all_events_of_a_run_without_checkpoint(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with metrics_lib.MetricsWriter(path) as writer:
    writer.write(0, {"loss": 1.0})
  with metrics_lib.MetricsWriter(path, resume_step=-1) as writer:  # what the loops pass when nothing was restored
    writer.write(0, {"loss": 2.0})
  assert _scalars(os.path.join(str(tmp_path), metrics_lib.TENSORBOARD_DIR))["loss"] == [(0, 2.0)]
  assert len(glob.glob(os.path.join(str(tmp_path), metrics_lib.TENSORBOARD_DIR, "*"))) == 1  # the emptied file is gone


def test_only_process_zero_writes(tmp_path):
  assert metrics_lib.is_writer_process(0) and not metrics_lib.is_writer_process(1) and not metrics_lib.is_writer_process(3)
  assert metrics_lib.is_writer_process() == (jax.process_index() == 0)
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 5}\n')
  with metrics_lib.MetricsWriter(str(path), resume_step=2, process_index=1) as writer:
    writer.write(3, {"loss": 1.0})
    writer.tensorboard.write_scalars(3, {"steps_per_sec": 2.0})
  assert path.read_text() == '{"step": 5}\n'  # not truncated, not appended
  assert os.listdir(tmp_path) == ["metrics.jsonl"]  # no tensorboard dir either


def test_progress_is_clu_report_progress_and_writes_steps_per_sec(tmp_path):
  now, lines = [0.0], []
  writer = metrics_lib.TensorBoardWriter(str(tmp_path))
  progress = metrics_lib.Progress(30, batch_size=8, every_steps=10, clock=lambda: now[0], log=lines.append,
                             writer=writer)
  assert isinstance(progress, periodic_actions.ReportProgress)
  for step in range(30):
    now[0] += 4.0 if step == 0 else 0.25
    assert (progress.update(step) is not None) == ((step + 1) % 10 == 0)
  writer.close()
  assert lines == ["step 10/30 (33.3%)  4.00 steps/s  32 img/s  ETA 5s",  # from the end of the compiling step
                   "step 20/30 (66.7%)  4.00 steps/s  32 img/s  ETA 2s",
                   "step 30/30 (100.0%)  4.00 steps/s  32 img/s  ETA 0s"]
  scalars = _scalars(str(tmp_path))
  assert [s for s, _ in scalars["steps_per_sec"]] == [9, 19, 29]  # the 0-based steps metrics are written at
  np.testing.assert_allclose([v for _, v in scalars["steps_per_sec"]], [4.0, 4.0, 4.0], rtol=1e-6)
  np.testing.assert_allclose([v for _, v in scalars["uptime"]], [6.25, 8.75, 11.25], rtol=1e-6)


def test_progress_reports_the_last_step_off_the_cadence():
  now, lines = [0.0], []
  progress = metrics_lib.Progress(7, every_steps=5, clock=lambda: now[0], log=lines.append)
  for step in range(7):
    now[0] += 1.0
    progress.update(step)
  assert lines == ["step 5/7 (71.4%)  1.00 steps/s  ETA 2s", "step 7/7 (100.0%)  1.00 steps/s  ETA 0s"]


def test_importing_metrics_does_not_import_tensorflow(tmp_path):
  code = f"""
import sys
from edgenas import loop, metrics as metrics_lib
with metrics_lib.MetricsWriter({str(tmp_path / "metrics.jsonl")!r}) as writer:
  metrics_lib.Progress(2, every_steps=1, log=lambda line: None, writer=writer.tensorboard).update(0)
  writer.write(0, {{"loss": 1.0}})
from clu import metric_writers
assert metric_writers.MultiWriter is metrics_lib.multi_writer.MultiWriter
assert "tensorflow" not in sys.modules, "TensorFlow was imported"
"""
  if importlib.util.find_spec("tensorflow") is not None:  # clu's TF names still load, on first use
    code += "assert metric_writers.SummaryWriter.__module__ == 'clu.metric_writers.tf.summary_writer'\n"
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert metrics_lib.read_metrics(str(tmp_path / "metrics.jsonl")) == [{"step": 0, "loss": 1.0}]


def test_progress_needs_positive_counts():
  with pytest.raises(rundir.RunDirError, match="total_steps and every_steps"):
    metrics_lib.Progress(0)
