"""Reading int8 .tflite files into operators, and the calibrated estimates of the MLPerf Tiny reference models."""
import csv
import os

import pytest

from edgenas import ops as ops_lib
from edgenas.energy import estimate
from edgenas.energy import memory
from edgenas.energy import platform as platform_lib
from edgenas.energy import tflite_graph
from edgenas.energy.errors import EnergyModelError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared", "data", "mlperf_tiny")


def reference_model(name):
  """The repo's copy (testdata/) first, so the tests do not depend on shared/."""
  for d in (os.path.join(REPO, "testdata"), os.path.join(SHARED, "models")):
    if os.path.exists(os.path.join(d, name)):
      return os.path.join(d, name)
  pytest.skip(f"{name} not found")


def test_resnet8_parses_into_the_expected_operators():
  g = tflite_graph.read_tflite(reference_model("ic_resnet8_int8.tflite"))
  kinds = [o.spec.op for o in g.ops]
  assert kinds.count(ops_lib.CONV_2D) == 9 and kinds.count(ops_lib.ADD) == 3
  assert kinds[-4:] == [ops_lib.AVERAGE_POOL_2D, ops_lib.RESHAPE, ops_lib.FULLY_CONNECTED, ops_lib.SOFTMAX]
  first = g.ops[0]
  assert (first.spec.in_h, first.spec.in_w, first.spec.in_c, first.spec.out_c, first.kernel_h) == (32, 32, 3, 16, 3)
  # Square kernels: exact MACs agree with the shared vocabulary's count.
  assert sum(o.macs for o in g.ops) == ops_lib.total_macs(g.op_specs()) == 12_534_474
  assert g.file_bytes == os.path.getsize(reference_model("ic_resnet8_int8.tflite"))


def test_dscnn_non_square_kernel_and_pool_are_counted_exactly():
  g = tflite_graph.read_tflite(reference_model("kws_dscnn_int8.tflite"))
  stem = g.ops[0]
  assert (stem.kernel_h, stem.kernel_w, stem.stride_h, stem.spec.out_h, stem.spec.out_w) == (10, 4, 2, 25, 5)
  assert stem.macs == 25 * 5 * 64 * 10 * 4
  assert (stem.spec.kernel, stem.spec.stride) == ((10, 4), 2)  # the OpSpec carries the real non-square kernel
  assert stem.spec.features()[0] == stem.macs  # and prices the same MACs as the file
  assert stem.weight_bytes == 64 * 10 * 4 + 4 * 64
  assert stem.executed_macs < stem.macs  # SAME padding: border taps are skipped
  pool = g.ops[9]
  assert pool.spec.op == ops_lib.AVERAGE_POOL_2D and (pool.kernel_h, pool.kernel_w) == (25, 5)
  assert pool.macs == 25 * 5 * 64
  assert [o.spec.op for o in g.ops].count(ops_lib.DEPTHWISE_CONV_2D) == 4


def test_tflite_memory_is_the_largest_live_set_and_the_file_size():
  g = tflite_graph.read_tflite(reference_model("ic_resnet8_int8.tflite"))
  m = memory.tflite_memory(g)
  # Largest live set: inside the first residual block, the block input (kept for the add), the conv's input
  # copy is the same tensor, and the two 32x32x16 conv outputs: 3 x 16 KB.
  assert m["peak_sram_bytes"] == 3 * 32 * 32 * 16
  assert m["flash_bytes"] == g.file_bytes and m["weight_bytes"] + m["graph_overhead_bytes"] == g.file_bytes


def test_an_operator_outside_the_vocabulary_is_named_in_the_error(tmp_path):
  from ai_edge_litert import schema_py_generated as schema
  from ai_edge_litert.tools import flatbuffer_utils
  model = flatbuffer_utils.read_model(reference_model("kws_dscnn_int8.tflite"))
  softmax = [c for c in model.operatorCodes
             if max(c.builtinCode, c.deprecatedBuiltinCode) == schema.BuiltinOperator.SOFTMAX][0]
  softmax.builtinCode = softmax.deprecatedBuiltinCode = schema.BuiltinOperator.LOGISTIC
  path = str(tmp_path / "logistic.tflite")
  flatbuffer_utils.write_model(model, path)
  with pytest.raises(EnergyModelError, match=r"operator 12 \(LOGISTIC\): operator LOGISTIC cannot be costed"):
    tflite_graph.read_tflite(path)


def test_a_file_that_is_not_a_tflite_model_is_rejected(tmp_path):
  path = tmp_path / "notes.tflite"
  path.write_bytes(b"this is not a flatbuffer at all")
  with pytest.raises(EnergyModelError, match="not a TFLite flatbuffer"):
    tflite_graph.read_tflite(str(path))
  with pytest.raises(EnergyModelError, match="no such .tflite"):
    tflite_graph.read_tflite(str(tmp_path / "missing.tflite"))


@pytest.mark.parametrize("task", ["ic", "kws"])
def test_cortex_m4_tflm_estimates_are_within_10_percent_of_mlperf_tiny(task):
  """Through the per-operator regressor (what the search and launch.estimate use), not the whole-model counts."""
  platform = platform_lib.load_platform("stm32l4r5_tflm")
  measured = {m["benchmark"]: m for m in platform.calibration["measurements"]}[task]
  report = estimate.estimate_tflite(reference_model(measured["model"]), platform)
  assert report["latency_ms"] == pytest.approx(measured["latency_ms"], rel=0.10)
  assert report["energy_uj"] == pytest.approx(measured["energy_uj"], rel=0.10)
  assert report["target"] == "cortex-m4" and report["instructions"] > 0
  assert all(o["instructions"] > 0 and o["cycles"] > 0 for o in report["operators"])
  assert report["out_of_range"] == []


def test_calibration_measurements_are_the_rows_of_the_mlperf_tiny_csv():
  path = os.path.join(SHARED, "results_ic_kws.csv")
  if not os.path.exists(path):
    pytest.skip("shared MLPerf Tiny data not available")
  with open(path) as f:
    rows = list(csv.DictReader(f))
  for name in platform_lib.list_platforms():
    for m in platform_lib.load_platform(name).calibration.get("measurements", []):
      hits = [r for r in rows if r["benchmark"] == m["benchmark"] and f"{r['src_repo']} {r['src_dir']})" in m["source"]]
      assert hits, (name, m["source"])
      assert float(hits[0]["latency_ms"]) == pytest.approx(m["latency_ms"])
      if m["energy_uj"] is not None:
        assert float(hits[0]["energy_uJ_per_inf"]) == pytest.approx(m["energy_uj"])
      else:
        assert hits[0]["energy_uJ_per_inf"] == ""
