"""The whole job: `python -m launch.pipeline --config=experiments/digits.py --workdir=runs/digits`.

Search → derive → retrain (quantization-aware) → export to int8 TFLite Micro and verify it in the TFLM interpreter,
then the hand-designed baselines on the same budget, ending with a table of accuracy, energy, latency, SRAM and
flash. Started again on the same workdir, it resumes where it stopped and never redoes a finished stage.
"""
from absl import flags

from launch import common

_CONFIG = common.define_config()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (resumed if it exists).", required=True)
_BASELINES = flags.DEFINE_bool("baselines", True, "Also retrain the baselines for the comparison table.")
_EXPORT = flags.DEFINE_bool("export", True, "Export and verify the searched network in TFLite Micro.")
_TARGETS = flags.DEFINE_list("targets", None, "Emulated cores the export runs on, byte-exact against the host "
                             "(cortex-m4, cortex-m7, cortex-m33, rv32imac); default: the platform's own core; '' "
                             "for none.")
common.define_multihost_flags()


def main(argv):
  del argv
  common.initialize_multihost_if_asked()
  with common.workdir_lock(_WORKDIR.value):  # before the slow imports: a second launcher exits at once
    from edgenas import pipeline
    common.setup_process()
    pipeline.run_pipeline(_CONFIG.value, _WORKDIR.value, baselines=_BASELINES.value, export=_EXPORT.value,
                          targets=None if _TARGETS.value is None else [t for t in _TARGETS.value if t])


if __name__ == "__main__":
  common.run(main)
