"""Export to TFLite Micro, end to end at small scale: a briefly trained 8x8 digits network converted to int8,
run in the real TFLite Micro interpreter over the test split, budgets, C sources and (where the cross compilers
are installed) the model array compiled for Cortex-M7 and RV32."""
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgenas import architecture as arch_lib
from edgenas import data as data_lib
from edgenas import quant as quant_lib
from edgenas import train as train_lib
from edgenas.energy import platform as platform_lib
from edgenas.export import convert, errors, exporter, resolver, verify
from edgenas.nn import model as model_lib
from conftest import adam_trained, require_device

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLATFORM = "stm32l4r5_tflm"
TRAIN_STEPS = 400
# Every operator the exporter and the lookup-table programs write (and a few the converter may add).
EXPORTER_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "AVERAGE_POOL_2D", "MAX_POOL_2D",
                "RESHAPE", "SOFTMAX", "MEAN", "PAD", "QUANTIZE", "DEQUANTIZE", "MUL", "SUM")


def tiny_arch():
  """Stem, an expanding residual block and a strided block without expansion: every operator kind we export."""
  return arch_lib.Architecture(
      (8, 8, 1), 10, arch_lib.Stem(16, 3, 1),
      (arch_lib.Layer("mbconv", 16, 16, 1, 3, 3, 48), arch_lib.Layer("mbconv", 16, 24, 2, 3, 1, 16)), 0, "tiny")


@pytest.fixture(scope="module")
def dataset():
  return data_lib.load_dataset("digits", val_fraction=0.1, seed=0)


@pytest.fixture(scope="module")
def trained(dataset):
  """(arch, variables) after a short Adam run on digits (about 97% test accuracy)."""
  arch = tiny_arch()
  return arch, adam_trained(arch, dataset.train, TRAIN_STEPS)


@pytest.fixture(scope="module")
def exported(trained, dataset, tmp_path_factory):
  arch, variables = trained
  out = str(tmp_path_factory.mktemp("export") / "export")
  report = exporter.export_model(arch, variables, dataset, out, [PLATFORM, "andes_d45_tflm"])
  return out, report


def read_model(out):
  with open(os.path.join(out, "model.tflite"), "rb") as f:
    return f.read()


def test_int8_accuracy_within_one_point_and_argmax_agreement(exported, dataset):
  _, report = exported
  acc = report["accuracy"]
  assert acc["test_images"] == len(dataset.test)
  assert acc["float"] > 0.85, "the fixture network did not train"
  assert abs(acc["int8_tflm"] - acc["float"]) <= 0.01
  assert acc["argmax_agreement_int8_float"] >= 0.99
  assert acc["agreement_reference"] == "float" and acc["passed"] and report["checks"]["passed"]


def test_report_accuracy_is_what_tflm_computes(exported, dataset):
  out, report = exported
  runner = verify.TflmRunner(read_model(out), report["arena"]["measured_tflm_bytes"])
  q, _ = runner.logits(dataset.test.images)
  assert q.dtype == np.int8 and q.shape == (len(dataset.test), 10)
  assert np.mean(np.argmax(q, -1) == dataset.test.labels) == pytest.approx(report["accuracy"]["int8_tflm"])
  # Input quantization covers the data range [0, 1] exactly.
  scale, zero_point = runner.input_qparams
  assert zero_point == -128 and scale == pytest.approx(1 / 255, rel=1e-3)


def test_every_operator_is_int8_and_has_a_tflm_kernel(exported):
  out, report = exported
  ops = verify.model_ops(read_model(out))
  verify.check_tflm_ops(ops)
  for o in ops:
    assert set(o["inputs"] + o["outputs"]) == {"INT8"}, o
    assert set(o["constant_inputs"]) <= {"INT8", "INT32"}, o
  names = [o["op"] for o in ops]
  # 1x1 convs are CONV_2D (not FULLY_CONNECTED over 4-D tensors), the depthwise one DEPTHWISE_CONV_2D; the stem
  # (one input channel) the converter writes as a depthwise conv with a channel multiplier.
  assert names.count("CONV_2D") == 3 and names.count("FULLY_CONNECTED") == 1 and names[-1] == "FULLY_CONNECTED"
  assert names.count("DEPTHWISE_CONV_2D") == 3 and names.count("ADD") == 1 and "AVERAGE_POOL_2D" in names
  assert not {"QUANTIZE", "DEQUANTIZE", "SUM", "MEAN", "MUL"} & set(names)
  assert [(o["op"], o["version"]) for o in report["ops"]] == [(o["op"], o["version"]) for o in ops]


