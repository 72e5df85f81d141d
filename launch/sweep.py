"""Sweep the energy penalty: `python -m launch.sweep --config=experiments/digits.py --workdir=DIR
--lambdas=0,0.1,0.3,1,3 [--platforms=a,b] [--targets=T1,T2] [--vectorize [--chunk=K]] [--retrain] [--export]
[--multihost]`.

Every member searches (and derives) in DIR/members/<id>/; DIR gets sweep.json, pareto.json, pareto.png and
summary.md. Starting it again on the same workdir skips finished members and resumes the others; finished results
are never rewritten: other members write a new set beside them (sweep-<key>.json, ...), members a finished set
already holds are reported from it (edgenas/sweep.py).

Several processes on one or more machines (population spread over all their devices, process 0 writes):
  python -m launch.sweep ... --vectorize --multihost                  # Slurm / TPU pods: detected by JAX
  python -m launch.sweep ... --vectorize --multihost --coordinator_address=HOST:PORT --num_processes=N \
      --process_id=I                                                  # processes started by hand
"""
from absl import flags

from launch import common

_CONFIG = common.define_config()
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (resumed if it exists).", required=True)
_LAMBDAS = flags.DEFINE_string("lambdas", None, "Comma-separated energy-penalty weights λ >= 0.", required=True)
_PLATFORMS = flags.DEFINE_string("platforms", "", "Comma-separated platforms (default: config.cost.platform).")
_TARGETS = flags.DEFINE_string("targets", "", "Comma-separated energy targets T (target/mnas penalty).")
_VECTORIZE = flags.DEFINE_bool("vectorize", False, "Search each platform's members as one vmapped population.")
_CHUNK = flags.DEFINE_integer("chunk", None, "--vectorize: members stepped at once (0: all, one vmap; 1: one at a "
                               "time inside the one compiled program; default: 1 for Gumbel on one CPU, else 0).")
_RETRAIN = flags.DEFINE_bool("retrain", False, "Retrain every member and the config's baselines.")
_EXPORT = flags.DEFINE_bool("export", False, "Export every retrained member to int8 TFLite Micro (implies "
                            "--retrain).")
common.define_multihost_flags()


def main(argv):
  del argv
  common.initialize_multihost_if_asked()
  with common.workdir_lock(_WORKDIR.value):  # before the slow imports: a second launcher exits at once
    import jax
    from edgenas import sweep
    common.setup_process()
    result = sweep.run_sweep(_CONFIG.value, _WORKDIR.value, sweep.parse_values(_LAMBDAS.value, "lambdas"),
                             [p.strip() for p in _PLATFORMS.value.split(",") if p.strip()],
                             sweep.parse_values(_TARGETS.value, "targets"), vectorize=_VECTORIZE.value,
                             chunk=_CHUNK.value, retrain=_RETRAIN.value, export=_EXPORT.value)
  if jax.process_index() != 0:
    return
  key = result["accuracy_key"]
  for r in result["members"]:
    acc = "–" if r.get(key) is None else f"{r[key]:.4f}"
    energy = "–" if r.get("energy_uj") is None else f"{r['energy_uj']:.4g} µJ"
    print(f"{r['id']}: {r['status']}  {key} {acc}  energy {energy}{'  [front]' if r.get('on_front') else ''}")
  files = result.get("result_set", {}).get("files") or sweep.result_files(None)  # the set written or reported
  print(f"-> {_WORKDIR.value}/{', '.join(files.values())}")


if __name__ == "__main__":
  common.run(main)
