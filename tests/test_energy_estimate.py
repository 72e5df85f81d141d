"""Estimates of whole networks and the `launch.estimate` command line, end to end."""
import json
import os
import subprocess
import sys

import pytest

from edgenas import space as space_lib
from edgenas.energy import estimate
from edgenas.energy import platform as platform_lib
from edgenas.energy.errors import EnergyModelError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KWS = os.path.join(REPO, "testdata", "kws_dscnn_int8.tflite")
SPACE = dict(input_shape=(8, 8, 1), num_classes=10, stem=dict(channels=8, kernel=3, stride=1),
             stages=[dict(layers=2, channels=8, stride=1), dict(layers=1, channels=16, stride=2)],
             kernels=[3, 5], expansions=[1, 3])


def _arch():
  return space_lib.SearchSpace.from_config(SPACE).architecture([1, 4, 0], [24, 0, 8], name="tiny")


def _run(*args):
  return subprocess.run([sys.executable, "-m", "launch.estimate", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=120)


def test_architecture_report_adds_up_and_checks_budgets():
  report = estimate.estimate_architecture(_arch(), "stm32l4r5_tflm", rate_hz=2.0, battery_mwh=1000.0)
  ops = report["operators"]
  assert len(ops) == len(_arch().ops())
  assert report["latency_ms"] == pytest.approx(sum(o["latency_ms"] for o in ops))
  assert report["energy_uj"] == pytest.approx(sum(o["energy_uj"] for o in ops))
  assert all(o["latency_ms"] > 0 for o in ops if o["op"] != "reshape")
  assert report["fits_sram"] and report["fits_flash"]
  platform = platform_lib.load_platform("stm32l4r5_tflm")
  power = report["power"]
  assert power["solution_power_mw"] == pytest.approx(platform.static_mw + 2.0 * report["energy_uj"] / 1e3)
  assert report["battery"]["life_hours"] == pytest.approx(1000.0 / power["solution_power_mw"])


def test_costlier_platform_and_larger_network_cost_more():
  small = estimate.estimate_architecture(_arch(), "stm32l4r5_tflm")
  wide = space_lib.SearchSpace.from_config(SPACE).architecture([3, 3, 3], [24, 24, 24])
  assert estimate.estimate_architecture(wide, "stm32l4r5_tflm")["energy_uj"] > small["energy_uj"]
  assert estimate.estimate_architecture(_arch(), "stm32h7a3_xcubeai")["latency_ms"] < small["latency_ms"]


def test_queries_beyond_the_table_are_flagged_not_silently_trusted():
  space = dict(SPACE, input_shape=(64, 64, 3), stem=dict(channels=512, kernel=3, stride=1),
               stages=[dict(layers=1, channels=512, stride=1)], expansions=[6])
  arch = space_lib.SearchSpace.from_config(space).architecture([0], [3072])
  report = estimate.estimate_architecture(arch, "stm32l4r5_tflm")
  assert any("in_c=3072" in f and "outside the table's" in f for f in report["out_of_range"])
  assert not report["fits_sram"]  # 64x64x3072 int8 activations do not fit in 640 KB


def test_rate_beyond_what_the_device_can_run_is_an_error():
  with pytest.raises(EnergyModelError, match="highest possible rate"):
    estimate.estimate_tflite(KWS, "stm32l4r5_tflm", rate_hz=100.0)
  with pytest.raises(EnergyModelError, match="needs an inference rate"):
    estimate.estimate_tflite(KWS, "stm32l4r5_tflm", battery_mwh=100.0)


def test_launcher_prints_json_for_a_tflite_and_an_arch_json(tmp_path):
  result = _run("--platform=stm32l4r5_tflm", f"--model={KWS}", "--rate=0.5", "--battery_mwh=2000")
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout)
  assert report["platform"] == "stm32l4r5_tflm" and len(report["operators"]) == 13
  assert report["flash_bytes"] == os.path.getsize(KWS)
  assert report["battery"]["life_days"] > 0 and 0 < report["power"]["duty_cycle"] < 1
  arch_path = str(tmp_path / "arch.json")
  _arch().save(arch_path)
  result = _run("--platform=andes_d45_tflm", f"--model={arch_path}", "--noper_operator")
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout)
  assert report["model"] == "tiny" and "operators" not in report and report["energy_uj"] > 0


def test_launcher_reports_bad_input_clearly(tmp_path):
  bad = tmp_path / "arch.json"
  bad.write_text(json.dumps({"version": 1}))
  result = _run(f"--model={bad}")
  assert result.returncode == 1 and "missing field 'input_shape'" in result.stderr and not result.stdout