def test_tensor_names_are_stripped(exported):
  out, _ = exported
  from ai_edge_litert import schema_py_generated as schema
  model = schema.ModelT.InitFromPackedBuf(read_model(out), 0)
  assert all(not t.name for t in model.subgraphs[0].tensors)


def test_arena_is_measured_and_compared_with_the_prediction(exported, trained):
  out, report = exported
  arch, _ = trained
  arena = report["arena"]
  assert arena["predicted_peak_sram_bytes"] == arch.peak_activation_bytes()
  assert arena["measured_minus_predicted_bytes"] == arena["measured_tflm_bytes"] - arch.peak_activation_bytes()
  # The arena holds the live activations plus TFLM's own structures.
  assert arena["measured_tflm_bytes"] >= arch.peak_activation_bytes()
  assert arena["device_arena_bytes"] > arena["measured_tflm_bytes"]
  flatbuffer = read_model(out)
  verify.TflmRunner(flatbuffer, arena["measured_tflm_bytes"])  # the measured figure is enough
  with pytest.raises(errors.UnsupportedOpError, match="arena"):
    verify.TflmRunner(flatbuffer, arena["measured_tflm_bytes"] - 256)  # and it is close to the minimum


def test_platform_predictions_and_flash(exported):
  out, report = exported
  assert report["flash_bytes"] == report["tflite_bytes"] == os.path.getsize(os.path.join(out, "model.tflite"))
  assert set(report["platforms"]) == {PLATFORM, "andes_d45_tflm"}
  for name, p in report["platforms"].items():
    assert p["latency_ms"] > 0 and p["energy_uj"] > 0, name
    assert p["flash_bytes"] == report["tflite_bytes"] and p["fits_sram"] and p["fits_flash"]
    assert p["sram_budget_bytes"] == platform_lib.load_platform(name).sram_bytes


def test_c_sources_register_exactly_the_model_ops(exported):
  out, report = exported
  files = set(os.listdir(out))
  assert {"model.tflite", "model_data.cc", "model_data.h", "model_ops.h", "main.cc", "Makefile.cortex_m",
          "Makefile.riscv32", "report.json"} <= files
  assert not [f for f in os.listdir(os.path.dirname(out)) if f.startswith(".export.")], "staging left behind"
  ops_h = open(os.path.join(out, "model_ops.h")).read()
  registered = [line.split("resolver.")[1].split("(")[0] for line in ops_h.splitlines() if "resolver.Add" in line]
  assert registered == [s["tflm_resolver"] for s in report["op_summary"]]
  for s in report["op_summary"]:  # each registration notes the versions the model uses
    assert re.search(rf"resolver\.{s['tflm_resolver']}\(\).*// .*{s['op']} v{s['version']} x{s['count']}", ops_h)
  assert "MicroMutableOpResolver<kEdgenasNumOps>" in ops_h and f"kEdgenasNumOps = {len(registered)}" in ops_h
  header = open(os.path.join(out, "model_data.h")).read()
  assert f"kEdgenasArenaBytes = {report['arena']['device_arena_bytes']};" in header
  assert f"kEdgenasInputZeroPoint = {report['quantization']['input']['zero_point']};" in header
  source = open(os.path.join(out, "model_data.cc")).read()
  assert "alignas(16) const unsigned char g_edgenas_model_data[]" in source
  assert f"g_edgenas_model_data_len = {report['tflite_bytes']};" in source
  body = source.split("g_edgenas_model_data[] = {")[1].split("};")[0]
  assert bytes(int(b, 16) for b in body.replace("\n", "").split(",") if b.strip()) == read_model(out)
  for makefile in ("Makefile.cortex_m", "Makefile.riscv32"):
    text = open(os.path.join(out, makefile)).read()
    assert "TFLM_DIR is not set" in text and "create_tflm_tree.py" in text
  assert "OPTIMIZED_KERNEL_DIR=cmsis_nn" in open(os.path.join(out, "Makefile.cortex_m")).read()


