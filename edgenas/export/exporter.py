"""One call from a trained network to a verified TFLite Micro deployment: `export_model` / `export_workdir`.

Steps, in order: BN fold -> int8 `.tflite` (convert.py) -> operator check (every op int8 with a TFLM kernel) ->
arena measured in the TFLM interpreter -> the test split through TFLM against the float (and fake-quant) network
-> predicted latency/energy/SRAM/flash per platform and the platform budgets -> C sources and build files ->
`report.json`.

Everything is written into a staging directory next to `out_dir` and moved into place only when the export
succeeded, so a model that fails a check (an SRAM/flash budget, an operator TFLM lacks) never replaces or
damages an earlier export; `report.json` is written last and marks a finished export.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from edgenas import architecture as arch_lib
from edgenas import data as data_lib
from edgenas import rundir
from edgenas.export import convert
from edgenas.export import csource
from edgenas.export import errors
from edgenas.export import verify
from edgenas.nn import model as model_lib

REPORT_VERSION = 1
REPORT_FILE = "report.json"
MODEL_FILE = "model.tflite"
EXPORT_DIR = "export"
FLOAT_TOLERANCE_PTS = 1.0  # int8 vs float accuracy, post-training quantization
QAT_TOLERANCE_PTS = 0.5  # int8 vs fake-quant accuracy, quantization-aware training
# int8 argmax agreement with the float (or, with QAT, the fake-quant) network. A broken conversion (a wrong scale, a
# transposed kernel) agrees on far fewer; on a 12-class KWS net at 86% accuracy, TFLM's integer requantisation
# flips 2.0% of the test clips against fake-quant (0.980: low-margin clips) while both accuracies stay within
# 0.32 points, so 0.99 (which digits passes at 99.6%+) refused a correct export. The accuracy tolerances above
# are the contract; this catches gross breakage.
MIN_AGREEMENT = 0.97
EVAL_BATCH = 256
DEFAULT_TARGET_IMAGES = 16  # test images each emulated target runs and checks byte for byte


def _say(line: str) -> None:
  if jax.process_index() == 0:
    print(line, flush=True)


def float_logits(arch: arch_lib.Architecture, folded: dict, images: np.ndarray, weight_fn=None,
                 act_fn=None) -> np.ndarray:
  """Logits of the BN-folded float network (what the converter starts from), in batches."""
  fn = jax.jit(lambda x: model_lib.forward_folded(arch, folded, x, weight_fn=weight_fn, act_fn=act_fn))
  out = [np.asarray(fn(jnp.asarray(images[i:i + EVAL_BATCH]))) for i in range(0, len(images), EVAL_BATCH)]
  return np.concatenate(out) if out else np.zeros((0, arch.num_classes), np.float32)


def fake_quant_predictions(arch: arch_lib.Architecture, variables, ranges: Mapping, images) -> np.ndarray:
  """Argmax of the int8-simulated network QAT trained (edgenas.quant), for the comparison with TFLM."""
  from edgenas import quant as quant_lib
  fn = jax.jit(lambda x: quant_lib.fake_quant_logits(arch, variables, ranges, x))
  return np.concatenate([np.argmax(np.asarray(fn(jnp.asarray(images[i:i + EVAL_BATCH]))), -1)
                         for i in range(0, len(images), EVAL_BATCH)])


def device_memory_needs(platform, estimate: dict, flatbuffer: bytes,
                        host_arena_bytes: int) -> tuple[int, int, str, str]:
  """(SRAM bytes, flash bytes, what each counts) the model needs on `platform`: on a platform with an emulated
  target, the device memory model's 32-bit arena and whole-program flash (TFLM's code for its operators plus the
  model), as `estimate_tflite` already predicted them; otherwise the host's measured arena and the flatbuffer."""
  predicted = estimate.get("device_memory") or {}
  if predicted.get("predicted_arena_bytes") is not None and predicted.get("predicted_flash_bytes") is not None:
    return (predicted["predicted_arena_bytes"], predicted["predicted_flash_bytes"],
            f"TFLite Micro arena on {platform.target}, predicted", f"the whole {platform.target} program, predicted")
  return host_arena_bytes, len(flatbuffer), "TFLite Micro arena, measured on the host", "the .tflite flatbuffer"


