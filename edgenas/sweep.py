"""Energy-penalty sweeps: many searches over λ (and platforms, and energy targets) into one accuracy/energy front.

    run_sweep(config, "runs/sweep", lambdas=[0, 0.1, 0.3, 1, 3], platforms=["stm32l4r5_tflm"])

Every member is a full search (`search.run_search`) on its own workdir `<workdir>/members/<id>/` with
`config.cost.lam`, `config.cost.platform` and `config.cost.target` set, so it resumes, records its config and
writes `arch.json` + `search.json` exactly as a single search would. With `vectorize=True` the members of one
platform are searched as one population instead (`edgenas.population`: one compiled, vmapped program, one batch
stream). `retrain` / `export` carry every member (and the config's baselines) through `edgenas.train` and
`edgenas.export`.

The sweep workdir gets `sweep.json` (one record per member), `pareto.json` (the non-dominated members),
`pareto.png` and `summary.md`. Accuracies in a record:
  - `val_acc`: the supernet's accuracy on the validation split at the end of the search, on the deterministic
    derived path (argmax α; for the softmax/sigmoid relaxations the α-weighted mixture) with deterministic channel
    gates and batch-statistics BatchNorm. This is what the search selects on.
  - `test_acc`: the same supernet accuracy on the test split while the member is only searched
    (`test_acc_source: supernet`); after `retrain`, the retrained network's int8 fake-quant test accuracy; after
    `export`, the int8 accuracy in the TFLite Micro interpreter. The source is always recorded.
The front is drawn on `val_acc` unless every member is retrained, then on `test_acc` (no selection happens on it
after that point).

Finished results are never rewritten. The four files of one sweep form a *result set*, identified by its members
and its stage (search, retrain or export); its sweep JSON, written last, is the record that the set is finished:
  - the first set takes the plain names `sweep.json`, `pareto.json`, `pareto.png`, `summary.md`;
  - a rerun asking for members (or a stage) that no finished set covers computes only what is missing (finished
    members are read, not searched again) and writes a new set beside the old ones: `sweep-<key>.json`,
    `pareto-<key>.json`, `pareto-<key>.png`, `summary-<key>.md`, `<key>` a hash of its member ids and stage;
  - a rerun whose members all belong to one finished set (the same members, or fewer) at the same or a later
    stage reports that set and computes and writes nothing.
Why: a user who adds λ=10 to a finished sweep over λ=0,0.3,1 wants the front of all four, and gets it for the
price of one search, while the three-member set stays byte for byte as it was first written (someone may have
cited or plotted it). Rewriting `sweep.json` in place would silently change or drop published results, and
refusing the rerun would force a new workdir and a repeat of every search. A set's files without its sweep JSON are
leftovers of an interrupted write (or of a user deleting the record to redo it) and are written again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from typing import Iterable, Sequence

import jax
import ml_collections

from edgenas import architecture as arch_lib
from edgenas import checkpoint as ckpt_lib
from edgenas import data as data_lib
from edgenas import loop as loop_lib
from edgenas import parallel
from edgenas import pareto as pareto_lib
from edgenas import rundir
from edgenas import search as search_lib
from edgenas.console import say

SWEEP_FILE = "sweep.json"
PARETO_FILE = "pareto.json"
PLOT_FILE = "pareto.png"
SUMMARY_FILE = "summary.md"
MEMBERS_DIR = "members"
POPULATION_DIR = "population"
BASELINES_DIR = "baselines"
RETRAIN_DIR = "retrain"
TEST_ACC_FILE = "supernet_test.json"
SWEEP_VERSION = 1
TARGET_PENALTIES = ("target", "mnas")
STAGES = ("search", "retrain", "export")  # a result set's stage; each later one carries more results
_SET_FILE = re.compile(r"^sweep-[0-9a-f]{10}\.json$")


class SweepError(ValueError):
  """A sweep that cannot run as asked; raised before any search starts."""


@dataclasses.dataclass(frozen=True)
class Member:
  lam: float
  platform: str
  target: float | None = None  # None: the config's cost.target

  @property
  def id(self) -> str:
    parts = [f"lam{self.lam:g}"]
    if self.target is not None:
      parts.append(f"t{self.target:g}")
    parts.append(self.platform)
    return "-".join(parts)


# --------------------------------------------------------------------------------------------------------------
# Planning and validation (before any work)


def parse_values(text: str, flag: str) -> list[float]:
  """'0,0.1,0.3' -> [0.0, 0.1, 0.3]; empty text -> []; anything not a finite number raises SweepError."""
  values = []
  for item in (t.strip() for t in (text or "").split(",")):
    if not item:
      continue
    try:
      value = float(item)
    except ValueError:
      raise SweepError(f"--{flag}: {item!r} is not a number (expected a comma-separated list such as 0,0.1,0.3)"
                       ) from None
    if not math.isfinite(value):
      raise SweepError(f"--{flag}: {item!r} is not a finite number")
    values.append(value)
  return values


def _duplicates(values: Iterable) -> list:
  seen, dup = set(), []
  for v in values:
    if v in seen and v not in dup:
      dup.append(v)
    seen.add(v)
  return dup


def plan_members(config, lambdas: Sequence[float], platforms: Sequence[str] = (),
                 targets: Sequence[float] = ()) -> list[Member]:
  """The members of a sweep (λ × platform × target), after checking every input; raises SweepError."""
  from edgenas.energy import platform as platform_lib  # the energy model, only where platforms are checked

  lambdas = list(lambdas)
  if not lambdas:
    raise SweepError("the λ list is empty: give at least one penalty weight, e.g. --lambdas=0,0.1,0.3,1")
  bad = [v for v in lambdas if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)]
  if bad:
    raise SweepError(f"λ values must be finite and >= 0; got {', '.join(repr(v) for v in bad)}")
  platforms = list(platforms) or [config.cost.platform]
  known = platform_lib.list_platforms()
  unknown = [p for p in platforms if p not in known]
  if unknown:
    raise SweepError(f"unknown platform(s) {', '.join(unknown)}; known platforms: {', '.join(known)}")
  targets = list(targets)
  if targets and config.cost.penalty not in TARGET_PENALTIES:
    raise SweepError(f"--targets sweeps the energy target T, which only the {' and '.join(TARGET_PENALTIES)} "
                     f"penalties use; config.cost.penalty is {config.cost.penalty!r}")
  bad = [t for t in targets if not (math.isfinite(t) and t > 0)]
  if bad:
    raise SweepError(f"targets must be > 0 (in the cost model's unit); got {', '.join(map(repr, bad))}")
  for name, values in (("λ", lambdas), ("platform", platforms), ("target", targets)):
    dup = _duplicates(float(v) if name != "platform" else v for v in values)
    if dup:
      raise SweepError(f"duplicate {name} value(s) {', '.join(map(str, dup))}: every sweep member must be unique")
  members = [Member(float(lam), platform, float(t) if t is not None else None)
             for platform in platforms for t in (targets or [None]) for lam in lambdas]
  for m in members:  # penalty settings each member's search would reject, refused now rather than mid-sweep
    try:
      search_lib.objective_config(member_config(config, m), 1.0)
    except search_lib.SearchConfigError as e:
      raise SweepError(f"member {m.id}: {e}") from None
  return members


def member_config(config, member: Member) -> ml_collections.ConfigDict:
  """The search config of one member: the sweep's config with its λ, platform and target."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.cost.lam = member.lam
  c.cost.platform = member.platform
  if member.target is not None:
    c.cost.target = member.target
  return c


