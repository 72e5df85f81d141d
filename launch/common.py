"""What every launcher shares: the one error boundary, the --config flag, the workdir lock, the JAX compilation
cache and multi-host start-up.

    _CONFIG = common.define_config()
    ...
    if __name__ == "__main__":
      common.run(main)

`run` is absl's app.run inside one error boundary: a bad command line, a config file that is missing, does not
load or names no such field, a file-system error, and any error of the project's own types end the process with
one line on stderr (`error: ...`) and exit status 1; Ctrl-C ends it with `interrupted at step N; rerun the same
command to resume` and status 130. The traceback is printed too when --verbosity is 1 or more. Any other
exception is a bug and keeps its traceback. `--help` exits 0.
"""
import contextlib
import os
import re
import sys
import traceback

from absl import app, flags, logging

USER_ERROR_MODULES = ("edgenas", "launch")
INTERRUPTED = "interrupted; rerun the same command to resume"
CONFIG_HELP = ("Experiment config file (a Python file with get_config()). Every field and its meaning: "
               "experiments/digits.py, and README.md \"Search options\" for the ones most often changed; override "
               "any field with --config.<field>=<value>, e.g. --config.search.batch_size=64.")
_HELP_FLAG = re.compile(r"--?(help|helpshort|helpfull|helpxml|\?)(=(true|1))?")
_CONFIG_FLAGS = []  # names of the flags define_config defined
flags.disclaim_key_flags()  # the flags defined here belong to the launcher that asks for them: its --help lists them


# --------------------------------------------------------------------------------------------------------------
# Flags


def define_config(default: str = "experiments/digits.py", help_string: str = CONFIG_HELP):
  """--config (an ml_collections config file), whose load errors `run` turns into one line."""
  from ml_collections import config_flags
  _CONFIG_FLAGS.append("config")
  return config_flags.DEFINE_config_file("config", default, help_string)


def define_multihost_flags() -> None:
  """--multihost and, for processes started by hand, where to find process 0 (JAX detects Slurm, Open MPI,
  Kubernetes and TPU pods by itself)."""
  flags.DEFINE_bool("multihost", False, "Join a multi-process run (jax.distributed.initialize()).")
  flags.DEFINE_string("coordinator_address", None, "--multihost: host:port of process 0, where JAX cannot "
                      "detect the cluster.")
  flags.DEFINE_integer("num_processes", None, "--multihost: number of processes, where JAX cannot detect it.")
  flags.DEFINE_integer("process_id", None, "--multihost: this process's index, where JAX cannot detect it.")


# --------------------------------------------------------------------------------------------------------------
# Process set-up


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


def initialize_multihost_if_asked() -> None:
  """Acts on the flags of `define_multihost_flags`; must run before anything touches a JAX device."""
  f = flags.FLAGS
  if "multihost" in f and f.multihost:
    from edgenas import parallel
    parallel.initialize_multihost(f.coordinator_address, f.num_processes, f.process_id)


def setup_process() -> None:
  """What every launcher does before any work: quiet library logs, enable the compilation cache."""
  quiet_library_logs()
  enable_compilation_cache()


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds `workdir`'s lock (edgenas.rundir.workdir_lock) from the launcher's start, before JAX and the library
  are imported, so a second launcher on the same workdir exits within a second. The library's stages lock it
  again (re-entrant). In a multi-host run only process 0 takes it: all processes of one run share the workdir."""
  from edgenas import rundir  # light: no JAX
  f = flags.FLAGS
  primary = True
  if "multihost" in f and f.multihost:
    import jax
    primary = jax.process_index() == 0
  with rundir.workdir_lock(workdir, primary=primary):
    yield


# --------------------------------------------------------------------------------------------------------------
# The error boundary


def run(main) -> None:
  """app.run(main), with every bad input ending in one line (see the module docstring)."""
  app.run(lambda argv: _guarded(main, argv), flags_parser=_parse_flags)


def run_or_exit(fn, *args, **kwargs):
  """Runs fn inside the error boundary (for launchers not started by `run`, and readable at the call site)."""
  try:
    return fn(*args, **kwargs)
  except BaseException as e:  # pylint: disable=broad-except
    exit_on_error(e)


def exit_on_error(e: BaseException, argv=None, parsing: bool = False) -> None:
  """Ends the process with one line for a user error or Ctrl-C; re-raises anything else (a bug)."""
  if isinstance(e, SystemExit):
    raise e
  if isinstance(e, KeyboardInterrupt):
    line, code = str(e) or INTERRUPTED, 130  # edgenas.loop.Interrupted says at which step
  else:
    line, code = error_line(e, argv, parsing), 1
    if line is None:
      raise e
  if _verbosity(argv) >= 1:
    traceback.print_exception(type(e), e, e.__traceback__)
  sys.stdout.flush()
  print(line, file=sys.stderr, flush=True)
  sys.exit(code)


def error_line(e: BaseException, argv=None, parsing: bool = False) -> str | None:
  """The one line for an error the user can fix, or None for a bug."""
  message = str(e)
  if isinstance(e, OSError) and "Configuration is not available" in message:
    return "error: " + (_config_problems() or _one_line(message))
  if isinstance(e, (flags.Error, app.UsageError)):
    return "error: " + _one_line(message)
  if isinstance(e, OSError):
    if e.filename is not None and e.strerror:
      return f"error: {e.filename}: {e.strerror}"
    return "error: " + _one_line(message)
  if type(e).__module__.split(".")[0] in USER_ERROR_MODULES:
    return "error: " + _one_line(message)
  if parsing:  # whatever the flags parser raises is about the command line
    return "error: " + _one_line(f"{type(e).__name__}: {message}")
  return None


def _guarded(main, argv):
  try:
    return main(argv)
  except BaseException as e:  # pylint: disable=broad-except
    exit_on_error(e, argv)


def _parse_flags(argv):
  """absl's flag parsing, with the config files checked first so that their errors name the file and line."""
  asked_for_help = any(_HELP_FLAG.fullmatch(a) for a in _options(argv))
  try:
    if not asked_for_help:
      problem = _config_problems(argv)
      if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(1)
    return flags.FLAGS(argv)
  except SystemExit:
    if asked_for_help:
      sys.exit(0)  # absl exits 1 after printing the help; asking for help is not a failure
    raise
  except BaseException as e:  # pylint: disable=broad-except
    exit_on_error(e, argv, parsing=True)