def check_budgets(platform, arena_bytes: int, flash_bytes: int, sram_what: str = "TFLite Micro arena",
                  flash_what: str = "the .tflite flatbuffer") -> None:
  """Raises BudgetError naming the platform, the budget (SRAM or flash) and the figures that do not fit."""
  for what, need, have, field, counted in (("SRAM", arena_bytes, platform.sram_bytes, "sram_bytes", sram_what),
                                           ("flash", flash_bytes, platform.flash_bytes, "flash_bytes", flash_what)):
    if need > have:
      raise errors.BudgetError(
          f"platform {platform.name}: the model needs {need} bytes of {what} ({counted}) but the {what} "
          f"budget is {have} bytes ('{field}' in {platform.path}); nothing was written. Choose a smaller "
          f"architecture (or a memory budget in the search).")


def _platform_entry(platform, estimate: dict, arena_bytes: int) -> dict:
  keys = ("latency_ms", "energy_uj", "peak_sram_bytes", "flash_bytes", "weight_bytes", "sram_budget_bytes",
          "flash_budget_bytes")
  entry = {k: estimate[k] for k in keys}
  if "device_memory" in estimate:  # the 32-bit target's arena and whole-program flash (edgenas.device.memory)
    entry["device_memory"] = estimate["device_memory"]
  entry.update(core=platform.core, clock_mhz=platform.clock_mhz, runtime=platform.runtime,
               fits_sram=arena_bytes <= platform.sram_bytes, fits_flash=estimate["flash_bytes"] <= platform.flash_bytes,
               out_of_range_ops=len(estimate["out_of_range"]), fit_quality=estimate["fit_quality"])
  return entry


def _existing_report(out_dir: str, arch: arch_lib.Architecture, platforms: Sequence[str],
                     log: Callable[[str], None]) -> Optional[dict]:
  """A finished export of the same network for the same platforms (returned as is), or None. An export whose
  checks failed is redone; a finished export of anything else is never overwritten silently."""
  path = os.path.join(out_dir, REPORT_FILE)
  if not os.path.exists(path):
    return None
  report = rundir.read_json(path)
  if not report.get("checks", {}).get("passed"):
    log(f"{path}: an earlier export failed its checks; exporting again")
    return None
  if report.get("arch_hash") == arch.hash() and sorted(report.get("platforms", {})) == sorted(platforms):
    return report
  rundir.refuse_overwrite(path)  # raises FinishedResultError with the way out
  return None


def _accuracy_checks(int8_acc: float, float_acc: float, fq_acc: Optional[float], agreement_float: float,
                     agreement_fq: Optional[float]) -> dict:
  """int8 within 1 point of float; with QAT also within 0.5 points of the fake-quant network, whose argmax the
  int8 model should then reproduce (QAT's network is the int8 model's reference, not the float one)."""
  float_gap = 100.0 * (int8_acc - float_acc)
  checks = dict(int8_minus_float_pts=float_gap, float_tolerance_pts=FLOAT_TOLERANCE_PTS,
                within_float_tolerance=abs(float_gap) <= FLOAT_TOLERANCE_PTS + 1e-9, min_agreement=MIN_AGREEMENT)
  if fq_acc is None:
    checks.update(agreement_reference="float", agreement_ok=agreement_float >= MIN_AGREEMENT)
    checks["passed"] = bool(checks["within_float_tolerance"] and checks["agreement_ok"])
  else:
    fq_gap = 100.0 * (int8_acc - fq_acc)
    checks.update(int8_minus_fake_quant_pts=fq_gap, fake_quant_tolerance_pts=QAT_TOLERANCE_PTS,
                  within_fake_quant_tolerance=abs(fq_gap) <= QAT_TOLERANCE_PTS + 1e-9,
                  agreement_reference="fake_quant", agreement_ok=agreement_fq >= MIN_AGREEMENT)
    checks["passed"] = bool(checks["within_float_tolerance"] and checks["within_fake_quant_tolerance"] and
                            checks["agreement_ok"])
  return checks