def default_chunk(config) -> int:
  """0 (one vmap over all members) except for the Gumbel relaxation on a single CPU device, where vmap turns each
  member's one sampled branch into all branches and XLA:CPU compiles the result for many minutes
  (benchmarks/sweep.py); there members are stepped one at a time inside the one compiled program."""
  single_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
  return 1 if single_cpu and config.search.relaxation == "gumbel" else 0


def member_dir(workdir: str, member: Member) -> str:
  return os.path.join(workdir, MEMBERS_DIR, member.id)


def search_finished(directory: str) -> bool:
  return (os.path.exists(os.path.join(directory, search_lib.RESULT_FILE))
          and os.path.exists(os.path.join(directory, search_lib.ARCH_FILE)))


def _require_stage(flag: str, module: str, function: str):
  """The library function a --retrain/--export stage calls, imported only when the flag is given."""
  import importlib
  try:
    return getattr(importlib.import_module(module), function)
  except (ImportError, AttributeError) as e:
    raise SweepError(f"--{flag} needs {module}.{function}, which is not available in this installation ({e})"
                     ) from None


# --------------------------------------------------------------------------------------------------------------
# Running


def run_sweep(config, workdir: str, lambdas: Sequence[float], platforms: Sequence[str] = (),
              targets: Sequence[float] = (), *, vectorize: bool = False, chunk: int | None = None,
              retrain: bool = False,
              export: bool = False) -> dict:
  """Searches (and optionally retrains and exports) every member, then writes a new result set (sweep.json,
  pareto.json, pareto.png and summary.md for the first; see the module docstring) in `workdir`; returns its sweep
  JSON, or that of the finished set that already holds every member, writing nothing. Finished members are skipped and
  unfinished ones resume from their checkpoints. `chunk` (vectorised only): members stepped at once, 0 = all,
  None = `default_chunk`. Every input is checked before the workdir is touched, which is locked for the sweep
  (each member's search locks its own directory too)."""
  search_lib.check_config(config)  # the search config every member starts from, before any file is written
  members = plan_members(config, lambdas, platforms, targets)
  if chunk is None:
    chunk = default_chunk(config)
  if chunk < 0:
    raise SweepError(f"the population chunk must be >= 0 (0: every member at once), got {chunk}")
  retrain = retrain or export  # an export needs the retrained network
  stages = {}
  if retrain:
    stages["retrain"] = _require_stage("retrain", "edgenas.train", "run_retrain")
    from edgenas import train as train_lib
    train_lib.check_later_stages(config)
  if export:
    stages["export"] = _require_stage("export", "edgenas.export", "export_workdir")
  # The checks that need the data, before the sweep's config.json exists (members share the data and batch size).
  search_lib.check_data(config, data_lib.load_data(config))
  with rundir.workdir_lock(workdir):
    return _run_checked(config, workdir, members, vectorize, chunk, retrain, export, stages)


