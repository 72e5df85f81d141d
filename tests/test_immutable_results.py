"""Finished results are never rewritten: sweep reruns with the same, more or fewer members, and the pipeline
summary on a finished rerun."""
import hashlib
import json
import os

import pytest

from conftest import small_search_config
from edgenas import pipeline
from edgenas import sweep


def snapshot(directory):
  """{relative path: (sha256, mtime_ns)} of every file under `directory` but the workdir lock."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      if name == ".lock":
        continue
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
  return out


def read(path):
  with open(path) as f:
    return json.load(f)


# ---- sweeps


def test_sweep_reruns_write_new_sets_and_never_touch_finished_ones(tmp_path, capsys):
  workdir = str(tmp_path / "sweep")
  first = sweep.run_sweep(small_search_config(), workdir, [0.0])
  root = {kind: os.path.join(workdir, name) for kind, name in sweep.result_files(None).items()}
  assert first["result_set"]["files"] == sweep.result_files(None) and all(map(os.path.exists, root.values()))
  finished = snapshot(workdir)

  # The same members again: nothing searched, nothing written.
  capsys.readouterr()
  again = sweep.run_sweep(small_search_config(), workdir, [0.0])
  assert "nothing to compute or write" in capsys.readouterr().out
  assert snapshot(workdir) == finished
  assert again == read(root["sweep"])

  # A superset: only the new member is searched; the first set stays byte for byte, a new set holds both.
  union = sweep.run_sweep(small_search_config(), workdir, [0.0, 3.0])
  out = capsys.readouterr().out
  assert "lam0-stm32l4r5_tflm: search already finished; skipping it" in out
  assert "lam3-stm32l4r5_tflm: searching" in out
  assert f"{sweep.SWEEP_FILE} stay as written" in out
  after = snapshot(workdir)
  assert {path: after[path] for path in finished} == finished  # every file there before, untouched
  key = sweep.result_set_key(["lam0-stm32l4r5_tflm", "lam3-stm32l4r5_tflm"], "search")
  assert union["result_set"]["key"] == key
  assert union["result_set"]["files"] == sweep.result_files(key) == dict(
      sweep=f"sweep-{key}.json", pareto=f"pareto-{key}.json", plot=f"pareto-{key}.png", summary=f"summary-{key}.md")
  assert all(os.path.exists(os.path.join(workdir, name)) for name in union["result_set"]["files"].values())
  assert [r["id"] for r in read(root["sweep"])["members"]] == ["lam0-stm32l4r5_tflm"]
  assert read(os.path.join(workdir, f"sweep-{key}.json")) == union
  assert union["members"][0]["arch_hash"] == first["members"][0]["arch_hash"]  # reused, not searched again
  assert read(os.path.join(workdir, f"pareto-{key}.json"))["sweep"] == f"sweep-{key}.json"

  # A subset of the union, and the union again: the finished set is reported, nothing is written.
  for lambdas in ([3.0], [3.0, 0.0]):
    reported = sweep.run_sweep(small_search_config(), workdir, lambdas)
    assert f"finished result set sweep-{key}.json (2 members" in capsys.readouterr().out
    assert reported == union
    assert snapshot(workdir) == after


def _record(i, lam, acc, energy):
  return dict(id=f"lam{lam:g}-p", lam=lam, platform="p", status="searched", target=None, arch_hash=f"a{i}",
              val_acc=acc, test_acc=None, energy_uj=energy, latency_ms=1.0, peak_sram_bytes=1024,
              flash_bytes=2048)


def test_write_outputs_names_sets_and_writes_their_record_last(tmp_path):
  workdir = str(tmp_path)
  records = [_record(0, 0.0, 0.9, 10.0), _record(1, 1.0, 0.8, 5.0), _record(2, 3.0, 0.7, 2.0)]
  first = sweep.write_outputs(workdir, [dict(r) for r in records[:2]])
  assert first["result_set"]["files"] == sweep.result_files(None)
  before = snapshot(workdir)
  assert sweep.write_outputs(workdir, [dict(r) for r in records[1::-1]]) == first  # same members, any order
  assert snapshot(workdir) == before

  # Leftovers of a write killed before its record (the sweep JSON) are written again; finished sets are not.
  key = sweep.result_set_key([r["id"] for r in records], "search")
  names = sweep.result_files(key)
  with open(os.path.join(workdir, names["summary"]), "w") as f:
    f.write("half a summary")
  second = sweep.write_outputs(workdir, [dict(r) for r in records])
  assert second["result_set"]["files"] == names
  assert "lam3-p" in open(os.path.join(workdir, names["summary"])).read()
  assert {path: value for path, value in snapshot(workdir).items() if path in before} == before

  # Another stage of the same members is another set; a later stage covers an earlier one.
  third = sweep.write_outputs(workdir, [dict(r) for r in records], stage="retrain")
  assert third["result_set"]["key"] == sweep.result_set_key([r["id"] for r in records], "retrain") != key
  assert sweep.covering_set(workdir, ["lam3-p"], "search") == second  # the smallest covering set, nearest stage
  assert sweep.covering_set(workdir, ["lam3-p"], "retrain") == third
  assert sweep.covering_set(workdir, ["lam3-p"], "export") is None
  assert sweep.covering_set(workdir, ["lam10-p"], "search") is None


def test_a_sweep_json_from_before_result_sets_is_one_finished_set(tmp_path):
  records = [_record(0, 0.0, 0.9, 10.0)]
  with open(tmp_path / sweep.SWEEP_FILE, "w") as f:
    json.dump(dict(version=1, mode="sequential", accuracy_key="val_acc", members=records, baselines=[]), f)
  assert sweep.set_identity(sweep.finished_sets(str(tmp_path))[0]) == (frozenset({"lam0-p"}), "search")
  assert sweep.covering_set(str(tmp_path), ["lam0-p"], "search")["members"] == records
  new = sweep.write_outputs(str(tmp_path), [dict(records[0]), _record(1, 1.0, 0.8, 5.0)])
  assert new["result_set"]["files"]["sweep"].startswith("sweep-")  # the old file keeps its plain name


# ---- the pipeline summary


def _summary(seconds, rows=("searched",)):
  row = dict(network="", arch_hash="abc", test_acc_float=0.9, test_acc_fake_quant=0.89, energy_uj=12.5,
             latency_ms=3.2, peak_sram_bytes=4096, flash_bytes=8192, macs=10000, params=600,
             **{"energy_vs_mobilenetv2_1.0": None})
  return dict(platform="stm32l4r5_tflm", dataset="digits", rows=[{**row, "network": n} for n in rows],
              search=dict(arch_hash="abc", layers=["k3e1:8"], val_acc_supernet=0.8, cost_model="energy",
                          lam=0.1, penalty="mnas"),
              seconds=dict(seconds, total=sum(seconds.values())),
              files=dict(arch="w/search/arch.json", retrain_report="w/retrain/report.json", export=None,
                         tflite=None, export_report=None))


FIRST = dict(search=120.0, retrain=300.0, export=0.0, baselines=0.0)
RESUMED = dict(search=1.5, retrain=0.4, export=0.0, baselines=0.0)  # a rerun that only read finished stages


def test_pipeline_summary_is_left_alone_on_a_finished_rerun(tmp_path):
  workdir = str(tmp_path)
  nothing_before = dict.fromkeys(FIRST, False)
  written = pipeline.write_summary(workdir, _summary(FIRST), nothing_before)
  assert written["seconds"]["total"] == 420.0
  table = open(tmp_path / pipeline.SUMMARY_MD).read()
  assert "Wall time: 420 s (search 120, retrain 300" in table
  before = snapshot(workdir)
  all_before = dict(search=True, retrain=True, export=False, baselines=False)
  kept = pipeline.write_summary(workdir, _summary(RESUMED), all_before)
  assert snapshot(workdir) == before
  assert kept["seconds"] == written["seconds"]
  # Other paths for the same files (a relative --workdir now) are no change either.
  moved = _summary(RESUMED)
  moved["files"]["arch"] = os.path.abspath("w/search/arch.json")
  assert pipeline.write_summary(workdir, moved, all_before) == kept and snapshot(workdir) == before


def test_pipeline_summary_rewritten_when_a_stage_adds_results_keeps_earlier_wall_times(tmp_path):
  workdir = str(tmp_path)
  pipeline.write_summary(workdir, _summary(FIRST), dict.fromkeys(FIRST, False))
  grown = _summary(dict(RESUMED, baselines=60.0), rows=("searched", "mobilenetv2_0.35"))
  written = pipeline.write_summary(workdir, grown, dict(search=True, retrain=True, export=False, baselines=False))
  assert written["seconds"] == dict(search=120.0, retrain=300.0, export=0.0, baselines=60.0, total=480.0)
  assert read(tmp_path / pipeline.SUMMARY_JSON) == json.loads(json.dumps(written))
  table = open(tmp_path / pipeline.SUMMARY_MD).read()
  assert "mobilenetv2_0.35" in table and "Wall time: 480 s (search 120, retrain 300" in table


def test_pipeline_rerun_leaves_its_summary_and_wall_times_alone(tmp_path, capsys):
  """A real (tiny, search + retrain) pipeline: a finished rerun rewrites nothing; with the summary deleted, the
  rewrite takes each stage's time from what the stage recorded, not from the resume's few seconds."""
  config = small_search_config()
  config.retrain.update(epochs=2, warmup_epochs=0, qat_epochs=1)
  workdir = str(tmp_path / "pipeline")
  first = pipeline.run_pipeline(config, workdir, baselines=False, export=False)
  files = [os.path.join(workdir, name) for name in (pipeline.SUMMARY_JSON, pipeline.SUMMARY_MD)]
  before = {path: snapshot(workdir)[os.path.basename(path)] for path in files}
  capsys.readouterr()
  again = pipeline.run_pipeline(config, workdir, baselines=False, export=False)
  assert "the summary is up to date" in capsys.readouterr().out
  assert {path: snapshot(workdir)[os.path.basename(path)] for path in files} == before
  assert again["seconds"] == json.loads(json.dumps(first["seconds"]))

  for path in files:
    os.remove(path)
  rebuilt = pipeline.run_pipeline(config, workdir, baselines=False, export=False)
  assert rebuilt["seconds"]["search"] == read(os.path.join(workdir, "search", "search.json"))["seconds"]["total"]
  assert rebuilt["seconds"]["retrain"] == read(os.path.join(workdir, "retrain", "report.json"))["seconds"][
      "this_process"]
  assert rebuilt["seconds"]["retrain"] > 1.0


@pytest.mark.parametrize("garbled", [True, False])
def test_pipeline_summary_without_a_readable_previous_one_is_written(tmp_path, garbled):
  if garbled:
    (tmp_path / pipeline.SUMMARY_JSON).write_text("{not json")
  written = pipeline.write_summary(str(tmp_path), _summary(RESUMED), dict.fromkeys(FIRST, True))
  assert read(tmp_path / pipeline.SUMMARY_JSON)["seconds"] == written["seconds"]
  assert os.path.exists(tmp_path / pipeline.SUMMARY_MD)
