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
  # α moves only after 6 warm-up steps; a huge α learning rate (finite: Inf is refused up front) then overflows it.
  config = write_config(tmp_path, "nan", "c.search.warmup_epochs = 0.15\nc.arch.lr = 1e38")
  workdir = str(tmp_path / "nan")
  r = launch(config, workdir)
  assert r.returncode == 1
  assert "became nan" in r.stderr or "became NaN/Inf" in r.stderr, r.stderr
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
  """Two steps agree to 1e-8 (measured). Over more steps, reduction-order noise of 1e-8 grows: a hard-concrete
  gate sample at its clip boundary clips on one run and not the other, and Adam turns the gates' now non-trivial
  gradients into lr-sized updates (1.1e-3 apart after 6 steps), so the equivalence is checked where it is exact."""
  config = write_config(tmp_path, "dp", "c.search.relaxation = 'softmax'\nc.search.max_steps = 2")
  one, four = str(tmp_path / "one"), str(tmp_path / "four")
  r1, r4 = launch(config, one, devices=1), launch(config, four, devices=4)
  assert r1.returncode == 0 and r4.returncode == 0, r1.stderr + r4.stderr
  assert read(one, "search.json")["devices"] == 1 and read(four, "search.json")["devices"] == 4
  for a, b in zip(read(one, "search.json")["alpha"], read(four, "search.json")["alpha"]):
    assert a == pytest.approx(b, abs=1e-6)


# ---- the config and finished-search checks, called directly (no launcher, no data, no device)


def _tiny(**changes):
  """experiments/tiny.py with {"section.field": value} changes."""
  from experiments import tiny
  c = tiny.get_config()
  for path, value in changes.items():
    *sections, key = path.split(".")
    node = c
    for s in sections:
      node = node[s]
    node[key] = value
  return c


@pytest.mark.parametrize("changes, message", [
    ({"cost.lam": float("nan")}, r"config\.cost\.lam must be a finite number, got nan"),
    ({"cost.lam": -0.1}, r"config\.cost\.lam must be a number >= 0, got -0\.1"),
    ({"cost.target": float("inf")}, r"config\.cost\.target must be a finite number"),
    ({"cost.beta": float("nan")}, r"config\.cost\.beta must be a finite number"),
    ({"cost.memory_weight": float("nan")}, r"config\.cost\.memory_weight must be a finite number"),
    ({"search.epochs": -1}, r"config\.search\.epochs must be an integer >= 1, got -1"),
    ({"search.epochs": 0}, r"config\.search\.epochs must be an integer >= 1, got 0"),
    ({"search.batch_size": 0}, r"config\.search\.batch_size must be an integer >= 1, got 0"),
    ({"search.warmup_epochs": -1.0}, r"config\.search\.warmup_epochs must be a number in \[0, 1\)"),
    ({"search.warmup_epochs": 1.0}, r"config\.search\.warmup_epochs .*config\.search\.epochs is 1"),
    ({"search.max_steps": -1}, r"config\.search\.max_steps must be an integer >= 0, got -1"),
    ({"search.tau_min": 0.0}, r"config\.search\.tau_min must be a number > 0"),
    ({"search.tau_max": float("nan")}, r"config\.search\.tau_max must be a finite number"),
    ({"search.relaxation": "annealed"}, r"config\.search\.relaxation must be one of 'softmax', 'gumbel', "),
    ({"weights.lr": float("inf")}, r"config\.weights\.lr must be a finite number, got inf"),
    ({"weights.weight_decay": float("nan")}, r"config\.weights\.weight_decay must be a finite number"),
    ({"weights.momentum": 1.0}, r"config\.weights\.momentum must be a number in \[0, 1\)"),
    ({"weights.lr_min": 1.0}, r"config\.weights\.lr_min must be a number in \[0, 0\.1\]"),
    ({"weights.optimizer": "lamb"}, r"config\.weights\.optimizer must be one of 'sgd', 'adamw'"),
    ({"arch.lr": float("inf")}, r"config\.arch\.lr must be a finite number, got inf"),
    ({"arch.b2": 1.0}, r"config\.arch\.b2 must be a number in \[0, 1\)"),
    ({"val_fraction": 1.0}, r"config\.val_fraction must be a number in \(0, 1\), got 1\.0"),
    ({"checkpoint_every": 0}, r"config\.checkpoint_every must be an integer >= 1"),
    ({"cost.model": "flops"}, r"config\.cost\.model must be one of 'energy', 'latency', 'macs'"),
    ({"cost.platform": "nosuchchip"}, r"config\.cost\.platform: unknown platform 'nosuchchip'; shipped platforms: "
                                      r".*stm32l4r5_tflm"),
    ({"space.stages": [dict(layers=1, channels=8, stride=3)]},
     r"space\.stages\[0\]\.stride' must be 1 or 2 \(or an \(h, w\) pair of them\), got 3"),
    ({"cost.penalty": "multiplicative", "cost.target": 800.0},
     r"config\.cost\.penalty='multiplicative' .*depended on the cost's unit.*use config\.cost\.penalty='mnas'"),
    ({"data_seed": -1}, r"config\.data_seed must be an integer >= 0, got -1"),
    ({"search.arch_every": 0}, r"config\.search\.arch_every must be an integer >= 1, got 0"),
    ({"search.weight_sharing": "tied"}, r"config\.search\.weight_sharing must be one of 'independent', 'entangled'"),
])
def test_check_config_refuses_a_bad_field_naming_it(changes, message):
  from edgenas import search
  with pytest.raises(ValueError, match=message) as e:
    search.check_config(_tiny(**changes))
  assert "\n" not in str(e.value)


