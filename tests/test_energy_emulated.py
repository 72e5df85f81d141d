"""Platform-true tables: per-operator counts from each target's instruction set and kernels, a cycle model per
board, constants fitted to MLPerf Tiny measurements; and the checks that make a table trustworthy."""
import itertools

import numpy as np
import pytest

from conftest import require_device
from edgenas.energy import accelerator, calibration, counts as counts_lib, cycles, lut as lut_lib
from edgenas.energy import platform as platform_lib
from edgenas.energy import timing
from edgenas.energy.errors import EnergyModelError

EMULATED = [p for p in platform_lib.list_platforms() if platform_lib.load_platform(p).target]


def test_every_mcu_platform_is_built_on_an_emulated_target():
  assert set(EMULATED) == set(platform_lib.list_platforms()) - {"host"}
  for name in EMULATED:
    p = platform_lib.load_platform(name)
    assert p.calibration.get("method") == "emulated class counts x core timing x fitted scale", name
    assert p.cycle_model["scale"] > 0 and "scale" in p.cycle_model["sources"]
    assert p.cycle_model["core_timing"] in timing.TIMINGS and p.cycle_model["sources"]["core_timing"]
    rows = lut_lib.load_lut(p.lut_path)
    assert all(r.source.startswith(f"emulated on {p.target}") for r in rows)


@pytest.mark.parametrize("a,b", list(itertools.combinations(sorted(EMULATED), 2)))
def test_no_two_platforms_tables_are_proportional(a, b):
  """A hardware-aware search must see different relative costs on different chips: the ratio of two platforms'
  latencies over the same operator configurations varies (coefficient of variation >= 10%) for every pair,
  also between the Cortex-M4 and Cortex-M7 boards, which run the same CMSIS-NN source (their core timings price
  the operators' instruction mixes differently), and between the EFR32MG24 and the others (its MVP accelerator
  runs the layers it supports at its own measured costs)."""
  rows_a = {r.spec(): r.latency_ms_mean for r in lut_lib.load_lut(platform_lib.load_platform(a).lut_path)}
  rows_b = {r.spec(): r.latency_ms_mean for r in lut_lib.load_lut(platform_lib.load_platform(b).lut_path)}
  common = [s for s in rows_a if s in rows_b and rows_a[s] > 0 and rows_b[s] > 0]
  assert len(common) > 100
  ratio = np.array([rows_a[s] / rows_b[s] for s in common])
  cov = ratio.std() / ratio.mean()
  assert cov >= 0.10, f"{a} vs {b}: ratio CoV {cov:.3f}"


def test_cortex_m4_leave_one_out_within_ten_percent_of_mlperf_tiny(tmp_path):
  """Each MLPerf Tiny model's latency and energy on the Nucleo-L4R5ZI, predicted from the constant fitted on the
  other model only, from counts measured now on the emulated Cortex-M4."""
  require_device("cortex-m4")
  p = platform_lib.load_platform("stm32l4r5_tflm")
  model = cycles.from_profile(p.cycle_model, p.path)
  ms = p.calibration["measurements"]
  emulated = [calibration.whole_model_counts(calibration.reference_model_path(m["model"]), "cortex-m4",
                                             str(tmp_path / m["benchmark"])) for m in ms]
  measured = [m["latency_ms"] * p.clock_mhz * 1e3 for m in ms]
  errors = cycles.leave_one_out(model, [e["classes"] for e in emulated], [e["flash_reads"] for e in emulated],
                                measured)
  assert all(abs(e) <= 10.0 for e in errors), errors
  scale = cycles.fit_scale(model, [e["classes"] for e in emulated], [e["flash_reads"] for e in emulated], measured)
  assert scale == pytest.approx(p.cycle_model["scale"], rel=1e-3)  # the shipped profile is what these counts give
  for entry in p.calibration["reproduction"]:
    assert abs(entry["leave_one_out_energy_error_pct"]) <= 10.0


def _classes(**counts):
  return {c: counts.get(c, 0) for c in timing.COUNTERS}


