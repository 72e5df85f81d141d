"""Export a trained network to TensorFlow Lite Micro, verified in the TFLM interpreter.

  # a finished retrain workdir -> DIR/export/
  python -m launch.export --workdir=DIR --platform=stm32l4r5_tflm --platform=andes_d45_tflm
  # an arch.json and a saved network (a retrain's final/ directory); the dataset comes from --config
  python -m launch.export --arch=arch.json --checkpoint=DIR/final --out_dir=out/export --config=experiments/digits.py

Writes model.tflite, model_data.cc/.h, model_ops.h, main.cc, Makefile.cortex_m, Makefile.riscv32 and report.json.
With --targets=cortex-m4,cortex-m7,rv32imac it also builds the program for each emulated core, runs it under QEMU
on 16 test images, checks every output byte against the host TFLM, and records instructions per inference and per
operator, the arena used and the ELF's sizes in report.json["targets"] (builds in DIR/export/build/<target>/).

  # a deployment plan (launch.plan): one program, stage 1 on every frame, stage 2 when it fires -> PLAN_DIR/cascade/
  python -m launch.export --plan=PLAN_DIR [--targets=cortex-m4]

A plan runs on its platform's emulated core unless --targets names others (--targets=none: write the sources
only); every stage output of every test frame, the stages run and the detection are checked against the host.
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
_PLAN = flags.DEFINE_string("plan", None, "A launch.plan output directory (or its plan.json): export the recommended "
                            "deployment as one device program (default out_dir: PLAN_DIR/cascade).")
_PLAN_FRAMES = flags.DEFINE_integer("plan_frames", 24, "Test frames the plan's program embeds and checks (about "
                                    "half on which stage 1 fires).")
_PLAN_OPTION = flags.DEFINE_string("plan_option", None, "With --plan: export this option of plan.json (e.g. "
                                   "'small → large') instead of the recommended one.")
_TARGET_IMAGES = flags.DEFINE_integer("target_images", 16, "Test images each target runs.")


def main(argv):
  del argv
  from edgenas import export
  common.setup_process()
  kwargs = dict(eval_limit=_EVAL_LIMIT.value or None, strict=_STRICT.value, cpu=_CPU.value,
                riscv_arch=_RISCV_ARCH.value, targets=_TARGETS.value, target_images=_TARGET_IMAGES.value)
  if _PLAN.value:
    if _WORKDIR.value or _ARCH.value or _CHECKPOINT.value:
      raise app.UsageError("--plan exports a plan; give it without --workdir, --arch or --checkpoint")
    return _export_plan()
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


def _export_plan():
  from edgenas.energy import platform as platform_lib
  from edgenas.export import cascade
  spec_path = cascade.plan_path(_PLAN.value)
  from edgenas.device import targets as targets_lib
  targets = [t for t in _TARGETS.value if t != "none"]
  if not _TARGETS.value:  # the core of the platform the plan was made for
    platform = cascade.CascadeSpec(spec_path, _PLAN_OPTION.value).platform
    targets = [platform_lib.load_platform(platform).target] if platform else []
  elif targets:  # names checked (and "all" expanded) before any work
    targets = [t.name for t in targets_lib.parse_targets(",".join(targets))]
  out_dir = _OUT_DIR.value or os.path.join(os.path.dirname(os.path.abspath(spec_path)), cascade.CASCADE_DIR)
  with common.workdir_lock(os.path.dirname(os.path.abspath(out_dir))):
    report = cascade.export_plan(spec_path, out_dir, targets, _PLAN_FRAMES.value, cpu=_CPU.value,
                                 riscv_arch=_RISCV_ARCH.value, option=_PLAN_OPTION.value)
  print(f"exported plan {report['name']} ({report['kind']}, {len(report['stages'])} stage(s))")
  for name, t in report["targets"].items():
    print(f"  {name}: {t['frames_matching']}/{t['frames_checked']} frames byte-exact with the host, stage 2 ran "
          f"on {t['stage2_runs']}; instructions per stage {', '.join(f'{v:,}' for v in t['instructions_per_stage'])}; "
          f"flash {t['elf']['deployed_flash_bytes']:,} B")
  print(f"-> {out_dir}")


if __name__ == "__main__":
  common.run(main)
