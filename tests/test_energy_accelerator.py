"""The EFR32MG24's MVP accelerator: measured layers, which layers it runs, the cycle model fitted to them, and
the board's calibration against MLPerf Tiny with no constant fitted to those two measurements."""
import dataclasses
import json

import numpy as np
import pytest

from conftest import require_device
from edgenas.energy import accelerator, calibration, cycles, lut as lut_lib, platform as platform_lib
from edgenas.energy import tflite_graph
from edgenas.energy.errors import EnergyModelError

# A profile table in MLTK's format; the numbers are made up for the parser, not measurements.
PROFILE = """
    Model Layers
    +-------+-----------------+-------+--------+------------+------------+----------+-----------------------+--------------+----------------------------------------------------+
    | Index | OpCode          | # Ops | # MACs | Acc Cycles | CPU Cycles | Time (s) | Input Shape           | Output Shape | Options                                            |
    +-------+-----------------+-------+--------+------------+------------+----------+-----------------------+--------------+----------------------------------------------------+
    | 0     | conv_2d         | 1.0M  | 500.0k | 400.5k     | 12.3k      | 5.2m     | 1x20x10x2,8x5x3x2,8   | 1x10x5x8     | Padding:same stride:2x2 activation:relu            |
    | 1     | max_pool_2d     | 1.0k  | 0      | 321.0      | 2.5k       | 30.0u    | 1x10x5x8              | 1x5x2x8      | Padding:valid stride:3x2 filter:3x2 activation:none |
    | 2     | fully_connected | 2.0k  | 640.0  | 1.0k       | 2.1k       | 60.0u    | 1x80,10x80,10         | 1x10         | Activation:none                                    |
    | 3     | softmax         | 50.0  | 0      | 0          | 8.2k       | 120.0u   | 1x10                  | 1x10         | Type=softmaxoptions                                |
    +-------+-----------------+-------+--------+------------+------------+----------+-----------------------+--------------+----------------------------------------------------+

Model Diagram
"""


def test_parses_a_device_profile_table():
  layers = accelerator.parse_device_profile(PROFILE, "m", source="test")
  assert [l.op for l in layers] == ["conv_2d", "max_pool_2d", "fully_connected", "softmax"]
  conv, pool, fc, softmax = layers
  assert (conv.macs, conv.acc_cycles, conv.cpu_cycles, conv.time_us) == (500_000, 400_500, 12_300, 5200.0)
  c, p, f = conv.geometry, pool.geometry, fc.geometry
  assert (c.in_h, c.in_w, c.in_c, c.out_h, c.out_w, c.out_c) == (20, 10, 2, 10, 5, 8)
  assert (c.kernel_h, c.kernel_w, c.stride_h, c.stride_w, c.padding) == (5, 3, 2, 2, "same")
  # MLTK prints pooling windows and strides width first.
  assert (p.kernel_h, p.kernel_w, p.stride_h, p.stride_w, p.padding) == (2, 3, 2, 3, "valid")
  assert (f.in_c, f.out_c, fc.acc_cycles) == (80, 10, 1000)
  assert (softmax.acc_cycles, softmax.cpu_cycles, softmax.time_us) == (0, 8200, 120.0)
  with pytest.raises(EnergyModelError, match="no 'Model Layers' table"):
    accelerator.parse_device_profile("nothing here", "m", source="empty.py")


def test_layers_file_round_trips_and_refuses_bad_rows(tmp_path):
  layers = accelerator.parse_device_profile(PROFILE, "m", source="test")
  path = str(tmp_path / "layers.csv")
  accelerator.write_layers(path, layers, header="test")
  assert accelerator.load_layers(path) == layers
  text = open(path).read().splitlines()
  bad = tmp_path / "bad.csv"
  bad.write_text("\n".join(text[:3] + [text[3].replace(",400500,", ",lots,")]) + "\n")
  with pytest.raises(EnergyModelError, match=r"bad.csv:4: malformed row"):
    accelerator.load_layers(str(bad))
  bad.write_text("\n".join(text[:3] + [text[3].replace(",400500,", ",-1,")]) + "\n")
  with pytest.raises(EnergyModelError, match=r"bad.csv:4: negative count"):
    accelerator.load_layers(str(bad))
  bad.write_text("\n".join(["#something else"] + text[1:]) + "\n")
  with pytest.raises(EnergyModelError, match="line 1 must be"):
    accelerator.load_layers(str(bad))


