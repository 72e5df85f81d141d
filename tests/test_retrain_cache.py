"""Baselines retrained once: the same network, data, retrain config, seed and code reuse a finished retrain; a
change in any of them trains again; search settings do not count."""
import os

from edgenas import retrain_cache
from edgenas import rundir
from edgenas import train
from tests.test_train import ARCH, tiny_config

PLATFORMS = ["stm32l4r5_tflm"]


def test_a_baseline_is_retrained_once_and_reused(tmp_path, monkeypatch):
  monkeypatch.setenv(retrain_cache.ENV, str(tmp_path / "cache"))
  calls = []

  def run(config, arch, workdir, platforms):
    calls.append(workdir)
    return train.run_retrain(config, arch, workdir, platforms)

  first = retrain_cache.retrain_baseline(tiny_config(), ARCH, str(tmp_path / "a" / "tiny"), PLATFORMS, run)
  assert len(calls) == 1 and len(os.listdir(tmp_path / "cache")) == 1

  other_search = tiny_config()
  other_search.cost.lam = 3.0  # a search setting: the retrain does not read it
  second = retrain_cache.retrain_baseline(other_search, ARCH, str(tmp_path / "b" / "tiny"), PLATFORMS, run)
  assert len(calls) == 1, "the same retrain ran again"
  assert second["reused_from"].startswith(str(tmp_path / "cache"))
  assert {k: v for k, v in second.items() if k != "reused_from"} == first
  reused = tmp_path / "b" / "tiny"
  assert (reused / "final").is_dir() and not (reused / "checkpoints").exists()
  # The copy is a finished run of this config: retraining it there only reads it.
  assert rundir.read_json(str(reused / "config.json")) == rundir.to_jsonable(train.recorded_config(other_search, ARCH))
  assert train.run_retrain(other_search, ARCH, str(reused), PLATFORMS)["test_acc_float"] == first["test_acc_float"]

  reseeded = tiny_config()
  reseeded.seed = 1
  retrain_cache.retrain_baseline(reseeded, ARCH, str(tmp_path / "c" / "tiny"), PLATFORMS, run)
  shorter = tiny_config(epochs=1, qat_epochs=0)
  retrain_cache.retrain_baseline(shorter, ARCH, str(tmp_path / "d" / "tiny"), PLATFORMS, run)
  assert len(calls) == 3 and len(os.listdir(tmp_path / "cache")) == 3

  monkeypatch.setenv(retrain_cache.ENV, "")  # off
  retrain_cache.retrain_baseline(tiny_config(), ARCH, str(tmp_path / "e" / "tiny"), PLATFORMS, run)
  assert len(calls) == 4