@pytest.mark.parametrize("target", ["cortex-m7", "rv32imac"])
def test_model_data_compiles_for_the_mcu(exported, tmp_path, target):
  out, report = exported
  require_device(target)
  if target == "cortex-m7":
    prefix, flags = "arm-none-eabi-", ["-mcpu=cortex-m7", "-mthumb"]
  else:
    prefix, flags = "riscv64-unknown-elf-", ["-march=rv32imac", "-mabi=ilp32", "-ffreestanding"]
  obj = str(tmp_path / "model_data.o")
  subprocess.run([prefix + "g++", *flags, "-Os", "-std=c++17", "-c", os.path.join(out, "model_data.cc"),
                  "-I", out, "-o", obj], check=True, capture_output=True, text=True)
  symbols = {}
  listing = subprocess.run([prefix + "nm", "-S", obj], check=True, capture_output=True, text=True).stdout
  for line in listing.splitlines():
    parts = line.split()
    if len(parts) == 4:
      symbols[parts[3]] = (int(parts[0], 16), int(parts[1], 16))
  address, size = symbols["g_edgenas_model_data"]
  assert size == report["tflite_bytes"] and address % 16 == 0
  assert symbols["g_edgenas_model_data_len"][1] == 4  # a 32-bit length on both targets
  samples = min(exporter.DEFAULT_TARGET_IMAGES, report["accuracy"]["test_images"])
  assert symbols["g_edgenas_sample_inputs"][1] == 64 * samples  # 8x8x1 int8 test images
  sections = subprocess.run([prefix + "objdump", "-h", obj], check=True, capture_output=True, text=True).stdout
  rodata = [l for l in sections.splitlines() if ".rodata" in l]
  assert rodata and all(l.split()[-1] in ("2**4", "2**5", "2**6") for l in rodata)


def test_export_ops_compute_the_same_network_as_one_conv_per_operator(trained, dataset):
  arch, variables = trained
  folded = model_lib.fold_batchnorm(arch, variables)
  x = jnp.asarray(dataset.test.images[:16])
  reference = model_lib.forward_folded(arch, folded, x)
  lowered = jax.jit(convert.inference_fn(arch, folded))(x)
  np.testing.assert_allclose(np.asarray(lowered), np.asarray(reference), rtol=1e-4, atol=1e-4)
  # What the converter sees: one conv per conv-type operator, the classifier the only matmul.
  traced = str(jax.make_jaxpr(convert.inference_fn(arch, folded))(x))
  assert traced.count("conv_general_dilated[") == len(model_lib.op_names(arch)) and traced.count("dot_general[") == 1
  assert model_lib.TRAIN_OPS.pointwise is model_lib.pointwise  # the default path is left as it was


def test_over_budget_fails_naming_the_budget_and_keeps_earlier_files(trained, dataset, tmp_path):
  arch, variables = trained
  profile = json.load(open(platform_lib.platform_path(PLATFORM)))
  profile.update(name="tiny_sram", sram_bytes=4096, lut=platform_lib.load_platform(PLATFORM).lut_path)
  tiny = tmp_path / "tiny_sram.json"
  tiny.write_text(json.dumps(profile))
  out = tmp_path / "export"
  out.mkdir()
  (out / "model.tflite").write_bytes(b"an earlier export")
  with pytest.raises(errors.BudgetError, match=r"tiny_sram: .* bytes of SRAM .* budget is 4096 bytes \('sram_bytes'"):
    exporter.export_model(arch, variables, dataset, str(out), [str(tiny)], eval_limit=20)
  assert sorted(os.listdir(out)) == ["model.tflite"] and (out / "model.tflite").read_bytes() == b"an earlier export"
  assert sorted(os.listdir(tmp_path)) == ["export", "tiny_sram.json"]


