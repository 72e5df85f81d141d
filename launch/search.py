"""Search an architecture: `python -m launch.search --config=experiments/digits.py --workdir=DIR`.

Trains the supernet with the DARTS bilevel objective and writes DIR/arch.json. Starting it again on the same
workdir resumes from the latest checkpoint.
"""
from absl import app, flags
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/digits.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (resumed if it exists).", required=True)
common.define_multihost_flags()


def main(argv):
  del argv
  from edgenas import search
  common.initialize_multihost_if_asked()
  common.setup_process()
  result = common.run_or_exit(search.run_search, _CONFIG.value, _WORKDIR.value)
  print(f"arch {result['arch_hash']}: {' '.join(result['arch']['layers'])}  "
        f"val acc (supernet) {result['val_acc_supernet']:.4f}  cost {result['derived_cost']:.4g} "
        f"[{result['cost_model']}]  -> {_WORKDIR.value}/arch.json")


if __name__ == "__main__":
  app.run(main)
