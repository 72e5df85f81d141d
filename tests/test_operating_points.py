"""Operating points (clock / core voltage / flash wait states) of the shipped MCU profiles, and a network priced
at each (edgenas.energy.operating): real profiles and models, no mocks."""
import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from edgenas.energy import estimate
from edgenas.energy import operating
from edgenas.energy import platform as platform_lib
from edgenas.energy import regressor
from edgenas.energy.errors import EnergyModelError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MCU = ("stm32l4r5_tflm", "stm32h7a3_xcubeai", "andes_d45_tflm", "efr32mg24_tflm")
KWS = os.path.join(REPO, "testdata", "kws_dscnn_int8.tflite")
IC = os.path.join(REPO, "testdata", "ic_resnet8_int8.tflite")


@pytest.fixture(scope="module")
def reports():
  return {(name, model): estimate.estimate_tflite(model, name) for name in MCU for model in (KWS, IC)}


def _rel(a, b):
  return abs(a / b - 1.0)


@pytest.mark.parametrize("name", MCU)
def test_every_mcu_profile_has_three_sourced_points_one_of_them_its_nominal_one(name):
  p = platform_lib.load_platform(name)
  pts = operating.points(p)
  assert len(pts) >= 3
  for q in pts:
    assert q.clock_mhz > 0 and q.voltage_v > 0 and q.active_mw > 0 and q.flash_wait_states >= 0
    assert all(str(q.sources.get(k, "")).strip() for k in platform_lib.POINT_FIELDS), q.name
  nominal = [q for q in pts if q.nominal]
  assert len(nominal) == 1
  assert (nominal[0].clock_mhz, nominal[0].flash_wait_states, nominal[0].active_mw) == (
      p.clock_mhz, p.cycle_model["flash_wait_states"], p.active_mw)
  assert "flash_reads" in p.regressor


def test_a_profile_without_points_has_its_nominal_point_alone():
  host = platform_lib.load_platform("host")
  (only,) = operating.points(host)
  assert only.nominal and only.clock_mhz == host.clock_mhz and only.flash_wait_states == 0
  report = estimate.estimate_tflite(KWS, host)
  assert report["flash_reads"] is None  # the host has no counts
  priced = operating.price(host, only, report["cycles"], None, report["energy_uj"])
  assert _rel(priced["latency_ms"], report["latency_ms"]) < 1e-9


@pytest.mark.parametrize("name", MCU)
def test_the_nominal_point_reproduces_the_estimate(name, reports):
  p = platform_lib.load_platform(name)
  nominal = operating.nominal_point(p)
  for model in (KWS, IC):
    r = reports[(name, model)]
    assert r["flash_reads"] == pytest.approx(sum(o["flash_reads"] for o in r["operators"]), rel=1e-9)
    priced = operating.price(p, nominal, r["cycles"], r["flash_reads"], r["energy_uj"])
    assert _rel(priced["latency_ms"], r["latency_ms"]) < 1e-6
    assert _rel(priced["energy_uj"], r["energy_uj"]) < 1e-6
    # Without the estimate's energy: latency x active power, which the energy regressor matches to its rounding.
    plain = operating.price(p, nominal, r["cycles"], r["flash_reads"])
    assert _rel(plain["latency_ms"], r["latency_ms"]) < 1e-6 and _rel(plain["energy_uj"], r["energy_uj"]) < 1e-4
    # Per operator, as arrays.
    per_op = operating.price(p, nominal, np.array([o["cycles"] for o in r["operators"]]),
                             np.array([o["flash_reads"] for o in r["operators"]]),
                             np.array([o["energy_uj"] for o in r["operators"]]))
    np.testing.assert_allclose(per_op["latency_ms"], [o["latency_ms"] for o in r["operators"]], rtol=1e-6)
    np.testing.assert_allclose(per_op["energy_uj"], [o["energy_uj"] for o in r["operators"]], rtol=1e-6)


def test_wait_states_price_flash_reads_only(reports):
  p = platform_lib.load_platform("stm32l4r5_tflm")
  r = reports[("stm32l4r5_tflm", KWS)]
  miss, ws = p.cycle_model["flash_miss_fraction"], p.cycle_model["flash_wait_states"]
  for q in operating.points(p):
    priced = operating.price(p, q, r["cycles"], r["flash_reads"])
    assert priced["cycles"] == pytest.approx(r["cycles"] + (q.flash_wait_states - ws) * miss * r["flash_reads"],
                                             rel=1e-12)
    assert priced["latency_ms"] == pytest.approx(priced["cycles"] / (q.clock_mhz * 1e3), rel=1e-12)
    assert priced["energy_uj"] == pytest.approx(priced["latency_ms"] * q.active_mw, rel=1e-12)


