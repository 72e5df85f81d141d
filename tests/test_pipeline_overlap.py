"""The pipeline retrains its baselines in a thread beside the search, retrain and export (edgenas.pipeline): the
result is the same as in turn, the progress lines say which stage they belong to, and when the main stages stop
the baselines stop with a checkpoint that a rerun resumes."""
import json
import os

import pytest

from edgenas import pipeline
from edgenas import search as search_lib
from tests.conftest import small_search_config


def _config():
  c = small_search_config()
  c.retrain.update(epochs=2, warmup_epochs=0, qat_epochs=0)
  c.baselines = ("dscnn",)
  return c


def _report(path):
  with open(path) as f:
    return json.load(f)


def test_baselines_beside_give_the_result_they_give_in_turn(tmp_path, capsys):
  config = _config()
  summary = pipeline.run_pipeline(config, str(tmp_path / "beside"), export=False)
  out = capsys.readouterr().out
  assert "[baselines] " in out  # its progress lines name it
  assert [r["network"] for r in summary["rows"]] == ["searched", "dscnn"]
  assert summary["seconds"]["baselines_own"] > 0
  assert summary["seconds"]["total"] == pytest.approx(sum(summary["seconds"][s] for s in pipeline.STAGES))

  # The same baseline retrained alone, in the main thread: the same weights, so the same accuracy.
  from edgenas import baselines as baselines_lib
  from edgenas import train as train_lib
  arch = baselines_lib.baseline_architectures((8, 8, 1), 10, names=("dscnn",))["dscnn"]
  alone = train_lib.run_retrain(config, arch, str(tmp_path / "alone"), platforms=[config.cost.platform])
  beside = _report(tmp_path / "beside" / "baselines" / "dscnn" / "report.json")
  assert beside["arch_hash"] == alone["arch_hash"]
  assert beside["test_acc_float"] == alone["test_acc_float"]
  assert beside["test_acc_fake_quant"] == alone["test_acc_fake_quant"]


def test_a_failing_main_stage_stops_the_baselines_at_a_checkpoint_and_a_rerun_resumes(tmp_path, monkeypatch,
                                                                                      capsys):
  config = _config()
  config.retrain.epochs = 6  # long enough that the search below fails while the baseline is still training
  workdir = tmp_path / "pipeline"
  checkpoints = workdir / "baselines" / "dscnn" / "checkpoints"
  real_search = search_lib.run_search

  def search_that_fails(*args, **kwargs):
    import time
    deadline = time.time() + 300
    while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
      assert time.time() < deadline, "the baseline never wrote a checkpoint"
      time.sleep(0.2)
    raise RuntimeError("the search failed")

  monkeypatch.setattr(search_lib, "run_search", search_that_fails)
  with pytest.raises(RuntimeError, match="the search failed"):
    pipeline.run_pipeline(config, str(workdir), export=False)
  out = capsys.readouterr().out
  assert "stopping the baselines running beside" in out
  assert not (workdir / "baselines" / "dscnn" / "report.json").exists()  # stopped before finishing
  saved = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  assert saved

  monkeypatch.setattr(search_lib, "run_search", real_search)
  summary = pipeline.run_pipeline(config, str(workdir), export=False)
  out = capsys.readouterr().out
  assert f"[baselines] " in out and "resum" in out.lower()
  assert [r["network"] for r in summary["rows"]] == ["searched", "dscnn"]
  assert os.path.exists(workdir / "baselines" / "dscnn" / "report.json")