def test_which_layers_the_mvp_runs():
  g = accelerator.geometry
  assert accelerator.supported(g("conv_2d", 32, 32, 16, 16, 3, 1))
  # Output width x output channels is one array stride: 32 x 96 = 3072 > 2047 falls back to the core.
  assert not accelerator.supported(g("conv_2d", 32, 32, 16, 96, 1, 1))
  assert accelerator.supported(g("conv_2d", 16, 16, 16, 96, 1, 1))
  # Depthwise: one program per output pixel when the map is small for its channels, else per channel.
  assert accelerator.depthwise_path(g("depthwise_conv_2d", 12, 12, 64, 64, 3, 1)) == "pixel"
  assert accelerator.depthwise_path(g("depthwise_conv_2d", 48, 48, 8, 8, 3, 1)) == "channel"
  # Fully connected: a depth beyond 1024 pairs must factor into two dimensions of at most 1024.
  assert accelerator.supported(g("fully_connected", 1, 1, 4000, 4, 1, 1))
  assert not accelerator.supported(g("fully_connected", 1, 1, 2 * 1031 * 3, 4, 1, 1))
  assert not accelerator.supported(g("softmax", 1, 1, 10, 10))
  # An odd channel count streams one int8 per element, an even one two.
  assert g("conv_2d", 8, 8, 3, 8, 3, 1).packing == 1 and g("conv_2d", 8, 8, 4, 8, 3, 1).packing == 2


def test_model_fitted_on_other_networks_predicts_the_held_out_mlperf_networks():
  """Fitted on the measured layers of every MLTK model except its ResNet-8 and DS-CNN, the model predicts those
  two networks' accelerated layers within 10% of their measured time, and the shipped profile holds exactly
  the model these measurements give."""
  p = platform_lib.load_platform("efr32mg24_tflm")
  section = p.cycle_model["accelerator"]
  layers = accelerator.load_layers()
  assert len({l.model for l in layers}) >= 15 and len(layers) > 500
  held_out = section["held_out"]
  assert set(held_out) == {"image_classification", "keyword_spotting"}
  model = accelerator.fit([l for l in layers if l.model not in held_out], p.clock_mhz)
  report = accelerator.fit_report(model, layers, p.clock_mhz, held_out)
  for name, h in report["held_out_models"].items():
    assert abs(h["error_pct"]) <= 10.0, (name, h)
  for regime, q in report["per_regime"].items():
    assert q["acc_mape_pct"] <= 10.0, (regime, q)
  shipped = accelerator.from_dict(section["model"], "profile")
  for r in accelerator.REGIMES:
    assert np.allclose(shipped.acc[r], model.acc[r]) and np.allclose(shipped.cpu[r], model.cpu[r]), r
    assert shipped.overlap[r] == pytest.approx(model.overlap[r])


def test_mvp_layers_are_priced_by_the_accelerator_and_the_rest_by_the_core():
  p = platform_lib.load_platform("efr32mg24_tflm")
  model = cycles.from_profile(p.cycle_model, p.path)
  assert model.accelerator is not None and 0.8 < model.scale < 1.2  # the measured model needs no correction
  rows = lut_lib.load_lut(p.lut_path)
  by_mvp = [r for r in rows if "run by the accelerator" in r.source]
  by_core = [r for r in rows if "run by the accelerator" not in r.source]
  assert by_mvp and by_core
  assert {r.op for r in by_core} >= {"softmax", "reshape"}
  for r in rows:
    g = accelerator.geometry(r.op, r.in_h, r.in_w, r.in_c, r.out_c, r.kernel, r.stride)
    assert (r in by_mvp) == model.accelerated(g), r
    if r in by_mvp:
      assert r.latency_ms_mean == pytest.approx(model.scale * model.accelerator.cycles(g) / (p.clock_mhz * 1e3),
                                                rel=1e-5)  # the table keeps 6 significant digits


@pytest.mark.parametrize("edit,message", [
    (lambda a: a.pop("source"), "with its 'source'"),
    (lambda a: a["model"]["conv_2d"]["acc"].__setitem__("mac_passes", -1.0), "must be finite and >= 0"),
    (lambda a: a["model"]["add"].__setitem__("overlap", 1.5), "overlap in"),
    (lambda a: a["model"].pop("max_pool_2d"), "regime 'max_pool_2d' is missing"),
])
def test_a_malformed_accelerator_section_is_refused(tmp_path, edit, message):
  p = platform_lib.load_platform("efr32mg24_tflm")
  d = p.to_dict()
  edit(d["cycle_model"]["accelerator"])
  path = tmp_path / "efr32_broken.json"
  path.write_text(json.dumps(d))
  with pytest.raises(EnergyModelError, match=message):
    platform_lib.load_platform(str(path))