def export_model(arch: arch_lib.Architecture, variables, dataset: data_lib.Dataset, out_dir: str,
                 platforms: Sequence[str] = ("stm32l4r5_tflm",), quant_state: Optional[Mapping] = None, *,
                 calibration_images: int = convert.DEFAULT_CALIBRATION_IMAGES, eval_limit: Optional[int] = None,
                 seed: int = 0, strict: bool = True, cpu: str = "cortex-m7+fp", riscv_arch: str = "rv32imac",
                 extra: Optional[Mapping] = None, targets: Sequence[str] = (),
                 target_images: int = DEFAULT_TARGET_IMAGES, log: Callable[[str], None] = _say) -> dict:
  """Exports `arch` with trained `variables` ({"params", "batch_stats"}) into `out_dir`; returns report.json.

  `quant_state`: activation ranges {tensor: [min, max]} learned by QAT (edgenas.quant); None for a float-trained
  network (the converter calibrates on `calibration_images` training images either way). `eval_limit` caps the
  test images run through TFLM. With `strict`, an accuracy or agreement check that fails raises AccuracyError
  after the files are written (report.json then says `checks.passed: false`). Budget and operator failures raise
  before anything is written into `out_dir`.

  `targets` (e.g. ["cortex-m4", "rv32imac"]): after the export, build the program for each emulated core, run it
  under QEMU on the first `target_images` test images and record the device's result in report.json["targets"]
  (see `run_targets`). An export that is already finished only gains the targets it lacks.
  """
  from edgenas.energy import estimate as estimate_lib
  from edgenas.energy import platform as platform_lib

  platforms = list(dict.fromkeys(platforms))
  if not platforms:
    raise errors.ExportError("export: give at least one platform (e.g. stm32l4r5_tflm)")
  if tuple(dataset.input_shape) != tuple(arch.input_shape) or dataset.num_classes != arch.num_classes:
    raise errors.ExportError(f"export: dataset {dataset.name} has inputs {dataset.input_shape} and "
                             f"{dataset.num_classes} classes, architecture {arch.hash()} expects "
                             f"{arch.input_shape} and {arch.num_classes}")
  profiles = [platform_lib.load_platform(p) for p in platforms]
  existing = _existing_report(out_dir, arch, [p.name for p in profiles], log)
  if existing is not None:
    log(f"{out_dir}: already exported for {', '.join(platforms)}; not exporting again")
    return run_targets(out_dir, targets, dataset, target_images, log) if targets else existing

  t_start = time.time()
  model_name = arch.name or f"arch_{arch.hash()}"
  folded = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), model_lib.fold_batchnorm(arch, variables))
  calib = convert.calibration_sample(dataset.train, calibration_images, seed)
  log(f"export: converting {model_name} ({arch.macs()} MACs) to int8 TFLite, calibrated on {len(calib)} training "
      f"images{' with QAT ranges' if quant_state is not None else ''}")
  flatbuffer = convert.to_tflite(arch, folded, calib, quant_state)
  t_convert = time.time()

  ops = verify.model_ops(flatbuffer)
  verify.check_tflm_ops(ops)
  arena = verify.measure_arena(flatbuffer)
  device_arena = verify.device_arena_bytes(flatbuffer, arena["arena_bytes"])

  n_test = len(dataset.test) if eval_limit is None else min(eval_limit, len(dataset.test))
  images, labels = data_lib.head(dataset.test, n_test)
  runner = verify.TflmRunner(flatbuffer, arena["arena_bytes"])
  t_tflm = time.time()
  int8_out, int8_logits = runner.logits(images)
  tflm_ms = 1e3 * (time.time() - t_tflm) / max(1, n_test)
  float_pred = np.argmax(float_logits(arch, folded, images), -1)
  int8_pred = np.argmax(int8_out, -1)
  float_acc, int8_acc = float(np.mean(float_pred == labels)), float(np.mean(int8_pred == labels))
  agreement = float(np.mean(float_pred == int8_pred))
  fq_acc = fq_agreement = None
  if quant_state is not None:
    fq_pred = fake_quant_predictions(arch, variables, quant_state, images)
    fq_acc, fq_agreement = float(np.mean(fq_pred == labels)), float(np.mean(fq_pred == int8_pred))
  checks = _accuracy_checks(int8_acc, float_acc, fq_acc, agreement, fq_agreement)
  log(f"export: TFLM int8 test accuracy {int8_acc:.4f} (float {float_acc:.4f}"
      f"{'' if fq_acc is None else f', fake-quant {fq_acc:.4f}'}), argmax agreement {agreement:.4f} over "
      f"{n_test} images; arena {arena['arena_bytes']} B")
  t_verify = time.time()

  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.", dir=parent)
  try:
    model_path = os.path.join(staging, MODEL_FILE)
    with open(model_path, "wb") as f:
      f.write(flatbuffer)
    estimates = {p.name: estimate_lib.estimate_tflite(model_path, p) for p in profiles}
    for p in profiles:
      check_budgets(p, *device_memory_needs(p, estimates[p.name], flatbuffer, arena["arena_bytes"]))
    summary = verify.op_summary(ops)
    n_samples = min(target_images, n_test)
    sources = csource.model_data_sources(flatbuffer, device_arena, runner.input_qparams, runner.output_qparams,
                                         arch.input_shape, arch.num_classes, runner.quantize_input(images[:n_samples]),
                                         int8_out[:n_samples], [int(v) for v in labels[:n_samples]], model_name)
    sources.update(csource.build_sources(summary, model_name, cpu, riscv_arch))
    csource.write_sources(staging, sources)
    tflite_sram = next(iter(estimates.values()))["peak_sram_bytes"]
    arch_sram = arch.peak_activation_bytes()
    report = dict(
        version=REPORT_VERSION, arch_hash=arch.hash(), arch_name=arch.name, arch=arch.summary(),
        dataset=dataset.name, model_file=MODEL_FILE, tflite_bytes=len(flatbuffer), flash_bytes=len(flatbuffer),
        ops=[dict(index=o["index"], op=o["op"], version=o["version"]) for o in ops], op_summary=summary,
        all_int8=True, tflm_supported=True,
        arena=dict(measured_tflm_bytes=arena["arena_bytes"], recorded_by_tflm_bytes=arena["reported_bytes"],
                   head_bytes=arena["head_bytes"],
                   tail_bytes=arena["tail_bytes"], device_arena_bytes=device_arena,
                   predicted_peak_sram_bytes=arch_sram, predicted_peak_sram_bytes_tflite=tflite_sram,
                   measured_minus_predicted_bytes=arena["arena_bytes"] - arch_sram,
                   measured_over_predicted=arena["arena_bytes"] / max(1, arch_sram),
                   note=("measured: the smallest arena (16-byte steps from what TFLM's RecordingMicroAllocator "
                         "records) the model loads and runs in on this host (reference kernels, 64-bit "
                         "pointers), activations plus TFLM's own structures; predicted: the memory model's largest "
                         "live int8 activation set (Architecture.peak_activation_bytes); device_arena_bytes adds "
                         "CMSIS-NN scratch headroom and is what model_data.h allocates")),
        accuracy=dict(test_images=n_test, float=float_acc, int8_tflm=int8_acc, fake_quant=fq_acc,
                      argmax_agreement_int8_float=agreement, argmax_agreement_int8_fake_quant=fq_agreement,
                      **checks),
        checks=dict(passed=checks["passed"], all_int8=True, tflm_supported=True, fits_budgets=True),
        quantization=dict(input=dict(zip(("scale", "zero_point"), runner.input_qparams)),
                          output=dict(zip(("scale", "zero_point"), runner.output_qparams)),
                          ranges="qat" if quant_state is not None else "post_training_calibration",
                          calibration_images=len(calib)),
        platforms={p.name: _platform_entry(p, estimates[p.name], arena["arena_bytes"]) for p in profiles},
        tflm_host_ms_per_image=tflm_ms, files=sorted(os.listdir(staging)) + [REPORT_FILE],
        builds=dict(cortex_m=dict(makefile="Makefile.cortex_m", cpu=cpu, kernels="CMSIS-NN"),
                    riscv32=dict(makefile="Makefile.riscv32", arch=riscv_arch, kernels="TFLM reference")),
        versions=library_versions(),
        seconds=dict(convert=t_convert - t_start, verify=t_verify - t_convert, total=time.time() - t_start))
    if extra:
      report.update(extra)
    _publish(staging, out_dir, report)
  finally:
    if os.path.isdir(staging):
      shutil.rmtree(staging)
  log(f"export: {len(flatbuffer)} B model, {len(summary)} op kinds, written to {out_dir}")
  if strict and not checks["passed"]:
    raise errors.AccuracyError(
        f"{out_dir}/{REPORT_FILE}: the int8 model fails its checks: TFLM accuracy {int8_acc:.4f}, float "
        f"{float_acc:.4f}{'' if fq_acc is None else f', fake-quant {fq_acc:.4f}'} (tolerance "
        f"{FLOAT_TOLERANCE_PTS} pt vs float{'' if fq_acc is None else f', {QAT_TOLERANCE_PTS} pt vs fake-quant'}); "
        f"argmax agreement with the {checks['agreement_reference']} network "
        f"{agreement if fq_agreement is None else fq_agreement:.4f} (minimum {MIN_AGREEMENT})")
  return run_targets(out_dir, targets, dataset, target_images, log) if targets else report