def _run_checked(config, workdir: str, members: Sequence[Member], vectorize: bool, chunk: int, retrain: bool,
                 export: bool, stages: dict) -> dict:
  """`run_sweep` once its inputs are checked and its workdir is locked."""
  rundir.prepare_workdir(workdir, config)
  stage = STAGES[2 if export else 1 if retrain else 0]
  done = covering_set(workdir, [m.id for m in members], stage)
  if done is not None:
    ids, done_stage = set_identity(done)
    say(f"sweep: every member is in the finished result set {set_files(done)['sweep']} ({len(ids)} members, "
        f"{done_stage}); reporting it, nothing to compute or write")
    return done
  _say_what_stays(workdir, members)
  say(f"sweep: {len(members)} members ({', '.join(m.id for m in members)}), "
                 f"{'vectorised' if vectorize else 'one after another'}")

  results = _search_all(config, workdir, members, vectorize, chunk)
  if jax.process_count() > 1:  # process 0 wrote every arch.json; the others read them next
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("sweep: member searches written")
  records = [_member_record(config, workdir, m, results[m.id]) for m in members]
  _add_supernet_test_accuracy(config, workdir, members, records)
  baselines = []
  if retrain:
    for m, r in zip(members, records):
      if r["status"] == "searched":
        _retrain_member(config, workdir, m, r, stages["retrain"])
    baselines = _retrain_baselines(config, workdir, sorted({m.platform for m in members}), stages["retrain"])
  if export and jax.process_index() == 0:
    for m, r in zip(members, records):
      if r["status"] == "retrained":
        _export_member(workdir, m, r, stages["export"])
  return write_outputs(workdir, records, baselines, mode="vectorized" if vectorize else "sequential", stage=stage)


def _search_all(config, workdir: str, members: Sequence[Member], vectorize: bool, chunk: int) -> dict:
  """{member id: search result (or an {'error': ...} record)}; finished members are read, not searched."""
  results, todo = {}, []
  for m in members:
    d = member_dir(workdir, m)
    if search_finished(d):
      say(f"{m.id}: search already finished; skipping it")
      results[m.id] = rundir.read_json(os.path.join(d, search_lib.RESULT_FILE))
    else:
      todo.append(m)
  if not vectorize:
    for m in todo:
      say(f"{m.id}: searching in {member_dir(workdir, m)}")
      try:
        results[m.id] = search_lib.run_search(member_config(config, m), member_dir(workdir, m))
      except loop_lib.NonFiniteLossError as e:  # one diverging member does not end the sweep
        say(f"{m.id}: failed: {e}")
        results[m.id] = {"error": str(e)}
    return results
  from edgenas import population  # the vectorised search, only when asked for
  for platform in sorted({m.platform for m in todo}):
    group = [m for m in todo if m.platform == platform]
    key = hashlib.sha1(",".join(m.id for m in group).encode()).hexdigest()[:10]
    pop_dir = os.path.join(workdir, POPULATION_DIR, f"{platform}-{key}")
    try:
      out = population.run_population_search([member_config(config, m) for m in group],
                                             [member_dir(workdir, m) for m in group], pop_dir, chunk)
    except loop_lib.NonFiniteLossError as e:
      say(f"population {pop_dir}: failed: {e}")
      out = [{"error": str(e)}] * len(group)
    results.update({m.id: r for m, r in zip(group, out)})
  return results


