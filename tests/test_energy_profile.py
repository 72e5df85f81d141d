"""Building tables: the board's serial-log parser, the board program, and real host profiling of one operator."""
import os

import pytest

from edgenas import ops as ops_lib
from edgenas.energy import lut as lut_lib
from edgenas.energy import profiling
from edgenas.energy.errors import EnergyModelError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_LOG = os.path.join(REPO, "testdata", "sample_serial_log.txt")


def test_serial_log_becomes_a_valid_lut(tmp_path):
  with open(SAMPLE_LOG) as f:
    rows = profiling.parse_serial_log(f.read(), power_mw=41.0, source="measured: sample board", log_name=SAMPLE_LOG)
  assert [r.op for r in rows] == ["conv_2d", "conv_2d", "depthwise_conv_2d", "fully_connected", "add",
                                  "average_pool_2d"]
  first = rows[0]
  assert (first.in_h, first.in_c, first.out_c, first.kernel, first.count) == (16, 8, 16, 3, 20)
  assert first.latency_ms_mean == pytest.approx(2_950_000 / 120e6 * 1e3)  # cycles at the printed 120 MHz
  assert first.energy_uj == pytest.approx(first.latency_ms_mean * 41.0)
  assert rows[2].groups == 32
  out = str(tmp_path / "board.csv")
  lut_lib.save_lut(rows, out)
  reloaded = lut_lib.load_lut(out)
  assert [r.spec() for r in reloaded] == [r.spec() for r in rows]
  assert [r.latency_ms_mean for r in reloaded] == pytest.approx([r.latency_ms_mean for r in rows], rel=1e-5)


@pytest.mark.parametrize("log, expected", [
    ("EDGENAS_CLOCK_HZ,1e8\nEDGENAS_LUT,conv_2d,8,8,8,8,3,1\n", "line 2: expected 11 fields"),
    ("EDGENAS_CLOCK_HZ,1e8\nEDGENAS_LUT,conv_2d,8,8,8,8,3,1,1,abc,1,5\n", "line 2: non-numeric field"),
    ("EDGENAS_LUT,conv_2d,8,8,8,8,3,1,1,100,1,5\n", "line 1: no 'EDGENAS_CLOCK_HZ' line"),
    ("EDGENAS_CLOCK_HZ,1e8\nEDGENAS_LUT,gelu,8,8,8,8,3,1,1,100,1,5\n", "line 2: field 'op' is 'gelu'"),
    ("boot\nhello\n", "no 'EDGENAS_LUT' lines"),
])
def test_serial_log_errors_name_the_line(log, expected):
  with pytest.raises(EnergyModelError) as e:
    profiling.parse_serial_log(log, 10.0, "measured: x", log_name="board.log")
  assert "board.log" in str(e.value) and expected in str(e.value)


def test_board_program_embeds_every_model_and_prints_the_parsed_format():
  with open(os.path.join(REPO, "testdata", "kws_dscnn_int8.tflite"), "rb") as f:
    model = f.read()
  spec = ops_lib.OpSpec(ops_lib.DEPTHWISE_CONV_2D, 25, 5, 64, 64, 3, 1)
  sources = profiling.board_benchmark_sources([(spec, model), (spec, model)], repeats=7)
  assert "kNumModels = 2" in sources["models.h"]
  assert f"g_model_1[{len(model)}]" in sources["models.h"]
  assert '"depthwise_conv_2d", 25, 5, 64, 64, 3, 1, 64' in sources["models.h"]
  main = sources["main.cc"]
  assert "kRepeats = 7" in main and "EDGENAS_LUT,%s,%d" in main and "EDGENAS_CLOCK_HZ" in main
  assert "0xE0001004" in main  # DWT cycle counter


def test_host_profiling_times_a_real_single_operator_model():
  spec = ops_lib.OpSpec(ops_lib.CONV_2D, 8, 8, 4, 8, 3, 1)
  model = profiling.single_op_model(spec)
  from edgenas.energy import tflite_graph
  assert tflite_graph.operator_names(model) == ["conv_2d"]
  graph = tflite_graph.parse_tflite(model)
  assert graph.ops[0].macs == 8 * 8 * 8 * 9 * 4
  rows = profiling.profile_host([spec], power_mw=1000.0, source="measured: test", passes=1, log=lambda _: None)
  assert len(rows) == 1 and rows[0].op == "conv_2d" and rows[0].count >= 10
  assert rows[0].latency_ms_mean > 0 and rows[0].energy_uj == pytest.approx(rows[0].latency_ms_mean * 1000.0)