def _options(argv) -> list[str]:
  args = list(argv[1:])
  return args[:args.index("--")] if "--" in args else args


def _verbosity(argv=None) -> int:
  f = flags.FLAGS
  if f.is_parsed():
    return f.verbosity if f["verbosity"].present else 0
  args = _options(argv or sys.argv)
  level = 0
  for a, following in zip(args, args[1:] + [""]):
    m = re.fullmatch(r"--?(?:verbosity|v)=(-?\d+)", a)
    if m:
      level = int(m.group(1))
    elif a in ("-v", "--v", "--verbosity", "-verbosity") and re.fullmatch(r"-?\d+", following):
      level = int(following)
  return level


def _one_line(message: str) -> str:
  lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):  # a wrapped traceback: its last line says what failed
    return f"{lines[0].rstrip(':')} {lines[-1]}"
  return " ".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Config files


def _config_problems(argv=None) -> str | None:
  """What is wrong with a config file named on the command line (or, without argv, any config flag's file),
  or with a --config.<field> override: one line, or None."""
  for name in _CONFIG_FLAGS:
    path, overrides = _config_args(name, argv or sys.argv)
    if argv is not None and path is None and not overrides:
      continue  # only the default file: loaded, and checked, if the launcher reads it
    problem = _config_problem(name, path or _default_path(name), overrides)
    if problem:
      return problem
  return None


def _default_path(name: str) -> str:
  return flags.FLAGS[name].default_as_str.strip("'\"")


def _config_args(name: str, argv) -> tuple[str | None, list[str]]:
  path, overrides, args = None, [], _options(argv)
  for i, a in enumerate(args):
    m = re.fullmatch(rf"--?{name}(?:=(.*))?", a)
    if m:
      path = m.group(1) if m.group(1) is not None else (args[i + 1] if i + 1 < len(args) else None)
      continue
    m = re.fullmatch(rf"--?{name}\.([^=]+)(?:=.*)?", a)
    if m:
      overrides.append(m.group(1))
  return path, overrides


def _config_problem(name: str, path: str, overrides) -> str | None:
  file, *args = path.split(":", 1)
  if not os.path.exists(file):
    return f"--{name}: {file}: no such file"
  if os.path.isdir(file):
    return f"--{name}: {file}: is a directory, not a config file"
  try:
    config = _load_config(name, file, args)
  except SyntaxError as e:
    return f"--{name}: {file} line {e.lineno}: SyntaxError: {e.msg}"
  except _NoGetConfig:
    return f"--{name}: {file}: defines no get_config()"
  except OSError as e:
    return f"--{name}: {file}: cannot be read ({_one_line(str(e)).splitlines()[0]})"
  except Exception as e:  # pylint: disable=broad-except
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) ==
             os.path.abspath(file)]
    return f"--{name}: {file}{f' line {lines[-1]}' if lines else ''}: {type(e).__name__}: {_one_line(str(e))}"
  for field in overrides:
    problem = _missing_field(config, field)
    if problem:
      return f"--{name}.{field}: {file} has no field {problem}"
  return None


def _load_config(name: str, file: str, args: list[str]):
  """get_config(*args) of the config file, loaded the way ml_collections' config_flags loads it."""
  import importlib.machinery
  import importlib.util
  loader = importlib.machinery.SourceFileLoader(f"{name}_config_check", file)
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
  loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise _NoGetConfig()
  return module.get_config(*args)


class _NoGetConfig(Exception):
  pass


def _missing_field(config, field: str) -> str | None:
  """Where `field` (a dotted path, maybe with [i]) leaves the config, as "config.a.b (config.a has: ...)"."""
  node, where = config, "config"
  for part in field.split("."):
    m = re.fullmatch(r"(\w+)((?:\[\d+\])*)", part)
    if not m:
      return None  # a form this check does not know; the flags parser decides
    key, indices = m.group(1), [int(i) for i in re.findall(r"\[(\d+)\]", m.group(2))]
    keys = list(node.keys()) if hasattr(node, "keys") else None
    if keys is None:
      return None
    if key not in keys:
      return f"{where}.{key} ({where} has: {', '.join(sorted(map(str, keys)))})"
    node, where = node[key], f"{where}.{key}"
    for i in indices:
      if not isinstance(node, (list, tuple)) or i >= len(node):
        return f"{where}[{i}] ({where} has {len(node) if isinstance(node, (list, tuple)) else 'no'} entries)"
      node, where = node[i], f"{where}[{i}]"
  return None
