"""On-target runs: the real cross toolchains, the real TFLM library and QEMU, byte-exact against the host TFLM.

Each target's library is built once (cached under EDGENAS_DEVICE_CACHE) and shared by every test. Outside CI a
test skips when its toolchain is missing; in CI (.ci/run installs them) it runs.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, require_device
from edgenas.device import errors, memory, plugin, runner, targets, tflm
from edgenas.energy import tflite_graph
from edgenas.export import verify

TARGETS = ("cortex-m4", "cortex-m7", "cortex-m33", "rv32imac")
MODELS = ("kws_dscnn_int8.tflite", "ic_resnet8_int8.tflite")


def model_bytes(name):
  with open(os.path.join(REPO_ROOT, "testdata", name), "rb") as f:
    return f.read()


def random_inputs(flatbuffer, n, seed=0):
  shape = tuple(int(d) for d in verify.TflmRunner(flatbuffer).input["shape"][1:])
  return np.random.default_rng(seed).integers(-128, 128, size=(n,) + shape, dtype=np.int8)


@pytest.mark.parametrize("target", TARGETS)
def test_mlperf_models_are_byte_exact_on_the_target(target, tmp_path):
  require_device(target)
  for name in MODELS:
    fb = model_bytes(name)
    result = runner.run_on_target(fb, target, random_inputs(fb, 16), str(tmp_path / name), model_name=name)
    assert result["matches_host"] and result["images_checked"] == 16 and result["images_matching"] == 16
    assert result["first_mismatch"] is None and result["exit_status"] == 0
    ops = [o["op"] for o in verify.model_ops(fb)]
    assert [o["op"] for o in result["operators"]] == ops  # every operator bracketed, in order
    per_op = sum(o["instructions"] for o in result["operators"])
    # The operators are nearly all of an inference: the rest is the interpreter's loop between them.
    assert 0.97 * result["instructions_per_inference"] < per_op < result["instructions_per_inference"]
    # Instruction counts are a property of the kernels: int8 inference barely depends on the data.
    spread = result["instructions_per_inference_max"] - result["instructions_per_inference_min"]
    assert spread < 0.01 * result["instructions_per_inference"]
    elf = result["elf"]
    assert elf["deployed_flash_bytes"] > len(fb) and elf["bss"] > result["arena_used_bytes"] > 0
    comparison = memory.compare(fb, target, result)
    if comparison["predicted_arena_bytes"] is not None:  # code_size.json covers the target
      assert comparison["arena_within_10pct"], comparison
      assert comparison["flash_within_10pct"], comparison


def test_instruction_counts_repeat_run_to_run(tmp_path):
  require_device("cortex-m4")
  fb = model_bytes("kws_dscnn_int8.tflite")
  first = runner.run_on_target(fb, "cortex-m4", random_inputs(fb, 2), str(tmp_path / "a"))
  second = runner.run_on_target(fb, "cortex-m4", random_inputs(fb, 2), str(tmp_path / "b"))
  assert first["operators"] == second["operators"]
  assert first["instructions_per_inference"] == second["instructions_per_inference"]


def test_cmsis_nn_runs_far_fewer_instructions_than_the_reference_kernels(tmp_path):
  """The point of a platform-true table: the same model costs a different amount on another ISA and kernels."""
  require_device("cortex-m4")
  require_device("rv32imac")
  fb = model_bytes("kws_dscnn_int8.tflite")
  inputs = random_inputs(fb, 1)
  m4 = runner.run_on_target(fb, "cortex-m4", inputs, str(tmp_path))
  rv = runner.run_on_target(fb, "rv32imac", inputs, str(tmp_path))
  assert rv["instructions_per_inference"] > 10 * m4["instructions_per_inference"]
  ratios = [r["instructions"] / m["instructions"] for r, m in zip(rv["operators"], m4["operators"])
            if m["op"] in ("CONV_2D", "DEPTHWISE_CONV_2D")]
  assert max(ratios) / min(ratios) > 1.2  # not one constant factor: the kernels differ per operator


def test_a_mismatch_names_the_image_and_the_first_differing_output(tmp_path):
  require_device("cortex-m4")
  fb = model_bytes("kws_dscnn_int8.tflite")
  host = verify.TflmRunner(fb)
  inputs = random_inputs(fb, 4)
  expected = host.run_int8(inputs)
  wrong = expected.copy()
  wrong[2, 5] = np.int8(wrong[2, 5] + 1 if wrong[2, 5] < 127 else wrong[2, 5] - 1)
  target = targets.get_target("cortex-m4")
  directory = str(tmp_path / "prog")
  runner.write_program(directory, fb, host, inputs, wrong, [-1] * 4, 32768, "mismatch")
  elf = runner.build_program(target, tflm.build_library(target), directory, "mismatch")
  status, text, _ = runner.run_elf(target, elf, 120)
  out = runner.parse_program_output(text)
  assert status == 2 and out.images_matching == 3  # the program's own check, and its exit status
  matching, first = runner.compare_outputs(out.outputs, wrong)
  assert matching == 3 and first == dict(image=2, index=5, device=int(expected[2, 5]), host=int(wrong[2, 5]))


def test_a_hanging_program_times_out_with_a_clear_error(tmp_path):
  require_device("rv32imac")
  target = targets.get_target("rv32imac")
  directory = tmp_path / "hang"
  directory.mkdir()
  (directory / "main.cc").write_text('extern "C" __attribute__((noinline, used)) void edgenas_marker(void) {\n'
                                     '  __asm__ volatile("" ::: "memory");\n}\n'
                                     'int main() { for (;;) { edgenas_marker(); } }\n')
  elf = runner.build_program(target, tflm.build_library(target), str(directory), "hang",
                             sources=[str(directory / "main.cc")])
  with pytest.raises(errors.EmulatorTimeoutError, match="did not finish within 3 s"):
    runner.run_elf(target, elf, timeout_s=3)


def test_a_compile_error_names_the_kept_log(tmp_path):
  require_device("cortex-m4")
  target = targets.get_target("cortex-m4")
  (tmp_path / "main.cc").write_text("int main() { return undefined_name; }\n")
  with pytest.raises(errors.BuildError, match="compiling main.cc failed; log kept at") as e:
    runner.build_program(target, tflm.build_library(target), str(tmp_path), "broken",
                         sources=[str(tmp_path / "main.cc")])
  log_path = str(e.value).rsplit(" ", 1)[1]
  assert "undefined_name" in open(log_path).read()


def test_missing_toolchain_and_tflm_sources_name_the_fix(monkeypatch, tmp_path):
  monkeypatch.setenv("PATH", str(tmp_path))  # no compiler, no QEMU on it
  with pytest.raises(errors.ToolchainMissingError, match="apt-get install gcc-arm-none-eabi"):
    targets.check_toolchain(targets.get_target("cortex-m7"))
  with pytest.raises(errors.ToolchainMissingError, match="apt-get install gcc-riscv64-unknown-elf"):
    targets.check_toolchain(targets.get_target("rv32imac"))
  monkeypatch.setenv("TFLM_DIR", str(tmp_path / "nowhere"))
  with pytest.raises(errors.ToolchainMissingError, match="TFLM_DIR=.*nowhere is not a tflite-micro checkout"):
    tflm.resolve_tflm_dir()
  with pytest.raises(errors.DeviceError, match="unknown target 'cortex-m99'"):
    targets.parse_targets("cortex-m4,cortex-m99")


def test_launcher_reports_one_line_for_a_missing_qemu(tmp_path):
  (tmp_path / "empty").mkdir()
  env = dict(os.environ, PATH=str(tmp_path / "empty"))  # no cross compiler, no QEMU
  proc = subprocess.run([sys.executable, "-m", "launch.run_on_target", f"--model={REPO_ROOT}/testdata/"
                         "kws_dscnn_int8.tflite", "--targets=cortex-m4", f"--out_dir={tmp_path}"], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert "error: target cortex-m4:" in proc.stderr and "apt-get install" in proc.stderr
  assert "Traceback" not in proc.stderr


CORTEX_M_CLASSES = {"smlad": "mul", "sdiv": "div", "bne": "cond_branch", "cbz": "cond_branch", "bl": "branch",
                    "push": "mem_multi", "ldrd": "mem_pair", "sxtb16": "alu", "it": "other"}


@pytest.mark.parametrize("target,expected", [
    ("cortex-m4", CORTEX_M_CLASSES),
    ("cortex-m33", CORTEX_M_CLASSES),  # the same Thumb-2 DSP code path of CMSIS-NN on ARMv8-M Mainline
    ("rv32imac", {"lw": "load", "sw": "store", "mul": "mul", "divu": "div", "beqz": "cond_branch", "jalr": "branch",
                  "addi": "alu"})])
def test_plugin_counts_instructions_by_class(target, expected, tmp_path):
  """The class counts a core timing prices: every executed instruction in exactly one class (the classes sum to
  the instruction count, per operator too), each mnemonic in its class, taken branches no more than executed."""
  require_device(target)
  fb = model_bytes("kws_dscnn_int8.tflite")
  result = runner.run_on_target(fb, target, random_inputs(fb, 1), str(tmp_path), mem=True)
  total = result["instruction_classes_per_inference"]
  assert sum(total[c] for c in plugin.INSTRUCTION_CLASSES) == result["instructions_per_inference"]
  assert 0 < total["cond_taken"] <= total["cond_branch"]
  for o in result["operators"]:
    assert sum(o["classes"][c] for c in plugin.INSTRUCTION_CLASSES) == o["instructions"]
  conv = [o["classes"] for o in result["operators"] if o["op"] == "CONV_2D"]
  share = sum(c["mul"] for c in conv) / sum(sum(c[k] for k in plugin.INSTRUCTION_CLASSES) for c in conv)
  assert share > 0.05  # convolutions multiply
  t = targets.get_target(target)
  elf = os.path.join(str(tmp_path), target, "edgenas_model.elf")
  dump, log = str(tmp_path / "dump.txt"), str(tmp_path / "log.txt")
  marker = plugin.symbol_address(elf, runner.MARKER_SYMBOL, nm=t.nm)
  subprocess.run([t.qemu, *t.qemu_args, "-kernel", elf,
                  *plugin.plugin_args(plugin.build_plugin(), marker, log, classes=True, dump=dump)],
                 check=True, capture_output=True, timeout=300)
  seen = {}
  with open(dump) as f:
    for line in f:
      fields = line.split()
      text = fields[2:] if target.startswith("cortex") else fields[3:]  # RV32 lines carry the encoding first
      if text:
        seen.setdefault(text[0].split(".")[0] if target.startswith("cortex") else text[0], set()).add(fields[1])
  for mnemonic, cls in expected.items():
    assert seen.get(mnemonic) == {cls}, (mnemonic, seen.get(mnemonic))
  if target.startswith("cortex"):
    assert "mem_pipelined" in seen["ldr"]  | seen.get("str", set())  # LDR pipelined after an LDR (M3/M4 TRM)
  assert plugin.parse_log(log).total_classes is not None


def test_plugin_log_errors_name_the_file_and_line(tmp_path):
  bad = tmp_path / "log"
  bad.write_text("M 10\nM x\nT 20\n")
  with pytest.raises(errors.DeviceError, match="line 2"):
    plugin.parse_log(str(bad))


def test_greedy_plan_matches_tflm_on_the_host():
  """The head of TFLM's arena is its greedy plan of activations: replayed here, it must equal what the host TFLM
  interpreter (reference kernels, no scratch for these ops) records."""
  for name in MODELS:
    fb = model_bytes(name)
    head = verify.measure_arena(fb)["head_bytes"]
    assert memory.plan_head(tflite_graph.parse_tflite(fb), "TFLM reference") == head


def test_greedy_plan_reuses_memory_of_buffers_that_are_not_alive_together():
  # Two 100-byte buffers alive at different times share an offset; a third overlapping both goes after them.
  assert memory.greedy_plan([(96, 0, 1), (96, 2, 3)]) == 96
  assert memory.greedy_plan([(96, 0, 1), (96, 2, 3), (48, 1, 2)]) == 144
  assert memory.greedy_plan([]) == 0
