"""The deployment planner on real exported networks: three small digits networks of different sizes, trained for a
few hundred Adam steps, written as retrain workdirs and exported to int8; digit 3 plays the keyword."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edgenas import architecture as arch_lib
from edgenas import data as data_lib
from edgenas import plan as plan_lib
from edgenas import quant as quant_lib
from edgenas import train as train_lib
from edgenas.export import exporter
from edgenas.export import verify
from tests.conftest import adam_trained, require_device

PLATFORM = "stm32l4r5_tflm"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = {"dataset": "digits", "data_dir": "", "image_size": 0, "val_fraction": 0.1, "data_seed": 0, "seed": 0,
          "cost": {"platform": PLATFORM}, "retrain": {"platforms": []}}


def _arch(name, stem, hidden, out):
  return arch_lib.Architecture((8, 8, 1), 10, arch_lib.Stem(stem, 3, 1),
                               (arch_lib.Layer("mbconv", stem, out, 2, 3, 3 if hidden else 1, hidden or stem),), 0,
                               name)


ARCHS = (_arch("small", 4, 0, 8), _arch("medium", 8, 24, 16), _arch("large", 16, 48, 32))


@pytest.fixture(scope="module")
def dataset():
  return data_lib.load_dataset("digits", val_fraction=0.1, seed=0)


@pytest.fixture(scope="module")
def workdirs(dataset, tmp_path_factory):
  """Retrain workdirs (arch.json, final/, config.json, report.json) of the three networks, exported."""
  root = tmp_path_factory.mktemp("plan_nets")
  out = []
  for i, arch in enumerate(ARCHS):
    variables = adam_trained(arch, dataset.train, 150 + 100 * i, seed=i)
    w = root / arch.name
    w.mkdir()
    arch.save(str(w / "arch.json"))
    train_lib.save_final(str(w), arch, variables, quant_lib.calibrate_ranges(arch, variables, dataset.train.images[:256]))
    (w / "config.json").write_text(json.dumps({"config": CONFIG}))
    (w / "report.json").write_text(json.dumps({"ranges_source": None, "test_acc_float": None,
                                               "test_acc_fake_quant": None}))
    exporter.export_workdir(str(w), strict=False)
    out.append(str(w))
  return out


SETTING = plan_lib.Setting(frame_rate_hz=2.0, events_per_hour=tuple(np.geomspace(0.1, 100, 50)))


@pytest.fixture(scope="module")
def planned(workdirs, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("plan"))
  return plan_lib.plan(workdirs, PLATFORM, "3", SETTING, min_recall=0.9, out_dir=out), out


def _outputs(workdir, dataset):
  with open(os.path.join(workdir, "export", "model.tflite"), "rb") as f:
    runner = verify.TflmRunner(f.read())
  return {s: runner.run_int8(runner.quantize_input(getattr(dataset, s).images))[:, 3] for s in ("val", "test")}


def test_every_single_model_and_every_cheaper_first_cascade(planned):
  result, _ = planned
  singles = [o for o in result["options"] if o["kind"] == "single"]
  cascades = [o for o in result["options"] if o["kind"] == "cascade"]
  assert sorted(o["name"] for o in singles) == ["large", "medium", "small"]
  assert len(cascades) == 3  # three networks: one order per pair, the cheaper network first
  energy = {o["stages"][0]: o["energy_uj"]["stage1"] for o in singles}
  for c in cascades:
    a, b = c["stages"]
    assert energy[a] < energy[b]


def test_thresholds_are_calibrated_on_validation_and_rates_measured_on_test(planned, workdirs, dataset):
  """Recomputed here from the exported models' TFLM outputs: the single model's threshold is the highest one
  meeting the validation recall, and every reported test rate is what the int8 models do."""
  result, _ = planned
  scores = {os.path.basename(w): _outputs(w, dataset) for w in workdirs}
  val_pos, test_pos = dataset.val.labels == 3, dataset.test.labels == 3
  for o in result["options"]:
    fires_val = np.ones(len(val_pos), bool)
    fires_test = np.ones(len(test_pos), bool)
    for name, t in zip(o["stages"], o["thresholds_q"]):
      fires_val &= scores[name]["val"] >= t
      fires_test &= scores[name]["test"] >= t
    assert np.mean(fires_val[val_pos]) >= 0.9
    assert o["test"]["recall"] == pytest.approx(np.mean(fires_test[test_pos]))
    assert o["test"]["false_positives"] == int(np.sum(fires_test & ~test_pos))
    if o["kind"] == "single":
      s = scores[o["name"]]["val"]
      assert np.mean(s[val_pos] >= o["thresholds_q"][0] + 1) < 0.9  # one step higher misses the recall
    else:
      stage1 = scores[o["stages"][0]]["test"] >= o["thresholds_q"][0]
      assert o["test"]["stage1_false_trigger_rate"] == pytest.approx(np.mean(stage1[~test_pos]))


def test_cascade_power_follows_the_trigger_rate_and_crosses_where_reported(planned):
  result, _ = planned
  by_name = {o["name"]: o for o in result["options"]}
  static = result["setting"]["static_mw"]
  e = np.asarray(SETTING.events_per_hour)
  p = e / 7200.0
  for o in result["options"]:
    costs = {n["name"]: {c["point"]: c for c in n["costs"]} for n in result["networks"]}
    s1 = costs[o["stages"][0]][o["operating_point"]]
    expected = static + 2.0 * s1["energy_uj"] / 1e3
    if o["kind"] == "cascade":
      s2 = costs[o["stages"][1]][o["operating_point"]]
      trigger = p * o["test"]["stage1_recall"] + (1 - p) * o["test"]["stage1_false_trigger_rate"]
      expected = expected + 2.0 * trigger * s2["energy_uj"] / 1e3
      assert o["solution_power_mw"][-1] > o["solution_power_mw"][0]  # more events, more stage-2 runs
    np.testing.assert_allclose(o["solution_power_mw"], expected + 0 * e, rtol=1e-9)
  for c in result["crossovers"]:
    if c["events_per_hour"] is None:
      continue
    casc, single = by_name[c["cascade"]], by_name[c["single"]]
    fit_c, fit_s = np.polyfit(e, casc["solution_power_mw"], 1), np.polyfit(e, single["solution_power_mw"], 1)
    x = c["events_per_hour"]
    assert np.polyval(fit_c, x) == pytest.approx(np.polyval(fit_s, x), rel=1e-6)


def test_the_recommendation_is_the_cheapest_option_where_it_is_recommended(planned):
  result, _ = planned
  e = list(SETTING.events_per_hour)
  k = e.index(result["recommended_at_events_per_hour"])
  feasible = [o for o in result["options"] if o["feasible"]]
  cheapest = min(feasible, key=lambda o: o["solution_power_mw"][k])
  assert result["recommended"] == cheapest["name"]
  d = result["deployment"]
  assert d["positive_index"] == 3 and [s["name"] for s in d["stages"]] == cheapest["stages"]
  assert all(os.path.isfile(s["tflite"]) for s in d["stages"])
  assert d["data_config"]["dataset"] == "digits"


def test_operating_point_minimises_the_options_power_under_the_deadline(planned):
  result, _ = planned
  for o in result["options"]:
    table = o["operating_points"]
    ok = [r for r in table if r["latency_ms"] <= result["setting"]["deadline_ms"]]
    assert min(ok, key=lambda r: r["solution_power_mw"])["point"] == o["operating_point"]


def test_launcher_writes_the_plan_quickly_and_refuses_bad_input(workdirs, tmp_path):
  out = tmp_path / "plan"
  cmd = [sys.executable, "-m", "launch.plan", f"--networks={','.join(workdirs)}", "--positive=3",
         "--events_per_hour=0.1:100:50", "--min_recall=0.9", "--battery_mwh=2000", f"--out_dir={out}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((out / "plan.json").read_text())
  assert result["seconds"]["plan"] < 30 and len(result["setting"]["events_per_hour"]) == 50
  assert (out / "plan.png").stat().st_size > 10_000 and "## Recommendation" in (out / "plan.md").read_text()
  assert "battery_life_days" in result["options"][0]

  def refused(*args, networks=workdirs):
    bad = [sys.executable, "-m", "launch.plan", f"--networks={','.join(networks)}",
           f"--out_dir={tmp_path / 'bad'}", *args]
    p = subprocess.run(bad, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, p.stderr[-2000:]
    return lines[0]

  assert "--min_recall must be in (0, 1]" in refused("--positive=3", "--min_recall=1.5")
  # a deadline no operating point meets (a perfect validation score, by contrast, tiny digits networks can reach)
  line = refused("--positive=3", "--deadline_ms=0.001")
  assert "no network or cascade meets" in line and "no operating point meets the deadline of 0.001 ms" in line
  assert "is not a class" in refused("--positive=eleven")
  assert "two or more networks" in refused("--positive=3", networks=workdirs[:1])
  # a network trained on another validation split
  other = tmp_path / "other"
  other.mkdir()
  os.symlink(os.path.join(workdirs[0], "final"), other / "final")
  for f in ("arch.json", "report.json"):
    (other / f).write_text(open(os.path.join(workdirs[0], f)).read())
  (other / "config.json").write_text(json.dumps({"config": dict(CONFIG, data_seed=1)}))
  os.symlink(os.path.join(workdirs[0], "export"), other / "export")
  line = refused("--positive=3", networks=[workdirs[1], str(other)])
  assert "different data" in line and "data_seed" in line


# --------------------------------------------------------------------------------------------------------------
# The plan deployed: one device program, stage 2 only when stage 1 fires (edgenas.export.cascade)


@pytest.fixture(scope="module")
def plan_dir(planned):
  result, out = planned
  plan_lib.write_plan(result, out)
  return out


def _a_cascade(result):
  return next(o for o in result["options"] if o["kind"] == "cascade" and o.get("thresholds_q"))


def test_cascade_program_on_cortex_m4_matches_the_host_frame_by_frame(planned, plan_dir, dataset, tmp_path):
  from edgenas.device import errors as device_errors
  from edgenas.export import cascade
  require_device("cortex-m4")
  require_device("rv32imac")
  result, _ = planned
  option = _a_cascade(result)
  out = str(tmp_path / "cascade")
  report = cascade.export_plan(plan_dir, out, ["cortex-m4", "rv32imac"], frames=12, option=option["name"])
  for name in ("main.cc", "model_data.cc", "model_data.h", "model_ops.h", "Makefile.cortex_m", "stage1.tflite",
               "stage2.tflite"):
    assert os.path.isfile(os.path.join(out, name)), name
  # The frames' decisions recomputed here from the two exported models in the host's TFLite Micro interpreter.
  index = np.asarray(report["frames"]["test_indices"])
  images = dataset.test.images[index]
  scores = []
  for stage in option["stages"]:
    with open(next(n["tflite"] for n in result["networks"] if n["name"] == stage), "rb") as f:
      runner = verify.TflmRunner(f.read())
    scores.append(runner.run_int8(runner.quantize_input(images))[:, 3].astype(int))
  t1, t2 = option["thresholds_q"]
  fired = scores[0] >= t1
  assert report["frames"]["stages_run"] == [2 if f else 1 for f in fired]
  assert report["frames"]["detected"] == [int(f and s >= t2) for f, s in zip(fired, scores[1])]
  assert 0 < fired.sum() < len(index)  # both branches of the detector run
  t = report["targets"]["cortex-m4"]
  assert t["matches_host"] and t["frames_matching"] == t["frames_checked"] == 12
  assert t["stage2_runs"] == int(fired.sum()) and t["detections"] == sum(report["frames"]["detected"])
  small, large = t["instructions_per_stage"]
  assert 0 < small < large  # the cheaper network runs first
  assert t["instructions_per_frame"]["min"] < small + large <= t["instructions_per_frame"]["max"]
  assert all(a > 0 for a in t["arena_used_bytes"])
  rv = report["targets"]["rv32imac"]  # the same program on RISC-V, TFLM's reference kernels
  assert rv["matches_host"] and rv["frames_matching"] == 12 and rv["stage2_runs"] == t["stage2_runs"]

  # A host reference that differs in one byte is caught and named.
  data = os.path.join(out, "model_data.cc")
  text = open(data).read()
  head, rows = text.split("g_edgenas_expected_outputs", 1)
  body_start = rows.index("{{") + 2
  value_end = rows.index(",", body_start)
  value = int(rows[body_start:value_end])
  rows = rows[:body_start] + str(value + 1 if value < 127 else value - 1) + rows[value_end:]
  open(data, "w").write(head + "g_edgenas_expected_outputs" + rows)
  with pytest.raises(device_errors.MismatchError, match="frame 0 differs .* stage1_output0"):
    cascade.run_plan_target(out, "cortex-m4")


def test_launcher_exports_the_recommended_plan_and_refuses_a_bad_one(planned, plan_dir, tmp_path):
  result, _ = planned
  out = tmp_path / "recommended"
  cmd = [sys.executable, "-m", "launch.export", f"--plan={plan_dir}", f"--out_dir={out}", "--targets=none",
         "--plan_frames=4"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((out / "report.json").read_text())
  assert report["option"] == result["recommended"] and len(report["frames"]["test_indices"]) == 4
  assert [s["threshold_q"] for s in report["stages"]] == [s["threshold_q"] for s in result["deployment"]["stages"]]
  assert f"EDGENAS_NUM_STAGES {len(report['stages'])}" in (out / "model_data.h").read_text()

  def refused(plan_json):
    bad = tmp_path / "bad_plan"
    bad.mkdir(exist_ok=True)
    (bad / "plan.json").write_text(json.dumps(plan_json))
    p = subprocess.run([sys.executable, "-m", "launch.export", f"--plan={bad}", "--targets=none"], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, p.stderr[-2000:]
    return lines[0]

  assert "no deployment section" in refused({"version": 1})
  stages = [dict(s, sha256="0" * 64) for s in result["deployment"]["stages"]]
  assert "changed since it was planned" in refused(dict(result, deployment=dict(result["deployment"],
                                                                                stages=stages)))
  assert "not an int8 level" in refused(dict(result, deployment=dict(result["deployment"], stages=[
      dict(s, threshold_q=300) for s in result["deployment"]["stages"]])))