def test_a_flash_heavy_and_a_compute_heavy_operator_prefer_different_clocks():
  """On the EFR32MG24 every flash data read of the core pays the wait state (no data cache): below 40 MHz it
  needs none, but the constant part of the run current is paid for twice as long. A layer too wide for the MVP
  (a 1x1 convolution to 1280 channels) runs on the core and streams its weights from flash; a layer the MVP
  runs is priced by the board's measured costs, with no core flash term, and is cheapest at the nominal clock."""
  from edgenas.energy import accelerator, counts as counts_lib, cycles as cycles_lib, lut as lut_lib
  p = platform_lib.load_platform("efr32mg24_tflm")
  model = cycles_lib.from_profile(p.cycle_model, p.path)
  rows = lut_lib.load_lut(p.lut_path)
  counted = counts_lib.load_counts(counts_lib.counts_path(p.target))
  geoms = [accelerator.geometry(c.op, c.in_h, c.in_w, c.in_c, c.out_c, c.kernel, c.stride) for c in counted]
  cycles = np.array([r.latency_ms_mean * p.clock_mhz * 1e3 for r in rows])
  reads = np.array([0.0 if model.accelerated(g) else c.flash_reads for g, c in zip(geoms, counted)])
  energy = np.array([r.energy_uj for r in rows])
  miss, ws = p.cycle_model["flash_miss_fraction"], p.cycle_model["flash_wait_states"]
  share = ws * miss * reads / cycles
  heavy, light = int(np.argmax(share)), int(np.argmin(share))
  assert share[heavy] > 0.12 and share[light] < 0.01  # measured: the 1x1 conv 320 -> 1280 at 0.15, MVP rows 0
  assert not model.accelerated(geoms[heavy]) and model.accelerated(geoms[light])
  pts = operating.points(p)
  nominal = operating.nominal_point(p)
  ratio = {}
  for i in (heavy, light):
    priced = {q.name: operating.price(p, q, cycles[i], reads[i], energy[i]) for q in pts}
    ratio[i] = {k: v["energy_uj"] / energy[i] for k, v in priced.items()}
    for q in pts:
      if q.flash_wait_states < nominal.flash_wait_states:  # fewer wait states: fewer cycles, by the flash term only
        saved = cycles[i] - priced[q.name]["cycles"]
        assert saved == pytest.approx((ws - q.flash_wait_states) * miss * reads[i], rel=1e-9, abs=1e-6)
        assert (saved > 0) == (reads[i] > 0)
  best = {i: min(ratio[i], key=ratio[i].get) for i in ratio}
  assert best[heavy] == "vs1_39mhz" and best[light] == nominal.name  # 0.96 of its nominal energy; 1.13 there
  assert ratio[heavy]["vs1_39mhz"] < 1 < ratio[light]["vs1_39mhz"]
  # A lower clock is not free: with no flash reads, every slower point costs more energy per inference.
  for q in pts:
    if q.clock_mhz < nominal.clock_mhz:
      assert operating.price(p, q, 1e6, 0.0)["energy_uj"] > operating.price(p, nominal, 1e6, 0.0)["energy_uj"]


def _profile(name="stm32l4r5_tflm"):
  p = platform_lib.load_platform(name)
  with open(p.path) as f:
    return json.load(f), p.path


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["operating_points"][2]["sources"].pop("voltage_v"),
     r"platform stm32l4r5_tflm, operating point 'range1_normal_80mhz': no source for 'voltage_v'"),
    (lambda d: d["operating_points"][1]["sources"].update(active_mw="  "),
     r"operating point 'range1_boost_100mhz': no source for 'active_mw'"),
    (lambda d: d["operating_points"][3].pop("sources"), r"operating point 'range1_normal_60mhz': field 'sources'"),
    (lambda d: d["operating_points"][2].update(clock_mhz=-80.0), r"'range1_normal_80mhz': field 'clock_mhz' must be"),
    (lambda d: d["operating_points"][2].update(active_mw=float("nan")), r"field 'active_mw' must be a finite"),
    (lambda d: d["operating_points"][2].update(flash_wait_states=2.5), r"field 'flash_wait_states' must be an int"),
    (lambda d: d["operating_points"][2].update(name="range1_boost_120mhz"), r"given twice"),
    (lambda d: d["operating_points"].pop(0), r"lacks the profile's nominal point \(clock_mhz 120"),
    (lambda d: d.update(operating_points=[]), r"field 'operating_points' must be a non-empty list"),
])
def test_a_bad_operating_point_is_refused_in_one_line_naming_it(edit, message):
  d, path = _profile()
  d = copy.deepcopy(d)
  edit(d)
  with pytest.raises(EnergyModelError, match=message) as e:
    platform_lib.platform_from_dict(d, path)
  assert "\n" not in str(e.value) and path in str(e.value)


