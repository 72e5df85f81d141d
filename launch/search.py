"""Search an architecture: `python -m launch.search --config=experiments/digits.py --workdir=DIR`.

Trains the supernet with the DARTS bilevel objective and writes DIR/arch.json. Starting it again on the same
workdir resumes from the latest checkpoint.
"""
from absl import flags

from launch import common

_CONFIG = common.define_config()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (resumed if it exists).", required=True)
common.define_multihost_flags()


def main(argv):
  del argv
  common.initialize_multihost_if_asked()
  with common.workdir_lock(_WORKDIR.value):  # before the slow imports: a second launcher exits at once
    from edgenas import search
    common.setup_process()
    result = search.run_search(_CONFIG.value, _WORKDIR.value)
  print(f"arch {result['arch_hash']}: {' '.join(result['arch']['layers'])}  "
        f"val acc (supernet) {result['val_acc_supernet']:.4f}  cost {result['derived_cost']:.4g} "
        f"[{result['cost_model']}]  -> {_WORKDIR.value}/arch.json")


if __name__ == "__main__":
  common.run(main)