def target_samples(dataset: data_lib.Dataset, flatbuffer: bytes, count: int) -> tuple[np.ndarray, np.ndarray]:
  """(int8 images, labels): the first `count` test images, quantised as the model's input expects."""
  images, labels = data_lib.head(dataset.test, count)
  return verify.TflmRunner(flatbuffer).quantize_input(images), np.asarray(labels)


def run_targets(out_dir: str, targets: Sequence[str], dataset: data_lib.Dataset,
                images: int = DEFAULT_TARGET_IMAGES, log: Callable[[str], None] = _say) -> dict:
  """Runs a finished export on each emulated target it has not run on yet; returns the updated report.json.

  Each target's build (sources, ELF, map, logs, console output) stays in `out_dir/build/<target>/`. A target's
  result enters report.json only when every output byte matched the host; a mismatch raises MismatchError naming
  the image and the first differing output, and a missing tool, failed build or hang raises its DeviceError, with
  report.json as it was."""
  from edgenas.device import errors as device_errors
  from edgenas.device import memory as device_memory
  from edgenas.device import runner as device_runner
  from edgenas.device import targets as targets_lib

  path = os.path.join(out_dir, REPORT_FILE)
  report = rundir.read_json(path)
  done = report.get("targets", {})
  todo = [t.name for t in targets_lib.parse_targets(",".join(targets)) if t.name not in done]
  if not todo:
    return report
  with open(os.path.join(out_dir, report["model_file"]), "rb") as f:
    flatbuffer = f.read()
  inputs, labels = target_samples(dataset, flatbuffer, images)
  if len(inputs) < images:
    log(f"export: the test split has {len(inputs)} images; the targets check all of them")
  for name in todo:
    result = device_runner.run_on_target(flatbuffer, name, inputs, os.path.join(out_dir, "build"), labels,
                                         arena_bytes=report["arena"]["device_arena_bytes"],
                                         model_name=report.get("arch_name") or f"arch_{report['arch_hash']}",
                                         log=log)
    result["memory_model"] = device_memory.compare(flatbuffer, name, result)
    rundir.atomic_write_json(os.path.join(out_dir, "build", name, "result.json"), result)
    if not result["matches_host"]:
      m = result["first_mismatch"]
      raise device_errors.MismatchError(
          f"target {name}: image {m['image']} differs from the host TFLite Micro interpreter at output "
          f"{m['index']} (device {m['device']}, host {m['host']}){' ' + m['note'] if m.get('note') else ''}; "
          f"{result['images_matching']}/{result['images_checked']} images matched; build kept in "
          f"{os.path.join(out_dir, 'build', name)}")
    report = dict(report, targets=dict(report.get("targets", {}), **{name: result}))
    rundir.atomic_write_json(path, report)
  return report


