"""The search launcher end to end: outputs, resume after SIGKILL, NaN stop, refusals, multi-device equivalence."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_config(tmp_path, name, body=""):
  """A config file deriving from experiments/tiny.py with a few overrides."""
  path = tmp_path / f"{name}.py"
  path.write_text("from experiments import tiny\n\n\ndef get_config():\n  c = tiny.get_config()\n"
                  + "".join(f"  {line}\n" for line in body.strip().splitlines()) + "  return c\n")
  return str(path)


def launch(config, workdir, devices=1, extra=(), wait=True):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "launch.search", f"--config={config}", f"--workdir={workdir}", *extra]
  if not wait:
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
  return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)


def read(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    return json.load(f) if name.endswith(".json") else f.read()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted tiny search."""
  tmp = tmp_path_factory.mktemp("ref")
  config = write_config(tmp, "cfg")
  workdir = str(tmp / "run")
  r = launch(config, workdir)
  assert r.returncode == 0, r.stdout + r.stderr
  return config, workdir, r


def test_search_writes_arch_metrics_and_progress(reference):
  _, workdir, r = reference
  arch = read(workdir, "arch.json")
  assert arch["version"] == 1 and len(arch["layers"]) == 2
  result = read(workdir, "search.json")
  assert result["steps"] == 12 and 0.0 <= result["val_acc_supernet"] <= 1.0
  assert "energy on stm32l4r5_tflm" in result["cost_model"] and result["derived_cost"] > 0
  metrics = [json.loads(l) for l in read(workdir, "metrics.jsonl").splitlines()]
  assert [m["step"] for m in metrics] == [3, 7, 11]
  assert all("alpha_entropy" in m and "train_ce" in m for m in metrics)
  assert "ETA" in r.stdout and "step 12/12" in r.stdout
  assert os.path.exists(os.path.join(workdir, "config.json"))


def test_finished_run_is_not_repeated_or_overwritten(reference):
  config, workdir, _ = reference
  before = os.path.getmtime(os.path.join(workdir, "arch.json"))
  r = launch(config, workdir)
  assert r.returncode == 0 and "already finished" in r.stdout
  assert os.path.getmtime(os.path.join(workdir, "arch.json")) == before


def test_changed_config_on_resume_is_refused(reference, tmp_path):
  _, workdir, _ = reference
  other = write_config(tmp_path, "other", "c.cost.lam = 0.5")
  r = launch(other, workdir)
  assert r.returncode == 1
  assert "cost.lam" in r.stderr and "another configuration" in r.stderr


def test_killed_run_resumes_to_the_same_architecture(reference, tmp_path):
  config, ref_dir, _ = reference
  workdir = str(tmp_path / "killed")
  proc = launch(config, workdir, wait=False)
  ckpts = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpts) and any(d.isdigit() and int(d) >= 3 for d in os.listdir(ckpts)):
      break
    time.sleep(0.2)
  assert proc.poll() is None, "the run finished before it could be killed:\n" + proc.stdout.read()
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(workdir, "arch.json"))
  r = launch(config, workdir)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "resuming from checkpoint step" in r.stdout
  assert read(workdir, "arch.json") == read(ref_dir, "arch.json")
  got, want = read(workdir, "search.json"), read(ref_dir, "search.json")
  assert got["alpha"] == want["alpha"]
  assert read(workdir, "metrics.jsonl") == read(ref_dir, "metrics.jsonl")


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path):
  # α moves only after 5 warm-up steps; an infinite α learning rate then makes the loss NaN.
  config = write_config(tmp_path, "nan", "c.search.warmup_epochs = 0.15\nc.arch.lr = float('inf')")
  workdir = str(tmp_path / "nan")
  r = launch(config, workdir)
  assert r.returncode == 1
  assert "became nan" in r.stderr
  kept = re.search(r"last good checkpoint is step (\d+)", r.stderr)
  assert kept, r.stderr
  steps = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert max(steps) == int(kept.group(1)) >= 4  # saved before α blew up, and not overwritten by a NaN state
  assert not os.path.exists(os.path.join(workdir, "arch.json"))


def test_bad_config_is_refused_before_any_work(tmp_path):
  config = write_config(tmp_path, "bad", "c.space.stages = [dict(layers=1, channels=8, stride=2)] * 5")
  r = launch(config, str(tmp_path / "bad"))
  assert r.returncode == 1 and "space.stages[3].stride" in r.stderr
  assert not os.path.exists(tmp_path / "bad" / "checkpoints")


def test_four_devices_give_the_same_architecture_logits_as_one(tmp_path):
  config = write_config(tmp_path, "dp", "c.search.relaxation = 'softmax'\nc.search.max_steps = 6")
  one, four = str(tmp_path / "one"), str(tmp_path / "four")
  r1, r4 = launch(config, one, devices=1), launch(config, four, devices=4)
  assert r1.returncode == 0 and r4.returncode == 0, r1.stderr + r4.stderr
  assert read(one, "search.json")["devices"] == 1 and read(four, "search.json")["devices"] == 4
  for a, b in zip(read(one, "search.json")["alpha"], read(four, "search.json")["alpha"]):
    assert a == pytest.approx(b, abs=1e-4)
