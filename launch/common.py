"""What every launcher shares: the JAX compilation cache and turning known errors into one clear line."""
import os
import sys

from absl import flags, logging

USER_ERROR_MODULES = ("edgenas",)


def quiet_library_logs() -> None:
  """Orbax and JAX log every checkpoint step at INFO; keep the terminal for our progress lines unless the user
  asked for more with --verbosity / -v."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def enable_compilation_cache() -> None:
  """Compiled programs are cached on disk: a second run of the same config skips most of its start-up."""
  import jax
  path = os.environ.get("EDGENAS_JAX_CACHE", os.path.expanduser("~/.cache/edgenas/jax"))
  if path:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def define_multihost_flags() -> None:
  """--multihost and, for processes started by hand, where to find process 0 (JAX detects Slurm, Open MPI,
  Kubernetes and TPU pods by itself)."""
  flags.DEFINE_bool("multihost", False, "Join a multi-process run (jax.distributed.initialize()).")
  flags.DEFINE_string("coordinator_address", None, "--multihost: host:port of process 0, where JAX cannot "
                      "detect the cluster.")
  flags.DEFINE_integer("num_processes", None, "--multihost: number of processes, where JAX cannot detect it.")
  flags.DEFINE_integer("process_id", None, "--multihost: this process's index, where JAX cannot detect it.")


def initialize_multihost_if_asked() -> None:
  """Acts on the flags of `define_multihost_flags`; must run before anything touches a JAX device."""
  f = flags.FLAGS
  if f.multihost:
    from edgenas import parallel
    parallel.initialize_multihost(f.coordinator_address, f.num_processes, f.process_id)


def setup_process() -> None:
  """What every launcher does before any work: quiet library logs, enable the compilation cache."""
  quiet_library_logs()
  enable_compilation_cache()


def run_or_exit(fn, *args, **kwargs):
  """Runs fn; an edgenas error (bad config, dataset, checkpoint, NaN loss, ...) ends the process with its
  message and exit code 1 instead of a traceback. Anything else is a bug and keeps its traceback."""
  try:
    return fn(*args, **kwargs)
  except (ValueError, RuntimeError, OSError) as e:
    if type(e).__module__.split(".")[0] not in USER_ERROR_MODULES:
      raise
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