def test_retrain_workdir_with_qat_ranges_matches_fake_quant(trained, dataset, tmp_path):
  """A retrain workdir (written with edgenas.train's own save_final) whose ranges are QAT's: the exporter puts
  every tensor on QAT's int8 grid and the int8 accuracy matches the fake-quant accuracy within 0.5 points."""
  arch, variables = trained
  ranges = quant_lib.calibrate_ranges(arch, variables, dataset.train.images[:512])
  # Ranges a little narrower than the data's, as QAT's EMA of batch min/max gives: tensors saturate.
  ranges = {k: np.asarray(v) * np.float32(0.9) for k, v in ranges.items()}
  workdir = tmp_path / "retrain"
  workdir.mkdir()
  arch.save(str(workdir / "arch.json"))
  train_lib.save_final(str(workdir), arch, variables, ranges)
  config = {"config": {"dataset": "digits", "data_dir": "", "image_size": 0, "val_fraction": 0.1, "seed": 0,
                       "cost": {"platform": PLATFORM}, "retrain": {"platforms": []}}}
  (workdir / "config.json").write_text(json.dumps(config))
  (workdir / "report.json").write_text(json.dumps({"ranges_source": "qat_ema_minmax", "test_acc_float": None,
                                                   "test_acc_fake_quant": None}))
  report = exporter.export_workdir(str(workdir))
  acc = report["accuracy"]
  assert report["quantization"]["ranges"] == "qat" and acc["agreement_reference"] == "fake_quant"
  fq_pred = exporter.fake_quant_predictions(arch, variables, ranges, dataset.test.images)
  assert acc["fake_quant"] == pytest.approx(np.mean(fq_pred == dataset.test.labels))
  assert abs(acc["int8_tflm"] - acc["fake_quant"]) <= 0.005 and abs(acc["int8_tflm"] - acc["float"]) <= 0.01
  assert acc["argmax_agreement_int8_fake_quant"] >= 0.99 and report["checks"]["passed"]
  assert os.path.exists(workdir / "export" / "model.tflite") and list(report["platforms"]) == [PLATFORM]
  # Setting the ranges adds no operators: the same graph as without them.
  assert [o["op"] for o in report["ops"]] == [
      "DEPTHWISE_CONV_2D", "CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D", "ADD", "DEPTHWISE_CONV_2D", "CONV_2D",
      "AVERAGE_POOL_2D", "FULLY_CONNECTED"]
  # Every materialised tensor is on QAT's grid: the logits' scale and zero point are exactly QAT's.
  scale, zero_point, _, _ = quant_lib.activation_qparams(jnp.float32(ranges["classifier"][0]),
                                                         jnp.float32(ranges["classifier"][1]))
  assert report["quantization"]["output"]["scale"] == pytest.approx(float(scale), rel=1e-6)
  assert report["quantization"]["output"]["zero_point"] == int(zero_point)
  # A second call finds the finished export and returns it without converting again.
  assert exporter.export_workdir(str(workdir))["seconds"] == report["seconds"]


def test_operator_without_tflm_kernel_or_float_tensor_is_named(exported):
  out, _ = exported
  ops = verify.model_ops(read_model(out))
  unknown = [dict(o) for o in ops]
  unknown[2]["op"] = "RFFT2D"
  with pytest.raises(errors.UnsupportedOpError, match=r"operator 2 \(RFFT2D v\d+\): TensorFlow Lite Micro has no"):
    verify.check_tflm_ops(unknown)
  # An operator the table of the TFLM in use lacks: one line naming the operator, its version and the table.
  only_conv = resolver.ResolverTable({"CONV_2D": "AddConv2D"}, "a test table")
  with pytest.raises(errors.UnsupportedOpError) as e:
    verify.check_tflm_ops(ops, only_conv)
  assert re.fullmatch(rf"operator 0 \(DEPTHWISE_CONV_2D v{ops[0]['version']}\): TensorFlow Lite Micro has no kernel "
                      r"for DEPTHWISE_CONV_2D \(no MicroMutableOpResolver method in a test table registers it\); .*",
                      str(e.value))
  floats = [dict(o) for o in ops]
  floats[0]["outputs"] = ["FLOAT32"]
  with pytest.raises(errors.UnsupportedOpError, match="FLOAT32 tensors"):
    verify.check_tflm_ops(floats)


def pinned_tflm_dir(monkeypatch):
  """The pinned TFLM tree (TFLM_DIR unset); skips outside CI where it is missing."""
  from edgenas.device import errors as device_errors
  from edgenas.device import tflm
  monkeypatch.delenv("TFLM_DIR", raising=False)
  try:
    return tflm.resolve_tflm_dir(log=lambda line: None)
  except device_errors.ToolchainMissingError as e:
    if os.environ.get("CI"):
      raise
    pytest.skip(str(e))