def test_cycle_model_prices_classes_with_the_core_timing_and_flash_reads_with_the_wait_states():
  m = cycles.CycleModel(flash_wait_states=5, flash_miss_fraction=0.25, core_timing="cortex-m4", scale=2.0)
  mix = _classes(alu=600, load=100, mem_pipelined=100, mul=200, cond_branch=10, cond_taken=9)
  # Cortex-M4 TRM: ALU and MAC 1 cycle, a load 2 (1 when pipelined), a taken branch 1 + P (P = 2).
  core = 600 + 2 * 100 + 100 + 200 + 10 + 9 * 2
  assert m.core_cycles(mix) == pytest.approx(core)
  assert m.cycles(mix, 400) == pytest.approx(2.0 * core + 1.25 * 400)
  with pytest.raises(EnergyModelError, match="cycle_model.flash_wait_states"):
    cycles.from_profile(dict(flash_wait_states=-1, flash_miss_fraction=0.5, core_timing="cortex-m4"), "p.json")
  with pytest.raises(EnergyModelError, match="cycle_model.core_timing"):
    cycles.from_profile(dict(flash_wait_states=1, flash_miss_fraction=0.5, core_timing="z80"), "p.json")
  with pytest.raises(EnergyModelError, match="cycle_model.sources.flash_miss_fraction"):
    cycles.from_profile(dict(flash_wait_states=1, flash_miss_fraction=0.5, core_timing="cortex-m4",
                             sources=dict(flash_wait_states="x")), "p.json")


def test_a_dual_issue_core_prices_alu_heavy_and_load_heavy_code_differently():
  """The same instruction counts, two timings: the Cortex-M7's relative cost of ALU-heavy code is lower than of
  multiply-heavy code, the Cortex-M4's is not, so the two tables are not proportional."""
  m4, m7 = timing.get("cortex-m4"), timing.get("cortex-m7")
  alu_heavy, mac_heavy = _classes(alu=900, mul=100), _classes(alu=100, mul=900)
  r_alu = m7.modelled_cycles(alu_heavy) / m4.modelled_cycles(alu_heavy)
  r_mac = m7.modelled_cycles(mac_heavy) / m4.modelled_cycles(mac_heavy)
  assert r_alu < 0.6 < 0.9 < r_mac
  with pytest.raises(EnergyModelError, match="lack"):
    m4.modelled_cycles(dict(alu=1))


@pytest.mark.parametrize("bad,message", [
    ("-5", "must be >= 0"), ("nan", "must be an integer count"), ("", "must be an integer count")])
def test_counts_table_refuses_bad_rows_naming_file_and_line(tmp_path, bad, message):
  header = ",".join(counts_lib.COLUMNS)
  classes = ",".join("1000" if c == "n_alu" else "0" for c in counts_lib.CLASS_COLUMNS)
  good = f"conv_2d,8,8,8,8,3,1,1,1000,10,20,30,4096,{classes},emulated: test"
  path = tmp_path / "counts.csv"
  path.write_text(f"{counts_lib.VERSION_LINE}\n{header}\n{good}\n{good.replace(',1000,', f',{bad},')}\n")
  with pytest.raises(EnergyModelError, match=f"counts.csv: line 4: field 'instructions' {message}"):
    counts_lib.load_counts(str(path))


def test_a_failed_counts_run_leaves_the_existing_table(tmp_path):
  path = str(tmp_path / "counts.csv")
  row = counts_lib.CountRow("add", 4, 4, 8, 8, 1, 1, 1, 100, 0, 10, 5, 512, "emulated: test",
                            _classes(alu=100))
  counts_lib.save_counts([row], path)
  before = open(path).read()

  def failing_rows():
    yield row
    raise RuntimeError("emulator died")

  with pytest.raises(RuntimeError):
    counts_lib.save_counts(failing_rows(), path)
  assert open(path).read() == before


@pytest.mark.parametrize("name", EMULATED)
def test_shipped_table_is_its_targets_counts_priced_by_its_cycle_model(name):
  """No hand-edited table: every row is scale x the core timing of its class counts + flash read cycles x flash
  reads, at the clock; on a board with an accelerator, the rows it runs are scale x its model's cycles."""
  p = platform_lib.load_platform(name)
  model = cycles.from_profile(p.cycle_model, p.path)
  counted = counts_lib.load_counts(counts_lib.counts_path(p.target))
  rows = lut_lib.load_lut(p.lut_path)
  assert [r.spec() for r in rows] == [c.spec() for c in counted]
  geoms = [accelerator.geometry(c.op, c.in_h, c.in_w, c.in_c, c.out_c, c.kernel, c.stride) for c in counted]
  expected = np.array([model.op_cycles(g, c.classes, c.flash_reads)
                       for g, c in zip(geoms, counted)]) / (p.clock_mhz * 1e3)
  np.testing.assert_allclose([r.latency_ms_mean for r in rows], expected, rtol=1e-4)
  np.testing.assert_allclose([r.energy_uj for r in rows], expected * p.active_mw, rtol=1e-3)
