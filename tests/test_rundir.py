"""Run-directory helpers: config recording and resume checks, metrics, progress lines, atomic results."""
import json
import logging
import os
import socket
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from edgenas import metrics as metrics_lib
from edgenas import rundir


def _config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.log_every_steps = 10
  config.data = ml_collections.ConfigDict({"name": "digits", "batch_size": 64, "data_dir": None})
  config.space = ml_collections.ConfigDict({"stages": ((1, 16, 1), (2, 24, 2)), "kernels": (3, 5, 7)})
  config.search = ml_collections.ConfigDict({"penalty": "additive", "lam": 0.1, "checkpoint_every_steps": 50})
  return config


def test_first_start_writes_config_and_restart_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  assert rundir.prepare_workdir(workdir, _config()) is False
  saved = rundir.read_json(os.path.join(workdir, "config.json"))
  assert saved["space"]["stages"] == [[1, 16, 1], [2, 24, 2]]
  assert saved["data"]["data_dir"] is None and saved["search"]["lam"] == 0.1
  assert rundir.prepare_workdir(workdir, _config()) is True


def test_restart_with_different_results_config_is_refused(tmp_path):
  workdir = str(tmp_path)
  rundir.prepare_workdir(workdir, _config())
  changed = _config()
  changed.search.lam = 0.5
  changed.space.kernels = (3, 5)
  changed.data.augment = True
  with pytest.raises(rundir.ConfigMismatchError) as error:
    rundir.prepare_workdir(workdir, changed)
  message = str(error.value)
  assert "config.json" in message
  assert "search.lam: saved 0.1, now 0.5" in message
  assert "space.kernels: saved [3, 5, 7], now [3, 5]" in message
  assert "data.augment: saved <missing>, now true" in message
  assert rundir.read_json(os.path.join(workdir, "config.json"))["search"]["lam"] == 0.1  # not overwritten


def test_restart_may_change_logging_and_checkpoint_cadence(tmp_path):
  rundir.prepare_workdir(str(tmp_path), _config())
  changed = _config()
  changed.log_every_steps = 1
  changed.search.checkpoint_every_steps = 7
  changed.data.data_dir = "/elsewhere"
  assert rundir.prepare_workdir(str(tmp_path), changed) is True
  assert rundir.prepare_workdir(str(tmp_path), changed, volatile_fields=["log_every_steps", "data.data_dir",
                                                                         "search.checkpoint_every_steps"])
  with pytest.raises(rundir.ConfigMismatchError, match="log_every_steps"):
    rundir.prepare_workdir(str(tmp_path), changed, volatile_fields=())


def test_config_differences_are_leaf_paths():
  saved = {"a": 1, "b": {"c": [1, 2], "d": "x"}}
  assert rundir.config_differences(saved, saved) == []
  diffs = rundir.config_differences(saved, {"a": 1, "b": {"c": [1, 3]}})
  assert [d[0] for d in diffs] == ["b.c", "b.d"]


