"""Baselines retrained once: a finished baseline retrain is kept, keyed by everything its result depends on, and
pipelines and sweeps on this machine reuse it instead of training the same network again.

The key hashes the network (arch.json), the data (dataset, data_dir, validation fraction and split seed, image
size, channels), `config.retrain`, the seed, the platforms the report prices, and the source of the edgenas
package itself, so a code change never serves a stale result. Search settings (λ, the search schedule, the space)
do not enter: a baseline's retrain does not read them.

The cache lives in `$EDGENAS_RETRAIN_CACHE` (default `~/.cache/edgenas/retrains`; an empty value turns it off).
A hit copies the finished run (report.json, arch.json, final/, metrics; no checkpoints) into the workdir, records
the current config in its config.json (equal in every field the result depends on) and `reused_from` in its
report; a miss trains in the workdir as before and then stores a copy, written beside its place and moved in
whole. A workdir that already holds a started or finished run is never replaced; a multi-process run does not use
the cache.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from typing import Callable, Sequence

from edgenas import rundir
from edgenas.console import say

ENV = "EDGENAS_RETRAIN_CACHE"
SKIP = ("checkpoints", ".lock")  # what the cache does not keep: resumable state and the workdir lock
DATA_FIELDS = ("dataset", "data_dir", "val_fraction", "image_size", "channels")


def cache_dir() -> str | None:
  value = os.environ.get(ENV, os.path.expanduser("~/.cache/edgenas/retrains"))
  return value or None


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
  """sha256 of every .py file of the installed edgenas package, in path order."""
  root = os.path.dirname(os.path.abspath(__file__))
  h = hashlib.sha256()
  for base, dirs, files in sorted(os.walk(root)):
    dirs.sort()
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(base, name)
        h.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
          h.update(f.read())
  return h.hexdigest()


def key(config, arch, platforms: Sequence[str]) -> str:
  c = rundir.to_jsonable(config)
  data = {k: c.get(k) for k in DATA_FIELDS}
  data["data_seed"] = c.get("data_seed", c.get("seed", 0))  # configs from before data_seed split with seed
  if data["data_dir"]:
    data["data_dir"] = os.path.abspath(os.path.expanduser(data["data_dir"]))
  payload = dict(arch=arch.to_dict(), data=data, retrain=c["retrain"], seed=c.get("seed"),
                 platforms=list(platforms), code=code_hash())
  return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _copy_run(src: str, dst: str) -> None:
  """Copies a finished run directory into `dst` (which must not exist), written beside it and moved in whole."""
  tmp = dst.rstrip("/") + ".copying"
  if os.path.isdir(tmp):
    shutil.rmtree(tmp)
  shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(*SKIP))
  os.replace(tmp, dst)


def retrain_baseline(config, arch, workdir: str, platforms: Sequence[str], run_retrain: Callable) -> dict:
  """`run_retrain(config, arch, workdir, platforms)`, or the cached result of the same retrain."""
  import jax  # pylint: disable=g-import-not-at-top
  from edgenas import train as train_lib  # pylint: disable=g-import-not-at-top
  root = cache_dir()
  platforms = train_lib.platforms_of(config, platforms)
  # Off; or a run of its own is already there (resume or read it); or several processes share the workdir (one
  # copy would race the others): train as without the cache.
  if root is None or os.path.exists(workdir) or jax.process_count() > 1:
    return run_retrain(config, arch, workdir, platforms)
  entry = os.path.join(root, key(config, arch, platforms))
  report_path = os.path.join(entry, train_lib.REPORT_FILE)
  if os.path.isfile(report_path):
    os.makedirs(os.path.dirname(os.path.abspath(workdir)), exist_ok=True)
    _copy_run(entry, workdir)
    rundir.atomic_write_json(os.path.join(workdir, rundir.CONFIG_FILE), train_lib.recorded_config(config, arch))
    report = dict(rundir.read_json(os.path.join(workdir, train_lib.REPORT_FILE)), reused_from=entry)
    rundir.atomic_write_json(os.path.join(workdir, train_lib.REPORT_FILE), report)
    say(f"{workdir}: {arch.name or arch.hash()} retrained earlier with the same network, data, retrain config, "
        f"seed and code; reusing {entry}")
    return report
  report = run_retrain(config, arch, workdir, platforms)
  if not os.path.isdir(entry):
    os.makedirs(root, exist_ok=True)
    _copy_run(workdir, entry)
  return report