def test_check_config_passes_the_shipped_configs():
  from edgenas import search
  from experiments import cifar10, digits, kws, tiny
  for module in (digits, tiny, cifar10, kws):
    search.check_config(module.get_config())


def _finished_search_dir(tmp_path, arch_text):
  """A workdir that looks finished: search.json recording the tiny network, and `arch_text` as its arch.json."""
  from edgenas import architecture as arch_lib
  from edgenas import rundir
  arch = arch_lib.Architecture((8, 8, 1), 10, arch_lib.Stem(8, 3, 1),
                               (arch_lib.Layer("skip", 8, 8, 1), arch_lib.Layer("mbconv", 8, 16, 2, 3, 1, 8)))
  workdir = tmp_path / "finished"
  workdir.mkdir()
  rundir.atomic_write_json(str(workdir / "search.json"), {"arch_hash": arch.hash(), "arch": arch.summary()})
  if arch_text is not None:
    (workdir / "arch.json").write_text(arch.to_json() + "\n" if arch_text == "valid" else arch_text)
  return workdir


def _digests(workdir):
  import hashlib
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(workdir.iterdir())
          if p.name in ("arch.json", "search.json")}


@pytest.mark.parametrize("arch_text, message", [
    ("garbage, not JSON", r"arch\.json does not load \(.*arch\.json: not valid JSON"),
    ('{"version": 1, "kernal": 3}', r"arch\.json does not load \(.*unknown field 'kernal'"),
    ('{"version": 1, "name": "", "input_shape": [8, 8, 1], "num_classes": 10, "head_channels": 0, '
     '"stem": {"channels": 8, "kernel": 3, "stride": 1}, '
     '"layers": [{"op": "skip", "in_channels": 8, "out_channels": 8, "stride": 1}]}', r"arch\.json holds architecture"),
    (None, r"arch\.json is missing"),
])
def test_finished_search_with_a_broken_arch_json_is_refused_and_left_alone(tmp_path, arch_text, message):
  from edgenas import search
  workdir = _finished_search_dir(tmp_path, arch_text)
  before = _digests(workdir)
  with pytest.raises(search.FinishedSearchError, match=message) as e:
    search.run_search(_tiny(), str(workdir))
  assert "search finished (search.json records architecture" in str(e.value) and "\n" not in str(e.value)
  assert _digests(workdir) == before
  assert not (workdir / "checkpoints").exists()


def test_finished_search_with_its_arch_json_is_returned_as_recorded(tmp_path):
  from edgenas import rundir, search
  workdir = _finished_search_dir(tmp_path, "valid")
  before = _digests(workdir)
  assert search.finished_result(str(workdir)) == rundir.read_json(str(workdir / "search.json"))
  assert search.finished_result(str(tmp_path)) is None  # nothing finished there
  assert _digests(workdir) == before


def test_arch_steps_come_every_arch_every_steps_after_the_warm_up():
  from edgenas import search
  c = _tiny(**{"search.arch_every": 3})
  due = [step for step in range(12) if search.arch_step_due(step, 4, c.search)]
  assert due == [4, 7, 10]
  assert [step for step in range(6) if search.arch_step_due(step, 4, _tiny().search)] == [4, 5]  # default: every step


def test_a_search_with_sparser_arch_steps_runs_and_records_them(tmp_path):
  """arch_every=4 on the tiny search (no warm-up): α steps at steps 0, 4 and 8 only; α moves, and the records
  logged at steps 3, 7 and 11, which took no α step, carry no α figures."""
  config = write_config(tmp_path, "sparse", "c.search.arch_every = 4")
  workdir = str(tmp_path / "run")
  r = launch(config, workdir)
  assert r.returncode == 0, r.stdout + r.stderr
  result = read(workdir, "search.json")
  assert result["steps"] == 12
  assert any(abs(a) > 0 for row in result["alpha"] for a in row)
  metrics = [json.loads(l) for l in read(workdir, "metrics.jsonl").splitlines()]
  assert [m["step"] for m in metrics] == [3, 7, 11] and not any("alpha_entropy" in m for m in metrics)