def test_choose_takes_the_least_power_meeting_the_deadline_and_names_the_fastest_when_none_does(reports):
  p = platform_lib.load_platform("stm32l4r5_tflm")
  r = reports[("stm32l4r5_tflm", KWS)]
  best = operating.best_for_report(p, r, rate_hz=2.0, deadline_ms=300.0)
  ok = [row for row in best["points"] if row["latency_ms"] <= 300.0]
  assert {row["point"] for row in ok} == {"range1_boost_120mhz", "range1_boost_100mhz", "range1_normal_80mhz"}
  assert best["chosen"] == min(ok, key=lambda row: row["solution_power_mw"])
  for row in best["points"]:
    if row["duty_cycle"] > 1:  # cannot run twice a second at this clock
      assert row["solution_power_mw"] is None and not row["meets_deadline"]
    else:
      assert row["solution_power_mw"] == pytest.approx(p.static_mw + 2.0 * row["energy_uj"] / 1e3, rel=1e-12)
  # The default deadline is the frame period; points too slow for the rate are never chosen.
  default = operating.best_for_report(p, r, rate_hz=2.0)
  assert default["deadline_ms"] == 500.0 and all(row["duty_cycle"] <= 1 for row in default["points"]
                                                 if row["meets_deadline"])
  with pytest.raises(EnergyModelError, match=r"no operating point meets the deadline of 100 ms; the fastest, "
                                             r"range1_boost_120mhz \(120 MHz\), takes 191\.\d ms") as e:
    operating.best_for_report(p, r, rate_hz=2.0, deadline_ms=100.0)
  assert "\n" not in str(e.value)
  for bad in (0.0, -5.0, float("nan"), float("inf")):
    with pytest.raises(EnergyModelError, match="deadline must be a finite number"):
      operating.best_for_report(p, r, rate_hz=2.0, deadline_ms=bad)

  # The generic form, as a cascade planner calls it: any (latency, power) per point, here two networks in turn.
  ic = reports[("stm32l4r5_tflm", IC)]

  def two(q):
    a = operating.price(p, q, r["cycles"], r["flash_reads"])
    b = operating.price(p, q, ic["cycles"], ic["flash_reads"])
    return a["latency_ms"] + b["latency_ms"], p.static_mw + 0.5 * (a["energy_uj"] + b["energy_uj"]) / 1e3

  chosen, table = operating.choose(p, two, deadline_ms=1200.0)
  assert len(table) == len(operating.points(p))
  ok = [row for row in table if row["latency_ms"] <= 1200.0]
  assert chosen.name == min(ok, key=lambda row: row["solution_power_mw"])["point"]


def test_the_refit_keeps_latency_and_energy_and_the_points():
  for name in ("stm32l4r5_tflm", "efr32mg24_tflm"):
    p = platform_lib.load_platform(name)
    fitted = regressor.fit_platform(p)
    for quantity in ("latency_ms", "energy_uj", "instructions", "flash_reads"):
      # Equal up to the non-negative least squares' numerical zeros: coefficients of 1e-19 to 4e-17 came out
      # different on an AMD EPYC and on the Xeon that fitted the profiles (BLAS reduction order).
      assert set(fitted.regressor[quantity]) == set(p.regressor[quantity]), (name, quantity)
      for op, coefs in p.regressor[quantity].items():
        np.testing.assert_allclose(fitted.regressor[quantity][op], coefs, rtol=1e-6, atol=1e-12,
                                   err_msg=f"{name} {quantity} {op}")
    assert fitted.operating_points == p.operating_points
    assert fitted.to_dict()["operating_points"] == p.to_dict()["operating_points"]


def _launch(*args):
  return subprocess.run([sys.executable, "-m", "launch.estimate", f"--model={KWS}", "--per_operator=false", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=300)


def test_launch_estimate_prints_the_chosen_point_and_refuses_a_bad_deadline(reports):
  proc = _launch("--rate=2", "--deadline_ms=300")
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads(proc.stdout)["operating_points"]
  expected = operating.best_for_report(platform_lib.load_platform("stm32l4r5_tflm"),
                                       reports[("stm32l4r5_tflm", KWS)], 2.0, 300.0)
  assert out["chosen"]["point"] == expected["chosen"]["point"] == "range1_normal_80mhz"
  assert out["deadline_ms"] == 300.0 and len(out["points"]) == 7
  assert math.isclose(out["chosen"]["solution_power_mw"], expected["chosen"]["solution_power_mw"], rel_tol=1e-9)
  for args, line in ((("--rate=2", "--deadline_ms=100"), "no operating point meets the deadline of 100 ms"),
                     (("--rate=2", "--deadline_ms=-3"), "--deadline_ms must be a finite number"),
                     (("--deadline_ms=300",), "--deadline_ms needs --rate")):
    proc = _launch(*args)
    assert proc.returncode == 1 and proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and line in last, proc.stderr[-2000:]