def _member_record(config, workdir: str, m: Member, result: dict) -> dict:
  """The sweep.json record of one searched member: its search figures and the energy model's estimate."""
  record = dict(id=m.id, lam=m.lam, platform=m.platform,
                target=m.target if m.target is not None else (config.cost.target or None),
                penalty=config.cost.penalty, workdir=os.path.relpath(member_dir(workdir, m), workdir),
                arch_hash=None, val_acc=None, test_acc=None, test_acc_source=None, energy_uj=None,
                latency_ms=None, peak_sram_bytes=None, flash_bytes=None)
  if "error" in result:
    return record | dict(status="failed", error=result["error"])
  from edgenas.energy import estimate  # the energy model, imported where it is used
  arch = arch_lib.Architecture.load(os.path.join(member_dir(workdir, m), search_lib.ARCH_FILE))
  e = estimate.estimate_architecture(arch, m.platform)
  record.update(
      status="searched", arch_hash=arch.hash(), layers=arch.summary()["layers"], macs=arch.macs(),
      params=arch.params(), val_acc=result["val_acc_supernet"], energy_uj=e["energy_uj"],
      latency_ms=e["latency_ms"], peak_sram_bytes=e["peak_sram_bytes"], flash_bytes=e["flash_bytes"],
      fits_sram=e["fits_sram"], fits_flash=e["fits_flash"], out_of_range_ops=len(e["out_of_range"]),
      expected_cost=result["expected_cost"], derived_cost=result["derived_cost"], cost_model=result["cost_model"],
      search_seconds=result.get("seconds", {}).get("total"), vectorized="population" in result)
  if result.get("test_acc_supernet") is not None:
    record.update(test_acc=result["test_acc_supernet"], test_acc_source="supernet")
  return record


def _add_supernet_test_accuracy(config, workdir: str, members: Sequence[Member], records: list[dict]) -> None:
  """Supernet test accuracy of members searched one by one, restored from their last checkpoint (one build and
  compile per platform); cached in the member's workdir."""
  scorers = {}
  for m, r in zip(members, records):
    if r["status"] != "searched" or r["test_acc"] is not None:
      continue
    cache = os.path.join(member_dir(workdir, m), TEST_ACC_FILE)
    if os.path.exists(cache):
      r.update(test_acc=rundir.read_json(cache)["test_acc_supernet"], test_acc_source="supernet")
      continue
    mconfig = member_config(config, m)
    if m.platform not in scorers:
      scorers[m.platform] = _SupernetScorer(mconfig)
    acc = scorers[m.platform].test_accuracy(member_dir(workdir, m))
    if acc is None:
      continue
    r.update(test_acc=acc, test_acc_source="supernet")
    if jax.process_index() == 0:
      rundir.atomic_write_json(cache, {"test_acc_supernet": acc})


class _SupernetScorer:
  """Restores finished searches of one space and platform and measures their supernet test accuracy."""

  def __init__(self, config):
    self.config = config
    self.dataset = data_lib.load_data(config)
    space, self.obj, _ = search_lib.build(config, self.dataset)
    self.mesh = parallel.make_mesh()
    repl = parallel.replicated(self.mesh)
    self.state = jax.jit(self.obj.init_state, out_shardings=repl)(
        jax.random.PRNGKey(config.seed), jax.numpy.zeros((1,) + tuple(space.input_shape), jax.numpy.float32))
    self.eval_fn = jax.jit(self.obj.eval_step)

  def test_accuracy(self, workdir: str) -> float | None:
    with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=None) as ckpt:
      restored = ckpt.restore_latest(self.state)
    if restored is None:  # a search of zero steps keeps no checkpoint
      return None
    return search_lib.evaluate(self.obj, self.eval_fn, restored.state, self.dataset.test,
                               self.config.search.batch_size, self.mesh)


