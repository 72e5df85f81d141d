"""Export a trained network to TensorFlow Lite Micro, verified in the TFLM interpreter.

  # a finished retrain workdir -> DIR/export/
  python -m launch.export --workdir=DIR --platform=stm32l4r5_tflm --platform=andes_d45_tflm
  # an arch.json and a saved network (a retrain's final/ directory); the dataset comes from --config
  python -m launch.export --arch=arch.json --checkpoint=DIR/final --out_dir=out/export --config=experiments/digits.py

Writes model.tflite, model_data.cc/.h, model_ops.h, main.cc, Makefile.cortex_m, Makefile.riscv32 and report.json.
With --targets=cortex-m4,cortex-m7,rv32imac it also builds the program for each emulated core, runs it under QEMU
on 16 test images, checks every output byte against the host TFLM, and records instructions per inference and per
operator, the arena used and the ELF's sizes in report.json["targets"] (builds in DIR/export/build/<target>/).
Exits with status 1 and one line naming the budget, operator or file when the export fails.
"""
import os

from absl import app, flags

from launch import common

_CONFIG = common.define_config(help_string="Experiment config (its dataset) for --arch/--checkpoint exports. "
                               + common.CONFIG_HELP)
_WORKDIR = flags.DEFINE_string("workdir", None, "A finished retrain workdir; writes WORKDIR/export.")
_ARCH = flags.DEFINE_string("arch", None, "arch.json to export (with --checkpoint).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Saved network (a retrain's final/ directory).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output directory (default: WORKDIR/export, or next to --arch).")
_PLATFORMS = flags.DEFINE_multi_string("platform", [], "Target platform (repeatable); default: the config's.")
_QAT = flags.DEFINE_bool("qat_ranges", True, "With --checkpoint: clip activations at the saved ranges (QAT).")
_EVAL_LIMIT = flags.DEFINE_integer("eval_limit", 0, "Test images run through TFLM (0: the whole test split).")
_STRICT = flags.DEFINE_bool("strict", True, "Fail when the int8 accuracy or argmax agreement check fails.")
_CPU = flags.DEFINE_string("cpu", "cortex-m7+fp", "Cortex-M core for Makefile.cortex_m (TFLM TARGET_ARCH name).")
_RISCV_ARCH = flags.DEFINE_string("riscv_arch", "rv32imac", "RISC-V ISA for Makefile.riscv32 (rv32imc, rv32imac).")
_TARGETS = flags.DEFINE_list("targets", [], "Emulated cores to build for and run on under QEMU, every output byte "
                             "checked against the host (cortex-m4, cortex-m7, cortex-m33, rv32imac, or all).")
_TARGET_IMAGES = flags.DEFINE_integer("target_images", 16, "Test images each target runs.")


def main(argv):
  del argv
  from edgenas import export
  common.setup_process()
  kwargs = dict(eval_limit=_EVAL_LIMIT.value or None, strict=_STRICT.value, cpu=_CPU.value,
                riscv_arch=_RISCV_ARCH.value, targets=_TARGETS.value, target_images=_TARGET_IMAGES.value)
  if _WORKDIR.value and not (_ARCH.value or _CHECKPOINT.value):
    out_dir = _OUT_DIR.value or os.path.join(_WORKDIR.value, "export")
    with common.workdir_lock(out_dir):
      report = export.export_workdir(_WORKDIR.value, _PLATFORMS.value, out_dir, **kwargs)
  elif _ARCH.value and _CHECKPOINT.value and not _WORKDIR.value:
    from edgenas.export import exporter
    config = _CONFIG.value
    platforms = _PLATFORMS.value or [config.cost.platform]
    out_dir = _OUT_DIR.value or os.path.join(os.path.dirname(os.path.abspath(_ARCH.value)), "export")
    with common.workdir_lock(out_dir):
      report = exporter.export_checkpoint(_ARCH.value, _CHECKPOINT.value, config, out_dir, platforms, _QAT.value,
                                          **kwargs)
  else:
    raise app.UsageError("give either --workdir=DIR, or --arch=arch.json together with --checkpoint=DIR")
  acc = report["accuracy"]
  print(f"exported {report['arch_hash']}: {report['tflite_bytes']} B .tflite, TFLM arena "
        f"{report['arena']['measured_tflm_bytes']} B, int8 acc {acc['int8_tflm']:.4f} (float {acc['float']:.4f}), "
        f"agreement with float {acc['argmax_agreement_int8_float']:.4f}")
  for name, p in report["platforms"].items():
    print(f"  {name}: {p['latency_ms']:.3g} ms, {p['energy_uj']:.3g} uJ per inference (predicted)")
  for name, t in report.get("targets", {}).items():
    print(f"  {name}: {t['images_matching']}/{t['images_checked']} test images byte-exact with the host, "
          f"{t['instructions_per_inference']:,} instructions per inference, arena {t['arena_used_bytes']} B, "
          f"flash {t['elf']['deployed_flash_bytes']} B")
  print(f"-> {out_dir}")


if __name__ == "__main__":
  common.run(main)