def test_efr32mg24_matches_mlperf_tiny_without_a_constant_fitted_to_it(tmp_path):
  """ResNet-8 and DS-CNN on the xG24-DK2601B: the layers the MVP runs priced by the model fitted to other
  networks' measured layers, the rest by the emulated Cortex-M33's counts; with no constant fitted to the two
  MLPerf Tiny measurements (scale 1) and leave-one-out, each within 10%."""
  require_device("cortex-m33")
  p = platform_lib.load_platform("efr32mg24_tflm")
  model = dataclasses.replace(cycles.from_profile(p.cycle_model, p.path), scale=1.0)
  ms = p.calibration["measurements"]
  parts = []
  for m in ms:
    path = calibration.reference_model_path(m["model"])
    emulated = calibration.whole_model_counts(path, "cortex-m33", str(tmp_path / m["benchmark"]))
    parts.append(calibration.whole_model_parts(model, tflite_graph.read_tflite(path), emulated))
  measured = [m["latency_ms"] * p.clock_mhz * 1e3 for m in ms]
  for (scaled, fixed, accelerated), cyc in zip(parts, measured):
    assert accelerated >= 10
    assert abs((scaled + fixed) / cyc - 1) <= 0.10
  for k in range(2):
    s = cycles.fit_scale_parts([parts[1 - k][0]], [parts[1 - k][1]], [measured[1 - k]])
    assert abs((s * parts[k][0] + parts[k][1]) / measured[k] - 1) <= 0.10


def test_the_search_cost_switches_to_the_core_price_where_a_layer_outgrows_the_mvp():
  """The regressor keeps accelerated and core-run regimes apart (`_on_core`): a 1x1 convolution on a 32x32 map
  fits the MVP up to 63 output channels (32 x 63 <= 2047) and falls back to CMSIS-NN above, several times
  dearer per MAC; the cost stays differentiable in the channels on both sides, also when they are traced."""
  import jax
  from edgenas.energy import regressor
  p = platform_lib.load_platform("efr32mg24_tflm")
  cost = regressor.op_cost_fn(p, "latency_ms")
  below, above = cost("conv_2d", 32, 32, 16, 62, 1, 1), cost("conv_2d", 32, 32, 16, 66, 1, 1)
  assert float(above) / 66 > 3 * float(below) / 62
  for c in (62.0, 66.0):
    value, grad = jax.value_and_grad(lambda out_c: cost("conv_2d", 32, 32, 16, out_c, 1, 1))(c)
    assert np.isfinite(grad) and grad > 0
    assert float(value) == pytest.approx(float(cost("conv_2d", 32, 32, 16, int(c), 1, 1)), rel=1e-5)
  # A board without an accelerator has no core-run regimes, and its costs do not jump.
  m4 = regressor.op_cost_fn("stm32l4r5_tflm", "latency_ms")
  assert float(m4("conv_2d", 32, 32, 16, 66, 1, 1)) / 66 < 1.2 * float(m4("conv_2d", 32, 32, 16, 62, 1, 1)) / 62
  fq = p.fit_quality["latency_ms"]
  assert fq["r2"] > 0.9 and "conv_2d_1x1_on_core" in fq["per_op"]


def test_import_script_transcribes_a_clone_with_file_and_commit(tmp_path):
  """scripts/import_mvp_layers.py on a real git repository laid out like MLTK's: every layer of every model file
  with a device profile, each row naming the file and the commit that last changed it."""
  import os
  import subprocess
  import sys
  repo = tmp_path / "mltk"
  (repo / "mltk" / "models" / "zoo").mkdir(parents=True)
  (repo / "mltk" / "models" / "zoo" / "tiny.py").write_text(
      '"""\n   mltk profile tiny --device --accelerator MVP\n' + PROFILE + '"""\n')
  (repo / "mltk" / "models" / "zoo" / "other.py").write_text('"""no profile here"""\n')
  git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
  subprocess.run(git[:3] + ["init", "-q"], check=True)
  subprocess.run(git + ["add", "-A"], check=True)
  subprocess.run(git + ["commit", "-qm", "models"], check=True)
  commit = subprocess.run(git[:3] + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
  out = tmp_path / "layers.csv"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run([sys.executable, os.path.join(root, "scripts", "import_mvp_layers.py"),
                         f"--mltk_git={repo}", f"--out={out}"], capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  layers = accelerator.load_layers(str(out))
  assert [l.op for l in layers] == ["conv_2d", "max_pool_2d", "fully_connected", "softmax"]
  assert {l.source for l in layers} == {f"SiliconLabs/mltk@{commit}:mltk/models/zoo/tiny.py"}
  bad = subprocess.run([sys.executable, os.path.join(root, "scripts", "import_mvp_layers.py"),
                        f"--mltk_git={tmp_path / 'nothing'}", f"--out={tmp_path / 'x.csv'}"],
                       capture_output=True, text=True)
  assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "not a readable git clone" in bad.stderr
  assert not (tmp_path / "x.csv").exists()
