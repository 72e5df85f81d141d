"""Platform profiles and lookup tables: shipped files load, bad files are rejected with a useful message."""
import json
import math
import os

import pytest

from edgenas import ops as ops_lib
from edgenas.energy import features as features_lib
from edgenas.energy import lut as lut_lib
from edgenas.energy import platform as platform_lib
from edgenas.energy.errors import EnergyModelError

HEADER = ",".join(lut_lib.COLUMNS)
GOOD_ROW = "conv_2d,8,8,16,32,3,1,1,0.25,0.01,20,10.5,measured: test"


def _write(tmp_path, text, name="t.csv"):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def test_every_shipped_platform_loads_with_fitted_coefficients_and_its_table():
  names = platform_lib.list_platforms()
  assert {"host", "stm32l4r5_tflm", "stm32h7a3_xcubeai", "andes_d45_tflm", "efr32mg24_tflm"} <= set(names)
  assert platform_lib.DEFAULT_PLATFORM == "stm32l4r5_tflm"
  for name in names:
    p = platform_lib.load_platform(name)
    assert p.name == name
    rows = lut_lib.load_lut(p.lut_path)
    assert {r.op for r in rows} == set(ops_lib.OP_TYPES), name
    for quantity in platform_lib.QUANTITIES:
      coefs = p.coefficients(quantity)
      if "accelerator" in p.cycle_model:  # every regime the core runs; the accelerator's ops also accelerated
        from edgenas.energy import accelerator
        core = {r + features_lib.ON_CORE for r in features_lib.REGIMES}
        accelerated = {r for r in features_lib.REGIMES if features_lib.base_op(r) in accelerator.ACCELERATED_OPS}
        assert set(coefs) == core | accelerated, (name, quantity)
      else:
        assert set(coefs) == set(features_lib.REGIMES), (name, quantity)  # every op type and special kernel
      assert all(len(v) == len(features_lib.FEATURES) and min(v) >= 0 for v in coefs.values())
    assert p.fit_quality["latency_ms"]["rows"] == len(rows)


def test_lut_round_trip(tmp_path):
  path = _write(tmp_path, f"{lut_lib.VERSION_LINE}\n{HEADER}\n{GOOD_ROW}\n")
  rows = lut_lib.load_lut(path)
  out = str(tmp_path / "copy.csv")
  lut_lib.save_lut(rows, out)
  assert lut_lib.load_lut(out) == rows
  assert rows[0].spec() == ops_lib.OpSpec("conv_2d", 8, 8, 16, 32, 3, 1)


@pytest.mark.parametrize("text, expected", [
    (f"{HEADER}\n{GOOD_ROW}\n", "line 1 must be the version line"),
    (f"#edgenas-lut version=7\n{HEADER}\n{GOOD_ROW}\n", "unsupported LUT version '7'"),
    (f"{lut_lib.VERSION_LINE}\n{HEADER.replace(',energy_uj', '')}\n{GOOD_ROW}\n", "missing column(s) energy_uj"),
    (f"{lut_lib.VERSION_LINE}\n{HEADER}\n{GOOD_ROW.replace('conv_2d', 'conv_3d')}\n",
     "line 3: field 'op' is 'conv_3d'"),
    (f"{lut_lib.VERSION_LINE}\n{HEADER}\n{GOOD_ROW}\n{GOOD_ROW.replace('0.25', '-0.25')}\n",
     "line 4: field 'latency_ms_mean' must be a finite cost >= 0"),
    (f"{lut_lib.VERSION_LINE}\n{HEADER}\n{GOOD_ROW.replace('10.5', 'nan')}\n",
     "line 3: field 'energy_uj' must be a finite cost >= 0"),
    (f"{lut_lib.VERSION_LINE}\n{HEADER}\n{GOOD_ROW.replace(',8,8,', ',8,x,')}\n",
     "line 3: field 'in_w' must be an integer"),
    (f"{lut_lib.VERSION_LINE}\n{HEADER}\n{GOOD_ROW.replace('measured: test', '')}\n",
     "line 3: field 'source' is empty"),
    (f"{lut_lib.VERSION_LINE}\n{HEADER}\n", "has no rows"),
])
def test_lut_loader_rejects_bad_files_naming_file_row_and_field(tmp_path, text, expected):
  path = _write(tmp_path, text)
  with pytest.raises(EnergyModelError) as e:
    lut_lib.load_lut(path)
  assert path in str(e.value)
  assert expected in str(e.value)


def _profile_dict():
  with open(os.path.join(platform_lib.PLATFORMS_DIR, "stm32l4r5_tflm.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.pop("clock_mhz"), "missing field 'clock_mhz'"),
    (lambda d: d.update(version=2), "unsupported 'version' 2"),
    (lambda d: d.update(sram_bytes=-5), "field 'sram_bytes' must be a positive integer"),
    (lambda d: d.update(active_mw=float("nan")), "field 'active_mw' must be a finite number"),
    (lambda d: d["sources"].pop("static_mw"), "gives no source for static_mw"),
    (lambda d: d["regressor"]["latency_ms"].update(conv_2d=[1.0, -2.0, 0.0, 0.0, 0.0]),
     "field 'regressor.latency_ms.conv_2d': expected 5 non-negative coefficients"),
    (lambda d: d["regressor"]["latency_ms"].update(conv_3d=[0.0] * 5), "'regressor.latency_ms.conv_3d': unknown"),
    (lambda d: d["regressor"].update(power_w={}), "'regressor.power_w' is not a quantity"),
])
def test_platform_loader_rejects_bad_profiles_naming_the_field(tmp_path, mutate, expected):
  d = _profile_dict()
  mutate(d)
  path = _write(tmp_path, json.dumps(d), "bad.json")
  with pytest.raises(EnergyModelError) as e:
    platform_lib.load_platform(path)
  assert path in str(e.value) and expected in str(e.value)


def test_platform_loader_errors_for_unknown_name_and_unfitted_profile(tmp_path):
  with pytest.raises(EnergyModelError, match="unknown platform 'pdp11'.*stm32l4r5_tflm"):
    platform_lib.load_platform("pdp11")
  d = _profile_dict()
  d["regressor"] = {}
  path = _write(tmp_path, json.dumps(d), "unfitted.json")
  with pytest.raises(EnergyModelError, match="'regressor.energy_uj' is empty"):
    platform_lib.load_platform(path).coefficients("energy_uj")


def test_platform_round_trip_and_calibrated_tables_name_their_source(tmp_path):
  p = platform_lib.load_platform("stm32l4r5_tflm")
  out = str(tmp_path / "copy.json")
  platform_lib.save_platform(p, out)
  q = platform_lib.load_platform(out)
  assert q.coefficients("energy_uj") == p.coefficients("energy_uj")
  assert all(r.source.startswith("emulated on cortex-m4:") for r in lut_lib.load_lut(p.lut_path))
  assert all(r.source.startswith("measured:") for r in lut_lib.load_lut(platform_lib.load_platform("host").lut_path))
  # Energy of a calibrated table is latency x the measured average power, row by row.
  r = lut_lib.load_lut(p.lut_path)[0]
  assert math.isclose(r.energy_uj, r.latency_ms_mean * p.active_mw, rel_tol=1e-3)