def test_metrics_lines_are_flushed_and_jsonable(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  writer = metrics_lib.MetricsWriter(path)
  writer.write(0, {"loss": jnp.float32(1.5), "acc": np.float64(0.25), "alpha": np.array([0.5, 0.5]),
                   "nan_loss": float("nan")})
  with open(path) as f:  # readable before close: flushed per line
    assert json.loads(f.readline()) == {"step": 0, "loss": 1.5, "acc": 0.25, "alpha": [0.5, 0.5],
                                        "nan_loss": "nan"}
  writer.close()


def test_resume_drops_lines_after_restored_step_and_partial_lines(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with metrics_lib.MetricsWriter(path) as writer:
    for step in range(6):
      writer.write(step, {"loss": 1.0 / (step + 1)})
  with open(path, "a") as f:
    f.write('{"step": 6, "lo')  # killed mid-write
  with metrics_lib.MetricsWriter(path, resume_step=3) as writer:
    for step in range(4, 8):
      writer.write(step, {"loss": 1.0 / (step + 1)})
  with metrics_lib.MetricsWriter(str(tmp_path / "straight.jsonl")) as writer:
    for step in range(8):
      writer.write(step, {"loss": 1.0 / (step + 1)})
  assert metrics_lib.read_metrics(path) == metrics_lib.read_metrics(str(tmp_path / "straight.jsonl"))
  assert [r["step"] for r in metrics_lib.read_metrics(path)] == list(range(8))


def test_read_metrics_names_a_bad_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 0}\nnot json\n')
  with pytest.raises(rundir.RunDirError, match=r"metrics.jsonl: line 2"):
    metrics_lib.read_metrics(str(path))


def test_progress_lines_show_step_rates_and_eta():
  now = [0.0]
  lines = []
  progress = metrics_lib.Progress(100, batch_size=32, every_steps=10, clock=lambda: now[0], log=lines.append)
  for step in range(100):
    now[0] += 5.0 if step == 0 else 0.5  # a slow first (compiling) step
    logged = progress.update(step)
    assert (logged is not None) == ((step + 1) % 10 == 0)
  # The first line's rate starts after the compiling first step: its ETA excludes compile time.
  assert lines[0] == "step 10/100 (10.0%)  2.00 steps/s  64 img/s  ETA 45s"
  assert lines[1] == "step 20/100 (20.0%)  2.00 steps/s  64 img/s  ETA 40s"
  assert lines[-1].startswith("step 100/100 (100.0%)") and lines[-1].endswith("ETA 0s")


def test_progress_line_right_after_the_compiling_step_has_no_eta_yet():
  now, lines = [0.0], []
  progress = metrics_lib.Progress(10, every_steps=1, clock=lambda: now[0], log=lines.append)
  for step, seconds in enumerate([5.0, 0.5]):
    now[0] += seconds
    progress.update(step)
  assert lines == ["step 1/10 (10.0%)  0.20 steps/s  ETA ?", "step 2/10 (20.0%)  2.00 steps/s  ETA 4s"]


def test_progress_resumed_and_last_step():
  now = [10.0]
  lines = []
  progress = metrics_lib.Progress(25, every_steps=10, start_step=12, clock=lambda: now[0], log=lines.append)
  for step in range(12, 25):
    now[0] += 1.0
    progress.update(step)
  assert lines == ["step 20/25 (80.0%)  1.00 steps/s  ETA 5s", "step 25/25 (100.0%)  1.00 steps/s  ETA 0s"]


def test_atomic_write_json_and_refusing_to_overwrite_results(tmp_path):
  path = str(tmp_path / "out" / "arch.json")
  rundir.atomic_write_json(path, {"version": 1, "layers": (1, 2), "macs": np.int64(7)}, overwrite=False)
  assert rundir.read_json(path) == {"version": 1, "layers": [1, 2], "macs": 7}
  with pytest.raises(rundir.FinishedResultError, match="arch.json exists already"):
    rundir.atomic_write_json(path, {"version": 2}, overwrite=False)
  with pytest.raises(rundir.FinishedResultError):
    rundir.refuse_overwrite(path)
  assert rundir.read_json(path)["version"] == 1
  rundir.atomic_write_json(path, {"version": 2})
  assert rundir.read_json(path) == {"version": 2}
  assert os.listdir(tmp_path / "out") == ["arch.json"]  # no temporary files left behind
  with pytest.raises(rundir.RunDirError, match="cannot write object"):
    rundir.atomic_write_json(path, {"bad": object()})
  assert rundir.read_json(path) == {"version": 2}  # a failed write leaves the old file whole


def test_read_json_errors_name_the_file(tmp_path):
  bad = tmp_path / "config.json"
  bad.write_text("{")
  with pytest.raises(rundir.RunDirError, match="config.json: not valid JSON"):
    rundir.read_json(str(bad))
  with pytest.raises(rundir.RunDirError, match="nope.json: no such file"):
    rundir.read_json(str(tmp_path / "nope.json"))


def _try_lock_elsewhere(workdir) -> subprocess.CompletedProcess:
  code = (f"from edgenas import rundir\nwith rundir.workdir_lock({str(workdir)!r}, primary=True):\n"
          f"  print('locked')\n")
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_workdir_lock_is_exclusive_reentrant_and_leaves_no_trace(tmp_path):
  workdir = tmp_path / "new"
  with rundir.workdir_lock(str(workdir), primary=True):
    holder = rundir.read_json(str(workdir / rundir.LOCK_FILE))
    assert holder["pid"] == os.getpid() and holder["host"] and holder["since"]
    with rundir.workdir_lock(str(workdir), primary=True):  # the same process nests
      pass
    assert (workdir / rundir.LOCK_FILE).exists()
    other = _try_lock_elsewhere(workdir)
    assert other.returncode == 1 and "WorkdirLockedError" in other.stderr
    assert f"in use by pid {os.getpid()} on {holder['host']} since {holder['since']}" in other.stderr
  assert not workdir.exists()  # created by the lock, left empty: removed
  assert _try_lock_elsewhere(workdir).stdout == "locked\n"

  kept = tmp_path / "kept"
  kept.mkdir()
  with rundir.workdir_lock(str(kept), primary=True):
    (kept / "config.json").write_text("{}")
  assert os.listdir(kept) == ["config.json"]
  with rundir.workdir_lock(str(tmp_path / "not-process-0"), primary=False):
    assert not (tmp_path / "not-process-0").exists()


def test_stale_lock_is_taken_over_and_a_foreign_host_refused(tmp_path, caplog):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  lock = tmp_path / rundir.LOCK_FILE
  lock.write_text(json.dumps(dict(pid=dead.pid, host=socket.gethostname(), since="then", command="x")))
  with caplog.at_level(logging.WARNING):
    with rundir.workdir_lock(str(tmp_path), primary=True):
      assert rundir.read_json(str(lock))["pid"] == os.getpid()
  assert f"taking over the stale lock {lock} of pid {dead.pid}" in caplog.text and "no longer running" in caplog.text
  lock.write_text(json.dumps(dict(pid=1, host="elsewhere", since="then")))
  with pytest.raises(rundir.WorkdirLockedError, match="pid 1 on elsewhere since then.*delete"):
    with rundir.workdir_lock(str(tmp_path), primary=True):
      pass
  assert json.loads(lock.read_text())["host"] == "elsewhere"  # left as it was


def test_workdir_lock_names_bad_directories(tmp_path):
  (tmp_path / "afile").write_text("")
  with pytest.raises(rundir.RunDirError, match="afile: exists and is not a directory"):
    with rundir.workdir_lock(str(tmp_path / "afile"), primary=True):
      pass
  with pytest.raises(rundir.RunDirError, match="/proc/edgenas-x: cannot create the run directory"):
    with rundir.workdir_lock("/proc/edgenas-x", primary=True):
      pass


def test_check_resume_compares_without_writing(tmp_path):
  assert rundir.check_resume(str(tmp_path / "none"), _config()) is False
  assert not (tmp_path / "none").exists()
  rundir.prepare_workdir(str(tmp_path), _config())
  assert rundir.check_resume(str(tmp_path), _config()) is True
  changed = _config()
  changed.search.lam = 0.5
  with pytest.raises(rundir.ConfigMismatchError, match="search.lam"):
    rundir.check_resume(str(tmp_path), changed)