def _publish(staging: str, out_dir: str, report: dict) -> None:
  """Moves the staged files into `out_dir`, report.json last (its presence marks a finished export)."""
  os.makedirs(out_dir, exist_ok=True)
  for name in sorted(os.listdir(staging)):
    os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
  rundir.atomic_write_json(os.path.join(out_dir, REPORT_FILE), report)


def library_versions() -> dict:
  from importlib import metadata
  out = {}
  for dist in ("tensorflow", "tensorflow-cpu", "ai-edge-litert", "tflite-micro", "jax"):
    try:
      out[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
      pass
  return out


def _retrain_config(workdir: str):
  import ml_collections
  recorded = rundir.read_json(os.path.join(workdir, rundir.CONFIG_FILE))
  config = recorded.get("config", recorded) if isinstance(recorded, dict) else None
  if not isinstance(config, dict) or "dataset" not in config:
    raise errors.ExportError(f"{workdir}/{rundir.CONFIG_FILE}: missing field 'config.dataset'; is this a retrain "
                             "workdir?")
  return ml_collections.ConfigDict(config)


def export_workdir(workdir: str, platforms: Sequence[str] = (), out_dir: Optional[str] = None, **kwargs) -> dict:
  """Exports the network a finished retrain left in `workdir` into `workdir/export` (or `out_dir`).

  Platforms default to the retrain config's (`retrain.platforms`, else `cost.platform`). QAT ranges are used when
  the retrain tracked them (`ranges_source: qat_ema_minmax` in its report.json)."""
  from edgenas import train as train_lib

  report_path = os.path.join(workdir, train_lib.REPORT_FILE)
  if not os.path.exists(report_path):
    raise errors.ExportError(f"{workdir}: no {train_lib.REPORT_FILE}; the retrain has not finished (run "
                             "launch.retrain on it first)")
  retrain_report = rundir.read_json(report_path)
  config = _retrain_config(workdir)
  arch, variables, ranges = train_lib.load_trained(workdir)
  qat = retrain_report.get("ranges_source") == "qat_ema_minmax"
  platforms = list(platforms) or train_lib.platforms_of(config)
  dataset = data_lib.load_data(config)
  extra = dict(retrain=dict(workdir=os.path.abspath(workdir), test_acc_float=retrain_report.get("test_acc_float"),
                            test_acc_fake_quant=retrain_report.get("test_acc_fake_quant"),
                            ranges_source=retrain_report.get("ranges_source")))
  return export_model(arch, variables, dataset, out_dir or os.path.join(workdir, EXPORT_DIR), platforms,
                      quant_state=ranges if qat else None, seed=config.get("seed", 0), extra=extra, **kwargs)


def load_checkpoint(arch: arch_lib.Architecture, directory: str) -> tuple[dict, dict]:
  """(variables, activation ranges) from an orbax directory written by `edgenas.train.save_final` (a retrain's
  `final/`), checked against `arch`."""
  from edgenas import checkpoint as ckpt_lib
  from edgenas import quant as quant_lib

  if not os.path.isdir(directory):
    raise errors.ExportError(f"{directory}: no such checkpoint directory")
  target = {"variables": jax.device_get(model_lib.init_net(arch, jax.random.PRNGKey(0))),
            "ranges": {k: np.zeros((2,), np.float32) for k in quant_lib.activation_names(arch)}}
  with ckpt_lib.Checkpointer(directory, keep=1) as ckpt:
    restored = ckpt.restore_latest(target)
  if restored is None:
    raise errors.ExportError(f"{directory}: holds no saved network")
  saved_hash = restored.metadata.get("arch_hash")
  if saved_hash not in (None, arch.hash()):
    raise errors.ExportError(f"{directory} holds a network for architecture {saved_hash}, not {arch.hash()}")
  return restored.state["variables"], restored.state["ranges"]


def export_checkpoint(arch_path: str, checkpoint_dir: str, config, out_dir: str, platforms: Sequence[str],
                      qat_ranges: bool, **kwargs) -> dict:
  """Exports an arch.json with variables from `checkpoint_dir` (see `load_checkpoint`); the dataset comes from
  `config` (its dataset, data_dir, image_size, val_fraction and seed fields)."""

  arch = arch_lib.Architecture.load(arch_path)
  variables, ranges = load_checkpoint(arch, checkpoint_dir)
  dataset = data_lib.load_data(config)
  return export_model(arch, variables, dataset, out_dir, platforms, quant_state=ranges if qat_ranges else None,
                      seed=config.get("seed", 0), **kwargs)