def test_resolver_methods_are_tflms_own_for_every_exported_op(monkeypatch):
  tree = pinned_tflm_dir(monkeypatch)
  with open(os.path.join(tree, resolver.HEADER)) as f:
    header = f.read()
  recorded = resolver.table()  # no TFLM_DIR: the table recorded from the pinned tree, used without TFLM sources
  assert dict(recorded.methods) == resolver.from_tflm(tree).methods, \
      "tflm_resolver_methods.json is stale: python -m edgenas.export.resolver"
  for op in EXPORTER_OPS:
    method = recorded.methods[op]
    body = header.split(f"TfLiteStatus {method}(", 1)[1].split("TfLiteStatus ", 1)[0]
    assert re.search(rf"AddBuiltin\(\s*BuiltinOperator_{op},", body), (op, method)  # registers this very operator
  # TFLM's generator spells some names by a rule; the header's are what compiles.
  assert recorded.methods["CUMSUM"] == "AddCumSum" and recorded.methods["PADV2"] == "AddPadV2"


def test_tflm_dir_supplies_the_resolver_table(tmp_path, monkeypatch):
  tree = tmp_path / "tflm"
  (tree / resolver.HEADER).parent.mkdir(parents=True)
  (tree / resolver.HEADER).write_text(
      "class MicroMutableOpResolver {\n public:\n  TfLiteStatus AddConv2D(\n"
      "      const TFLMRegistration& registration = Register_CONV_2D()) {\n"
      "    return AddBuiltin(BuiltinOperator_CONV_2D, registration, ParseConv2D);\n  }\n"
      "  // TfLiteStatus AddMean() is not here\n};\n")
  monkeypatch.setenv("TFLM_DIR", str(tree))
  table = resolver.table()
  assert table.methods == {"CONV_2D": "AddConv2D"} and table.source == str(tree / resolver.HEADER)
  monkeypatch.setenv("TFLM_DIR", str(tmp_path / "nowhere"))
  with pytest.raises(errors.ExportError, match=r"TFLM_DIR=.*nowhere has no tensorflow/lite/micro/micro_mutable_op"):
    resolver.table()


def test_device_program_resolver_comes_from_the_tflm_tree_it_builds_with(exported, tmp_path, monkeypatch):
  """The device program checks the model against the header of the tree it compiles, not the recorded table."""
  from edgenas.device import runner, tflm
  pinned_tflm_dir(monkeypatch)
  out, report = exported
  flatbuffer = read_model(out)
  host = verify.TflmRunner(flatbuffer)
  inputs = np.zeros((1,) + tuple(int(d) for d in host.input["shape"][1:]), np.int8)
  args = (flatbuffer, host, inputs, host.run_int8(inputs), [-1], 65536, "tiny")
  runner.write_program(str(tmp_path / "pinned"), *args)
  ops_h = (tmp_path / "pinned" / "model_ops.h").read_text()
  assert [l.split("resolver.")[1].split("(")[0] for l in ops_h.splitlines() if "resolver.Add" in l] == \
      [s["tflm_resolver"] for s in report["op_summary"]]
  tree = tmp_path / "tflm"  # a tree whose resolver has only CONV_2D
  for path in (tflm.TREE_GENERATOR, resolver.HEADER):
    (tree / path).parent.mkdir(parents=True, exist_ok=True)
  (tree / tflm.TREE_GENERATOR).write_text("")
  (tree / resolver.HEADER).write_text("TfLiteStatus AddConv2D() { return AddBuiltin(BuiltinOperator_CONV_2D, r); }\n")
  monkeypatch.setenv("TFLM_DIR", str(tree))
  with pytest.raises(errors.UnsupportedOpError, match=rf"DEPTHWISE_CONV_2D v\d+\): .* in {re.escape(str(tree))}"):
    runner.write_program(str(tmp_path / "other"), *args)


def test_missing_export_extra_names_the_install_command():
  with pytest.raises(errors.MissingExportDependencyError, match=r'pip install -e "\.\[export\]"'):
    errors.require("tensorflow_that_is_not_installed", "the TFLite converter")


