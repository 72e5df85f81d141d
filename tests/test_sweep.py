"""Energy-penalty sweeps: input checks, a 2-member sweep end to end, resume, vectorised == sequential, and a
two-process run on loopback through JAX's distributed runtime."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import SMALL_SEARCH_CONFIG, small_search_config
from edgenas import pareto as pareto_lib
from edgenas import population
from edgenas import sweep

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAMBDAS = (0.0, 3.0)


def read(path):
  with open(path) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sequential"))
  return workdir, sweep.run_sweep(small_search_config(), workdir, LAMBDAS)


@pytest.fixture(scope="module")
def vectorised(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("vectorised"))
  return workdir, sweep.run_sweep(small_search_config(), workdir, LAMBDAS, vectorize=True)


# ---- bad input, refused before any work


@pytest.mark.parametrize("lambdas, platforms, targets, message", [
    ([], (), (), "λ list is empty"),
    ([0.1, -1.0], (), (), "must be finite and >= 0"),
    ([0.1], ("no_such_board",), (), "unknown platform(s) no_such_board"),
    ([0.1, 0.3, 0.1], (), (), "duplicate λ value(s) 0.1"),
    ([0.1], ("stm32l4r5_tflm", "stm32l4r5_tflm"), (), "duplicate platform"),
    ([0.1], (), (50.0,), "only the target and mnas penalties"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, lambdas, platforms, targets, message):
  workdir = tmp_path / "sweep"
  with pytest.raises(sweep.SweepError, match=None) as info:
    sweep.run_sweep(small_search_config(), str(workdir), lambdas, platforms, targets)
  assert message in str(info.value)
  assert not workdir.exists()


@pytest.mark.parametrize("field, value, message", [
    ("warmup_epochs", 99, "config.retrain.warmup_epochs must be a number in [0, 30)"),
    ("baselines", ("resnet50",), "unknown baseline(s) 'resnet50'"),
])
def test_bad_retrain_settings_are_refused_before_the_search(tmp_path, field, value, message):
  """A sweep with --retrain, or a pipeline, finds a bad retrain field or baseline name before searching."""
  from edgenas import pipeline
  c = small_search_config()
  if field == "baselines":
    c.baselines = value
  else:
    c.retrain[field] = value
  workdir = tmp_path / "sweep"
  with pytest.raises(ValueError) as info:
    sweep.run_sweep(c, str(workdir), [0.1], retrain=True)
  assert message in str(info.value)
  assert not workdir.exists()
  with pytest.raises(ValueError) as info:
    pipeline.run_pipeline(c, str(tmp_path / "pipeline"))
  assert message in str(info.value)
  assert not (tmp_path / "pipeline").exists()


def test_parse_values_names_the_flag():
  assert sweep.parse_values("0, 0.1,3", "lambdas") == [0.0, 0.1, 3.0]
  with pytest.raises(sweep.SweepError, match="--lambdas: 'x' is not a number"):
    sweep.parse_values("0,x", "lambdas")
  with pytest.raises(sweep.SweepError, match="not a finite number"):
    sweep.parse_values("nan", "lambdas")


def test_target_sweep_plans_every_combination():
  c = small_search_config()
  c.cost.penalty = "target"
  members = sweep.plan_members(c, [0.1, 1.0], (), [40.0, 80.0])
  assert sorted(m.id for m in members) == sorted(f"lam{l:g}-t{t:g}-stm32l4r5_tflm" for l in (0.1, 1) for t in (40, 80))
  assert sweep.member_config(c, members[0]).cost.target == members[0].target


def test_launcher_refuses_a_negative_lambda(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "launch.sweep", "--config=experiments/tiny.py",
                         f"--workdir={tmp_path / 'w'}", "--lambdas=0,-0.5"], cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 1
  assert "λ values must be finite and >= 0" in proc.stderr
  assert not (tmp_path / "w").exists()


def test_population_refuses_members_differing_beyond_the_penalty():
  a, b = small_search_config(), small_search_config()
  b.search.max_steps = 7
  with pytest.raises(population.PopulationError, match="search.max_steps"):
    population.check_population([a, b])


# ---- a 2-member sweep end to end


def test_sweep_writes_consistent_outputs(sequential):
  workdir, result = sequential
  records = read(os.path.join(workdir, sweep.SWEEP_FILE))["members"]
  assert [r["lam"] for r in records] == list(LAMBDAS)
  for r in records:
    assert r["status"] == "searched"
    assert os.path.exists(os.path.join(workdir, r["workdir"], "arch.json"))
    assert r["energy_uj"] > 0 and r["latency_ms"] > 0 and r["peak_sram_bytes"] > 0 and r["flash_bytes"] > 0
    assert 0 <= r["val_acc"] <= 1 and 0 <= r["test_acc"] <= 1 and r["test_acc_source"] == "supernet"
  front = read(os.path.join(workdir, sweep.PARETO_FILE))
  assert front["accuracy_key"] == "val_acc"
  front_ids = {r["id"] for r in front["members"]}
  assert front_ids and front_ids <= {r["id"] for r in records}
  for r in records:  # the front is exactly the non-dominated set
    dominated = any(pareto_lib.dominates(o, r, "val_acc") for o in records if o is not r)
    assert (r["id"] in front_ids) == (not dominated) == r["on_front"]
  with open(os.path.join(workdir, sweep.PLOT_FILE), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  summary = open(os.path.join(workdir, sweep.SUMMARY_FILE)).read()
  assert all(r["id"] in summary for r in records)
  assert result["members"][0]["arch_hash"] == records[0]["arch_hash"]


def test_pareto_front_keeps_only_non_dominated_members():
  rec = lambda i, acc, e, p="a": dict(id=i, lam=0.0, platform=p, status="searched", val_acc=acc, energy_uj=e)
  records = [rec("cheap", 0.80, 10.0), rec("best", 0.95, 50.0), rec("worse", 0.85, 60.0), rec("mid", 0.90, 20.0),
             rec("other", 0.50, 100.0, "b"), rec("failed", None, None)]
  front = pareto_lib.pareto_front(records, "val_acc")
  assert [r["id"] for r in front] == ["cheap", "mid", "best", "other"]


def test_resume_skips_finished_members_and_resumes_unfinished_ones(sequential, capsys):
  workdir, first = sequential
  capsys.readouterr()
  members = sweep.plan_members(small_search_config(), LAMBDAS)
  finished = os.path.join(sweep.member_dir(workdir, members[0]), "search.json")
  before = os.path.getmtime(finished)
  # Killed after the second member's last checkpoint, before its results and the sweep's (a finished result set
  # would be reported as it is): the second member must resume, not restart.
  second = sweep.member_dir(workdir, members[1])
  for name in ("search.json", "arch.json", sweep.TEST_ACC_FILE):
    os.remove(os.path.join(second, name))
  for name in sweep.result_files(None).values():
    os.remove(os.path.join(workdir, name))
  again = sweep.run_sweep(small_search_config(), workdir, LAMBDAS)
  out = capsys.readouterr().out
  assert f"{members[0].id}: search already finished; skipping it" in out
  assert "resuming from checkpoint step 5" in out
  assert os.path.getmtime(finished) == before
  assert [r["arch_hash"] for r in again["members"]] == [r["arch_hash"] for r in first["members"]]
  assert again["members"][1]["test_acc"] == pytest.approx(first["members"][1]["test_acc"])


# ---- vectorised and multi-process populations equal the members run alone


def _alphas(workdir, result):
  return [np.concatenate([np.ravel(a) for a in read(os.path.join(workdir, r["workdir"], "search.json"))["alpha"]])
          for r in result["members"]]


def test_vectorised_members_equal_sequential_searches(sequential, vectorised):
  (seq_dir, seq), (vec_dir, vec) = sequential, vectorised
  for a, b in zip(_alphas(seq_dir, seq), _alphas(vec_dir, vec)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for s, v in zip(seq["members"], vec["members"]):
    assert s["arch_hash"] == v["arch_hash"]
    assert s["val_acc"] == pytest.approx(v["val_acc"], abs=1e-6)
    assert s["test_acc"] == pytest.approx(v["test_acc"], abs=1e-6)
    assert s["expected_cost"] == pytest.approx(v["expected_cost"], rel=1e-4)
    # the gate-closure probe sees the same supernet either way (its random draws are taken in another order)
    gs = read(os.path.join(seq_dir, s["workdir"], "search.json"))["gate_closure"]
    gv = read(os.path.join(vec_dir, v["workdir"], "search.json"))["gate_closure"]
    assert (gs["closed_groups"], gs["groups"]) == (gv["closed_groups"], gv["groups"])
    assert gs["val_acc_all_open"] == pytest.approx(gv["val_acc_all_open"], abs=1e-6)
    assert gs["lowest_logits"]["val_acc"] == pytest.approx(gv["lowest_logits"]["val_acc"], abs=1e-6)
  # a λ > 0 really changes the search: the penalised member's expected cost is lower
  assert vec["members"][1]["expected_cost"] < vec["members"][0]["expected_cost"]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_on_loopback_match_the_single_process_population(tmp_path, vectorised):
  vec_dir, vec = vectorised
  config = tmp_path / "config.py"
  config.write_text(SMALL_SEARCH_CONFIG)
  workdir = tmp_path / "multihost"
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  procs = [subprocess.Popen(
      [sys.executable, "-m", "launch.sweep", f"--config={config}", f"--workdir={workdir}",
       f"--lambdas={','.join(map(str, LAMBDAS))}", "--vectorize", "--multihost",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs
  assert "2 slots over 2 device(s)" in outputs[0] and "2 process(es)" in outputs[0]
  multi = read(workdir / sweep.SWEEP_FILE)
  for a, b in zip(_alphas(str(workdir), multi), _alphas(vec_dir, vec)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert [r["arch_hash"] for r in multi["members"]] == [r["arch_hash"] for r in vec["members"]]