def _retrain_member(config, workdir: str, m: Member, record: dict, run_retrain) -> None:
  arch = arch_lib.Architecture.load(os.path.join(member_dir(workdir, m), search_lib.ARCH_FILE))
  report = run_retrain(member_config(config, m), arch, os.path.join(member_dir(workdir, m), RETRAIN_DIR),
                       [m.platform])
  record.update(status="retrained", test_acc=report["test_acc_fake_quant"], test_acc_source="retrained_fake_quant",
                test_acc_float=report["test_acc_float"], supernet_test_acc=record["test_acc"])


def _export_member(workdir: str, m: Member, record: dict, export_workdir) -> None:
  from edgenas.export import ExportError
  try:
    report = export_workdir(os.path.join(member_dir(workdir, m), RETRAIN_DIR), [m.platform])
  except ExportError as e:  # one network the device cannot take does not end the sweep; the record says why
    say(f"{m.id}: export failed: {e}")
    record.update(export_error=str(e))
    return
  acc = report.get("accuracy", {})
  record.update(status="exported", test_acc=acc.get("int8_tflm"), test_acc_source="tflm_int8",
                export_dir=os.path.relpath(os.path.join(member_dir(workdir, m), RETRAIN_DIR, "export"), workdir),
                export_checks_passed=report.get("checks", {}).get("passed"))


def _retrain_baselines(config, workdir: str, platforms: Sequence[str], run_retrain) -> list[dict]:
  """The config's hand-designed baselines, retrained once each and priced on every platform of the sweep."""
  from edgenas import baselines as baselines_lib
  from edgenas import retrain_cache
  names = list(config.get("baselines", ()))
  if not names:
    return []
  dataset = data_lib.load_data(config)
  out = []
  for name in names:
    arch = baselines_lib.baseline_architecture(name, dataset.input_shape, dataset.num_classes)
    report = retrain_cache.retrain_baseline(config, arch, os.path.join(workdir, BASELINES_DIR, name),
                                            list(platforms), run_retrain)
    for platform in platforms:
      costs = report["platforms"][platform]
      out.append(dict(name=name, platform=platform, arch_hash=arch.hash(), test_acc=report["test_acc_fake_quant"],
                      test_acc_float=report["test_acc_float"], energy_uj=costs["energy_uj"],
                      latency_ms=costs["latency_ms"], peak_sram_bytes=costs["peak_sram_bytes"],
                      flash_bytes=costs["flash_bytes"]))
  return out


# --------------------------------------------------------------------------------------------------------------
# Result sets (see the module docstring)


def result_set_key(member_ids: Iterable[str], stage: str) -> str:
  """Names a result set by its stage and its members, in any order."""
  return hashlib.sha1(f"{stage}:{','.join(sorted(member_ids))}".encode()).hexdigest()[:10]


def result_files(key: str | None) -> dict[str, str]:
  """File names of a result set: the plain names for the first set (key None), else suffixed with its key."""
  names = dict(sweep=SWEEP_FILE, pareto=PARETO_FILE, plot=PLOT_FILE, summary=SUMMARY_FILE)
  if key is None:
    return names
  return {kind: f"{os.path.splitext(n)[0]}-{key}{os.path.splitext(n)[1]}" for kind, n in names.items()}


def finished_sets(workdir: str) -> list[dict]:
  """The sweep JSON of every finished result set in `workdir`, the plain-named first set first."""
  if not os.path.isdir(workdir):
    return []
  names = [SWEEP_FILE] if os.path.exists(os.path.join(workdir, SWEEP_FILE)) else []
  names += sorted(n for n in os.listdir(workdir) if _SET_FILE.match(n))
  return [rundir.read_json(os.path.join(workdir, n)) for n in names]


def set_identity(sweep: dict) -> tuple[frozenset, str]:
  """(member ids, stage) of a result set; a sweep.json from before result sets is judged by its records."""
  recorded = sweep.get("result_set")
  if recorded:
    return frozenset(recorded["member_ids"]), recorded["stage"]
  statuses = {r.get("status") for r in sweep["members"]}
  stage = "export" if "exported" in statuses else "retrain" if "retrained" in statuses else "search"
  return frozenset(r["id"] for r in sweep["members"]), stage


def set_files(sweep: dict) -> dict[str, str]:
  return sweep.get("result_set", {}).get("files") or result_files(None)