def test_importing_edgenas_and_the_exporter_does_not_import_tensorflow():
  code = ("import sys, edgenas, edgenas.export, edgenas.export.exporter; "
          "bad = [m for m in ('tensorflow', 'ai_edge_litert', 'tflite_micro') if m in sys.modules]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_arena_grows_past_the_recorded_figure_when_prepare_needs_temporary_memory():
  """A 2-kB depthwise model whose DEPTHWISE_CONV_2D Prepare asks for 64 temporary bytes that the arena TFLM's
  recording allocator reports does not hold; the measured arena must be one the model really runs in."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "testdata",
                      "tiny_dw_prepare_temp.tflite")
  with open(path, "rb") as f:
    flatbuffer = f.read()
  arena = verify.measure_arena(flatbuffer)
  assert arena["arena_bytes"] > arena["reported_bytes"]
  assert arena["arena_bytes"] % verify.ARENA_ALIGNMENT == 0
  with pytest.raises(errors.UnsupportedOpError, match="arena"):
    verify.TflmRunner(flatbuffer, arena["reported_bytes"])
  with pytest.raises(errors.UnsupportedOpError, match="arena"):  # and it is the smallest that works
    verify.TflmRunner(flatbuffer, arena["arena_bytes"] - verify.ARENA_ALIGNMENT)
  runner = verify.TflmRunner(flatbuffer, arena["arena_bytes"])
  assert runner.run_int8(np.zeros((2,) + tuple(int(d) for d in runner.input["shape"][1:]), np.int8)).shape == (2, 10)


def test_export_runs_byte_exact_on_the_emulated_core(exported, dataset, tmp_path):
  out, _ = exported
  copy = str(tmp_path / "export")
  shutil.copytree(out, copy)
  require_device("cortex-m4")
  report = exporter.run_targets(copy, ["cortex-m4"], dataset, images=16)
  t = report["targets"]["cortex-m4"]
  assert t["matches_host"] and t["images_checked"] == 16 and t["first_mismatch"] is None
  assert [o["op"] for o in t["operators"]] == [o["op"] for o in report["ops"]]
  assert t["instructions_per_inference"] > 0 and t["arena_used_bytes"] > 0
  assert t["elf"]["deployed_flash_bytes"] > report["tflite_bytes"]
  assert json.load(open(os.path.join(copy, "report.json")))["targets"]["cortex-m4"] == t
  assert os.path.exists(os.path.join(copy, "build", "cortex-m4", "console.txt"))
  again = exporter.run_targets(copy, ["cortex-m4"], dataset)  # already run: nothing is redone
  assert again["targets"]["cortex-m4"] == t


def test_a_target_that_cannot_run_leaves_the_export_as_it_was(exported, dataset, tmp_path, monkeypatch):
  out, _ = exported
  copy = str(tmp_path / "export")
  shutil.copytree(out, copy)
  before = open(os.path.join(copy, "report.json")).read()
  monkeypatch.setenv("PATH", str(tmp_path))  # no cross compiler, no QEMU
  from edgenas.device import errors as device_errors
  with pytest.raises(device_errors.ToolchainMissingError, match="apt-get install"):
    exporter.run_targets(copy, ["rv32imac"], dataset)
  assert open(os.path.join(copy, "report.json")).read() == before


@pytest.mark.parametrize("makefile,link", [("Makefile.riscv32", "riscv64-unknown-elf-gcc "),
                                           ("Makefile.cortex_m", "arm-none-eabi-g++ ")])
def test_board_makefiles_compile_and_link_with_the_cross_toolchain(exported, tmp_path, makefile, link):
  """A dry run of the exported board makefile (make -n): the link line uses the target's compiler driver."""
  require_device("rv32imac" if "riscv" in makefile else "cortex-m4")
  from edgenas.device import tflm
  out, _ = exported
  proc = subprocess.run(["make", "-n", "-f", makefile, f"TFLM_DIR={tflm.resolve_tflm_dir()}"], cwd=out,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  links = [l for l in proc.stdout.splitlines() if "-o build/" in l and "edgenas_model.elf" in l]
  assert links and links[0].startswith(link), links
