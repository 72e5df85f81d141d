"""Retrain a network from scratch (optionally quantization-aware) and report its accuracy and predicted cost.

  python -m launch.retrain --arch=arch.json --config=experiments/digits.py --workdir=DIR
  python -m launch.retrain --arch=SEARCH_WORKDIR --config=experiments/digits.py --workdir=DIR
  python -m launch.retrain --baseline=mobilenetv2_1.0 --config=experiments/digits.py --workdir=DIR

Writes DIR/report.json (test accuracy float and fake-quant int8, params, MACs, predicted latency/energy/SRAM/flash
per platform) and DIR/final/ (the trained variables, for the exporter). Starting it again on the same workdir
resumes from the latest checkpoint.
"""
from absl import flags

from launch import common

_CONFIG = common.define_config()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (resumed if it exists).", required=True)
_ARCH = flags.DEFINE_string("arch", None, "arch.json, or a finished search workdir holding one.")
_BASELINE = flags.DEFINE_string("baseline", None, "A hand-designed reference network instead of --arch: "
                                "mobilenetv2_1.0, mobilenetv2_0.35 or dscnn.")
_PLATFORMS = flags.DEFINE_list("platforms", None, "Platforms priced in report.json (default: "
                               "config.retrain.platforms, else config.cost.platform).")
common.define_multihost_flags()


def resolve_architecture(config, arch_flag, baseline_flag):
  """(Architecture, source name for messages) from --arch or --baseline."""
  from edgenas import architecture as arch_lib
  from edgenas import baselines, train
  from edgenas import data as data_lib
  if bool(arch_flag) == bool(baseline_flag):
    raise train.RetrainError("give exactly one of --arch (arch.json or a search workdir) and --baseline")
  if arch_flag:
    path = train.resolve_arch_path(arch_flag)
    return arch_lib.Architecture.load(path), path
  dataset = data_lib.load_data(config)
  return baselines.baseline_architecture(baseline_flag, dataset.input_shape, dataset.num_classes), baseline_flag


def retrain(config, arch_flag, baseline_flag, workdir, platforms):
  from edgenas import train
  arch, source = resolve_architecture(config, arch_flag, baseline_flag)
  return train.run_retrain(config, arch, workdir, platforms, source=source)


def main(argv):
  del argv
  common.initialize_multihost_if_asked()
  with common.workdir_lock(_WORKDIR.value):  # before the slow imports: a second launcher exits at once
    common.setup_process()
    report = retrain(_CONFIG.value, _ARCH.value, _BASELINE.value, _WORKDIR.value, _PLATFORMS.value)
  costs = "  ".join(f"{name}: {c['energy_uj']:.4g} uJ, {c['latency_ms']:.4g} ms, SRAM {c['peak_sram_bytes']} B, "
                    f"flash {c['flash_bytes']} B" for name, c in report["platforms"].items())
  print(f"{report['arch_name'] or report['arch_hash']}: test acc {report['test_acc_float']:.4f} float, "
        f"{report['test_acc_fake_quant']:.4f} int8 fake-quant  |  {costs}  -> {_WORKDIR.value}/report.json")


if __name__ == "__main__":
  common.run(main)