def covering_set(workdir: str, member_ids: Iterable[str], stage: str) -> dict | None:
  """The finished result set that already answers a sweep of `member_ids` at `stage`: one holding all of them at
  the same or a later stage, the one with the fewest members, then the nearest stage; None if there is none."""
  wanted, rank = set(member_ids), STAGES.index(stage)
  covering = []
  for sweep in finished_sets(workdir):
    ids, done_stage = set_identity(sweep)
    if wanted <= ids and STAGES.index(done_stage) >= rank:
      covering.append(((len(ids), STAGES.index(done_stage) - rank), sweep))
  return min(covering, key=lambda c: c[0], default=(None, None))[1]


def _say_what_stays(workdir: str, members: Sequence[Member]) -> None:
  """Before a new result set: which sets stay as they are, and which finished members the new one leaves out."""
  sets = finished_sets(workdir)
  if not sets:
    return
  say(f"sweep: writing a new result set; {', '.join(set_files(s)['sweep'] for s in sets)} stay as written")
  left_out = sorted(set().union(*(set_identity(s)[0] for s in sets)) - {m.id for m in members})
  if left_out:
    say(f"sweep: finished members {', '.join(left_out)} are not in this set (list them too for their joint front)")


# --------------------------------------------------------------------------------------------------------------
# Outputs


def accuracy_key(records: Sequence[dict]) -> str:
  """The front is drawn on validation accuracy, unless every finished member was retrained (then on test)."""
  done = [r for r in records if r["status"] in pareto_lib.OK_STATUSES]
  retrained = done and all(r["status"] in ("retrained", "exported") for r in done)
  return "test_acc" if retrained else "val_acc"


def write_outputs(workdir: str, records: Sequence[dict], baselines: Sequence[dict] = (),
                  mode: str = "sequential", stage: str = "search") -> dict:
  """A new result set from member records: sweep, pareto JSON, plot and summary (process 0 writes). If a set of
  these members at this stage is finished already, it is returned and nothing is written."""
  identity = (frozenset(r["id"] for r in records), stage)
  for existing in finished_sets(workdir):
    if set_identity(existing) == identity:
      say(f"sweep: result set {set_files(existing)['sweep']} is finished already; not writing it again")
      return existing
  set_key = result_set_key(identity[0], stage)
  files = result_files(set_key if os.path.exists(os.path.join(workdir, SWEEP_FILE)) else None)
  key = accuracy_key(records)
  front = pareto_lib.pareto_front(records, key)
  on_front = {r["id"] for r in front}
  for r in records:
    r["on_front"] = r["id"] in on_front
  notes = [
      "val acc: supernet accuracy on the validation split at the end of the search (derived path, deterministic "
      "gates, batch-statistics BatchNorm); the search selects on it.",
      "test acc: supernet accuracy on the test split until a member is retrained, then the retrained int8 "
      "fake-quant accuracy, then the TFLite Micro int8 accuracy after export (see test_acc_source in sweep.json).",
      "energy, latency, SRAM, flash: edgenas.energy.estimate.estimate_architecture of the derived arch.json.",
  ]
  result_set = dict(key=set_key, stage=stage, member_ids=sorted(identity[0]), files=files)
  sweep = dict(version=SWEEP_VERSION, mode=mode, accuracy_key=key, members=list(records),
               baselines=list(baselines), notes=notes, result_set=result_set)
  if jax.process_index() == 0:
    path = {kind: os.path.join(workdir, name) for kind, name in files.items()}
    rundir.atomic_write_json(path["pareto"], dict(
        version=SWEEP_VERSION, accuracy_key=key, minimise="energy_uj", maximise=key,
        per_platform=True, members=front, sweep=files["sweep"]))
    tmp = os.path.join(workdir, f".{files['plot']}.tmp.png")
    pareto_lib.plot_front(records, front, key, tmp, baselines,
                          title=f"sweep over λ ({len(records)} members)")
    os.replace(tmp, path["plot"])
    summary = pareto_lib.summary_markdown(records, front, key, baselines, notes)
    tmp = os.path.join(workdir, f".{files['summary']}.tmp")
    with open(tmp, "w") as f:
      f.write(summary)
    os.replace(tmp, path["summary"])
    # Last: the sweep JSON marks the set finished, and is never replaced.
    rundir.atomic_write_json(path["sweep"], sweep, overwrite=False)
    say(f"sweep: {len(front)} of {len(records)} members on the front; wrote {', '.join(files.values())} in "
        f"{workdir}")
  return sweep
