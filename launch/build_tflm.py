"""Build (or find in the cache) the TFLite Micro library of each emulated target.

  python -m launch.build_tflm --targets=all

Every on-target build links against these; `launch.export --targets`, `launch.run_on_target` and
`launch.profile --backend=emulate` build a missing one themselves. Cached under ~/.cache/edgenas/device/tflm
(EDGENAS_DEVICE_CACHE moves it), keyed by target, flags, compiler and TFLM commit. Sources: TFLM_DIR, or the
pinned tree in ../shared/third_party/tflite-micro/.
"""
from absl import flags

from launch import common

_TARGETS = flags.DEFINE_string("targets", "all",
                               "Comma-separated targets (cortex-m4, cortex-m7, cortex-m33, rv32imac) or all.")


def build(names: str) -> None:
  from edgenas.device import targets, tflm
  for target in targets.parse_targets(names):
    library = tflm.build_library(target)
    print(f"{target.name}: {library.archive}" + (f" (built in {library.seconds:.0f} s)" if library.seconds else
                                                 " (cached)"))


def main(argv):
  del argv
  build(_TARGETS.value)


if __name__ == "__main__":
  common.run(main)
