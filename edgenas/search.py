"""The search: data, supernet, bilevel steps, and derivation of `arch.json`.

`run_search` builds the steps and hands them to the one training loop (`edgenas.loop`), which owns checkpoints,
metrics, progress and resume. Per step: an architecture step on a validation batch (after the warm-up epochs),
then a weight step on a train batch, both jit-compiled once and data-parallel over the device mesh. The run
directory holds the resolved config, orbax checkpoints, `metrics.jsonl`, `arch.json` and `search.json`; a run
started again on the same workdir resumes from its latest good checkpoint and ends where an uninterrupted run
would, because every random draw and every batch is a function of (seed, step).
"""
from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from edgenas import aot
from edgenas import architecture as arch_lib
from edgenas import checks
from edgenas import cost as cost_lib
from edgenas import data as data_lib
from edgenas import loop as loop_lib
from edgenas import objective as objective_lib
from edgenas import optim
from edgenas import parallel
from edgenas import rundir
from edgenas import space as space_lib
from edgenas.nn import supernet as supernet_lib
# Re-exported for the launchers, sweep and pipeline, which reach them through this module.
from edgenas.console import say
from edgenas.data import load_data

ARCH_FILE = "arch.json"
RESULT_FILE = "search.json"
WATCHED = ("train_ce", "val_ce", "expected_cost")  # the NaN stop looks at these


class SearchConfigError(ValueError):
  """A search config that cannot work; the message names the field."""


class FinishedSearchError(rundir.RunDirError):
  """A finished search (search.json written) whose arch.json is missing, unreadable or another network."""


COST_MODELS = ("energy", "latency", "macs")
WEIGHT_OPTIMIZERS = ("sgd", "adamw")


# --------------------------------------------------------------------------------------------------------------
# Cost model


def resolve_cost_model(config) -> tuple[cost_lib.OpCost, Any, str]:
  """(op cost function, memory surrogate or None, description) from `config.cost`.

  `cost.model = "energy"` prices operators with the platform's fitted per-operator energy regressor (µJ);
  `"latency"` with its latency regressor (ms); `"macs"` is the hardware-agnostic stand-in.
  """
  c = config.cost
  memory_fn = None
  if c.get("memory_budget", 0):
    from edgenas.energy import memory as memory_lib
    memory_fn = lambda space, probs, fracs: memory_lib.expected_memory(space, probs, fracs)[0]
  if c.model == "macs":
    return cost_lib.mac_cost, memory_fn, "MACs (stand-in, not energy)"
  if c.model in ("energy", "latency"):
    from edgenas.energy import regressor
    quantity = "energy_uj" if c.model == "energy" else "latency_ms"
    return (regressor.op_cost_fn(check_cost_platform(config), quantity), memory_fn,
            f"{c.model} on {c.platform} ({quantity})")
  raise SearchConfigError(f"config.cost.model must be 'energy', 'latency' or 'macs', got {c.model!r}")


def check_cost_platform(config):
  """The platform `config.cost` prices with (loaded), or SearchConfigError naming config.cost.platform and the
  shipped platforms; None for the MACs stand-in, which needs none."""
  c = config.cost
  if c.model not in ("energy", "latency"):
    return None
  from edgenas.energy import platform as platform_lib  # the energy model, only where a platform is named
  quantity = "energy_uj" if c.model == "energy" else "latency_ms"
  try:
    platform = platform_lib.load_platform(c.platform)
    platform.coefficients(quantity)
  except platform_lib.EnergyModelError as e:
    raise SearchConfigError(f"config.cost.platform: {e}") from None
  return platform


def objective_config(config, cost_ref: float) -> ml_collections.ConfigDict:
  s, c = config.search, config.cost
  if s.relaxation not in supernet_lib.RELAXATIONS:
    raise SearchConfigError(f"config.search.relaxation must be one of {supernet_lib.RELAXATIONS}, got "
                            f"{s.relaxation!r}")
  if c.penalty in objective_lib.RETIRED_PENALTIES:
    raise SearchConfigError(
        f"config.cost.penalty={c.penalty!r} (CE·(log E/log T)^β) depended on the cost's unit and is NaN below 1; use "
        f"config.cost.penalty='{objective_lib.RETIRED_PENALTIES[c.penalty]}' (CE·(E/T)^β, MnasNet/FBNet), which "
        f"takes the same target and beta")
  if c.penalty not in objective_lib.PENALTIES:
    raise SearchConfigError(f"config.cost.penalty must be one of {objective_lib.PENALTIES}, got {c.penalty!r}")
  # NaN passes `lam < 0` and `target > 0` alike; refused here instead of as a diverged search.
  checks.number(c, "lam", "config.cost", SearchConfigError, ge=0)
  checks.number(c, "target", "config.cost", SearchConfigError, ge=0)
  checks.number(c, "beta", "config.cost", SearchConfigError)
  checks.number(c, "memory_weight", "config.cost", SearchConfigError, ge=0, default=0.0)
  checks.number(c, "memory_budget", "config.cost", SearchConfigError, ge=0, default=0)
  checks.number(s, "zero_one_weight", "config.search", SearchConfigError, ge=0)
  checks.flag(s, "second_order", "config.search", SearchConfigError, False)
  if not (np.isfinite(cost_ref) and cost_ref > 0):
    raise SearchConfigError(f"the uniform supernet's expected cost under config.cost.model={c.model!r} is "
                            f"{cost_ref!r}; the penalty divides by it, so it must be a positive finite number")
  if c.penalty in ("mnas", "target") and not c.target > 0:
    raise SearchConfigError(f"config.cost.target must be > 0 for the {c.penalty} penalty, got {c.target}")
  return ml_collections.ConfigDict(dict(
      relaxation=s.relaxation, second_order=s.second_order, zero_one_weight=s.zero_one_weight,
      weight_sharing=s.get("weight_sharing", "independent"), compute_dtype=s.get("compute_dtype", "float32"),
      penalty=c.penalty, lam=float(c.lam),
      cost_ref=float(cost_ref), target=float(c.target), beta=float(c.beta),
      memory_weight=float(c.get("memory_weight", 0.0)), memory_budget=float(c.get("memory_budget", 0))))


def check_config(config) -> None:
  """Everything a search config can be checked for without its data or a device, in milliseconds: every field
  of config.search, .weights, .arch and .cost (types, ranges, finite numbers), the cost model's platform, the
  search space's fields, the split and the run cadence. Raises SearchConfigError (or SpaceError) naming the
  field. What needs the data (the input shape against the space's strides, batch size against split sizes and
  devices) is checked by `build`, still before any step."""
  for section in ("space", "search", "weights", "arch", "cost"):
    if section not in config:
      raise SearchConfigError(f"the config has no '{section}' section (see experiments/digits.py)")
  err, s, w, a = SearchConfigError, config.search, config.weights, config.arch
  checks.number(config, "seed", "config", err, integer=True, ge=0)
  if config.get("channels", 0) not in (0, 1, 3):
    raise err(f"config.channels must be 0 (keep), 1 or 3, got {config.get('channels')!r}")
  if "data_seed" in config:
    checks.number(config, "data_seed", "config", err, integer=True, ge=0)
  checks.number(config, "val_fraction", "config", err, gt=0, lt=1)
  size = config.get("image_size", 0)
  if not (checks.is_int(size) and size >= 0) and not (
      isinstance(size, (list, tuple)) and len(size) == 2 and all(checks.is_int(x) and x > 0 for x in size)):
    raise err(f"config.image_size must be 0 (keep the dataset's size), a positive integer or (H, W), got {size!r}")
  for key in ("log_every", "checkpoint_every"):
    checks.number(config, key, "config", err, integer=True, ge=1)
  if config.get("keep_checkpoints") is not None:  # None keeps every checkpoint
    checks.number(config, "keep_checkpoints", "config", err, integer=True, ge=1)

  checks.choice(s, "relaxation", "config.search", err, supernet_lib.RELAXATIONS)
  if "weight_sharing" in s:
    checks.choice(s, "weight_sharing", "config.search", err, supernet_lib.WEIGHT_SHARING)
  if "compute_dtype" in s:
    checks.choice(s, "compute_dtype", "config.search", err, objective_lib.COMPUTE_DTYPES)
  epochs = checks.number(s, "epochs", "config.search", err, integer=True, ge=1)
  checks.number(s, "warmup_epochs", "config.search", err, ge=0, lt=epochs,
                why=f"warm-up epochs train the weights only; config.search.epochs is {epochs}")
  checks.number(s, "batch_size", "config.search", err, integer=True, ge=1)
  checks.number(s, "max_steps", "config.search", err, integer=True, ge=0, default=0)
  checks.number(s, "arch_every", "config.search", err, integer=True, ge=1, default=1)
  checks.number(s, "tau_max", "config.search", err, gt=0)
  checks.number(s, "tau_min", "config.search", err, gt=0)

  checks.choice(w, "optimizer", "config.weights", err, WEIGHT_OPTIMIZERS)
  lr = checks.number(w, "lr", "config.weights", err, gt=0)
  checks.number(w, "lr_min", "config.weights", err, ge=0, le=lr, why=f"the cosine decays from lr = {lr:g} to it")
  checks.number(w, "momentum", "config.weights", err, ge=0, lt=1)
  checks.number(w, "weight_decay", "config.weights", err, ge=0)
  checks.number(w, "grad_clip", "config.weights", err, gt=0)

  checks.number(a, "lr", "config.arch", err, gt=0)
  checks.number(a, "b1", "config.arch", err, ge=0, lt=1)
  checks.number(a, "b2", "config.arch", err, ge=0, lt=1)
  checks.number(a, "weight_decay", "config.arch", err, ge=0)
  checks.number(a, "gate_weight_decay", "config.arch", err, ge=0, default=0.0)

  checks.choice(config.cost, "model", "config.cost", err, COST_MODELS)
  check_cost_platform(config)
  objective_config(config, 1.0)  # relaxation, penalty and its numbers

  # The space's own fields; the data supplies input_shape and num_classes later, so stand-ins large enough for
  # any stride take their place here (build checks the real ones).
  space_cfg = dict(config.space)
  space_cfg.setdefault("input_shape", (1 << 16, 1 << 16, 1))
  space_cfg.setdefault("num_classes", 2)
  space_lib.SearchSpace.from_config(space_cfg)


def arch_step_due(step: int, warmup: int, s) -> bool:
  """Whether `step` takes an α step: after the warm-up, every `config.search.arch_every`-th step (1: every step, as
  in DARTS; ProxylessNAS-style k > 1 makes the search cheaper and gives Adam's fixed-size α steps fewer chances to
  settle the choice while the supernet is still learning the task)."""
  return step >= warmup and (step - warmup) % s.get("arch_every", 1) == 0


def tau_at(step: int, total: int, s) -> float:
  """Gumbel temperature, annealed exponentially from tau_max to tau_min over the run."""
  frac = step / max(1, total - 1)
  return float(s.tau_max * (s.tau_min / s.tau_max) ** frac)


# --------------------------------------------------------------------------------------------------------------
# Build, run, derive


def check_data(config, dataset: data_lib.Dataset) -> space_lib.SearchSpace:
  """The checks that need the data (input shape, batch size against the splits and the devices); the search
  space they leave. Cheap: a sweep runs them before it writes anything."""
  space_cfg = dict(config.space)
  space_cfg.setdefault("input_shape", dataset.input_shape)
  space_cfg.setdefault("num_classes", dataset.num_classes)
  if tuple(space_cfg["input_shape"]) != tuple(dataset.input_shape):
    raise SearchConfigError(f"config.space.input_shape {tuple(space_cfg['input_shape'])} does not match the "
                            f"dataset's {dataset.input_shape}")
  space = space_lib.SearchSpace.from_config(space_cfg)
  s = config.search
  parallel.check_batch_size(s.batch_size)
  if len(dataset.train) // s.batch_size < 1 or len(dataset.val) < s.batch_size:
    raise SearchConfigError(f"config.search.batch_size {s.batch_size} is larger than the train ({len(dataset.train)})"
                            f" or validation ({len(dataset.val)}) split")
  return space


def build(config, dataset: data_lib.Dataset):
  """Search space, objective and the numbers of steps, from a config and its data."""
  check_config(config)
  space = check_data(config, dataset)
  s = config.search
  steps_per_epoch = len(dataset.train) // s.batch_size
  total = s.epochs * steps_per_epoch
  if s.get("max_steps", 0):
    total = min(total, s.max_steps)
  warmup = int(round(s.warmup_epochs * steps_per_epoch))  # fractional epochs allowed
  op_cost, memory_fn, cost_desc = resolve_cost_model(config)
  uniform = supernet_lib.init_arch_params(space)
  probs = [supernet_lib.candidate_probs(a, s.relaxation) for a in uniform["alpha"]]
  cost_ref = float(cost_lib.expected_cost(op_cost, space, probs, supernet_lib.gate_fractions(space, uniform)))
  obj = objective_lib.Objective(space, objective_config(config, cost_ref), op_cost, memory_fn,
                                optim.weight_optimizer(config.weights, total), optim.arch_optimizer(config.arch))
  return space, obj, dict(total=total, warmup=warmup, steps_per_epoch=steps_per_epoch, cost_ref=cost_ref,
                          cost_model=cost_desc)


def evaluate(obj, eval_fn, state, split: data_lib.Split, batch_size: int, mesh) -> float:
  """Supernet accuracy on a split (deterministic path; full batches only, since BN uses batch statistics)."""
  n = (len(split) // batch_size) * batch_size
  shard, num_shards = parallel.process_shard()
  rows = data_lib.shard_slice(batch_size, shard, num_shards)
  correct = 0
  for i in range(0, n, batch_size):
    images, labels = split.take(np.arange(i, i + batch_size)[rows])
    local = {"image": images, "label": labels}
    correct += int(eval_fn(state, parallel.global_batch(local, mesh)))
  return correct / max(1, n)


GATE_CLOSURE_DRAWS = 4  # random closings per member and rule: each is one validation pass
GATE_CLOSURE_FRACTION = 0.25  # the ranked rule closes this share of each candidate's gate groups


def gate_closure(space, member_archs, accuracy, draws: int = GATE_CLOSURE_DRAWS, seed: int = 0) -> list[dict]:
  """Do the gates learn which channels the task needs? Per member, the supernet's validation accuracy with every
  gate open, then with gates closed by two rules, each against as many closed at random in each candidate
  (`draws` draws):
    - "learned": the gates the search closed (derive's rule, P(z > 0) <= 0.5); skipped when none closed;
    - "lowest_logits": the GATE_CLOSURE_FRACTION of each candidate's gate groups with the lowest logits: whether
      the search ranks channels by use even where no gate crossed the threshold.
  `accuracy(gate_logits [members, n]) -> [members]` evaluates every member at once."""
  archs = list(member_archs)
  stack = lambda **kw: np.stack([supernet_lib.hard_gates(space, a, **kw) for a in archs])
  all_open = np.asarray(accuracy(stack(closed=False)))
  counts = [supernet_lib.closed_gate_groups(space, a) for a in archs]
  closed_all = [supernet_lib.closed_gate_groups(space, a, selected_only=False)[0] for a in archs]
  rng = np.random.default_rng(seed)
  rules = {"learned": dict(), "lowest_logits": dict(fraction=GATE_CLOSURE_FRACTION)}
  measured = {}
  for rule, kw in rules.items():
    if rule == "learned" and not any(closed_all):
      continue
    measured[rule] = (np.asarray(accuracy(stack(**kw))),
                      [np.asarray(accuracy(stack(rng=rng, **kw))) for _ in range(draws)])
  out = []
  for i in range(len(archs)):
    row = dict(closed_groups=counts[i][0], groups=counts[i][1], closed_groups_all_candidates=closed_all[i],
               val_acc_all_open=float(all_open[i]))
    for rule, (ranked, randoms) in measured.items():
      r = [float(x[i]) for x in randoms]
      row[rule] = dict(val_acc=float(ranked[i]), val_acc_random=r, random_mean=float(np.mean(r)),
                       random_std=float(np.std(r)), loss=float(all_open[i] - ranked[i]),
                       random_loss=float(all_open[i] - np.mean(r)))
    out.append(row)
  return out


def finished_result(workdir: str) -> dict | None:
  """search.json of the search finished in `workdir`, once its arch.json is checked to load and to be the network
  search.json records; None when no search finished there. Only reads: a finished search whose arch.json is
  missing, unreadable or another network raises FinishedSearchError and is left as it is (searching again
  would overwrite finished work)."""
  arch_path, result_path = os.path.join(workdir, ARCH_FILE), os.path.join(workdir, RESULT_FILE)
  if not os.path.exists(result_path):
    return None
  result = rundir.read_json(result_path)
  want = result.get("arch_hash") if isinstance(result, dict) else None
  if not isinstance(want, str):
    raise FinishedSearchError(f"{result_path} records a finished search but no 'arch_hash'; nothing was changed. "
                              f"Search again in a new --workdir.")

  def refused(problem):
    return FinishedSearchError(f"{workdir}: the search finished ({RESULT_FILE} records architecture {want}), but "
                               f"{problem}; nothing was changed. Restore {ARCH_FILE} or search again in a new "
                               f"--workdir.")

  if not os.path.exists(arch_path):
    raise refused(f"{ARCH_FILE} is missing")
  try:
    arch = arch_lib.Architecture.load(arch_path)
  except arch_lib.ArchitectureError as e:
    raise refused(f"{ARCH_FILE} does not load ({e})") from None
  if arch.hash() != want:
    raise refused(f"{ARCH_FILE} holds architecture {arch.hash()}")
  return result


def run_search(config, workdir: str) -> dict:
  """Searches, derives and writes `arch.json` + `search.json` in `workdir`; returns the result record.

  The config is checked before the workdir is touched, and `config.json` written only once the search is known
  to start (after its data-dependent checks), so a refused config never blocks the corrected command. The
  workdir is locked for the run (`rundir.workdir_lock`)."""
  check_config(config)
  with rundir.workdir_lock(workdir):
    return _search(config, workdir)


def _search(config, workdir: str) -> dict:
  arch_path, result_path = os.path.join(workdir, ARCH_FILE), os.path.join(workdir, RESULT_FILE)
  rundir.check_resume(workdir, config)  # a finished or started run there must have this config
  finished = finished_result(workdir)
  if finished is not None:
    say(f"{workdir}: search already finished; not running it again (use a new --workdir to search anew)")
    return finished

  t_start = time.time()
  dataset = load_data(config)
  space, obj, plan = build(config, dataset)
  rundir.prepare_workdir(workdir, config)  # only now: the search starts
  s = config.search
  total, warmup, per_epoch = plan["total"], plan["warmup"], plan["steps_per_epoch"]
  mesh = parallel.make_mesh()
  shard, num_shards = parallel.process_shard()
  train_stream = data_lib.BatchStream.of(dataset.train, s.batch_size, config.seed, shard, num_shards)
  val_stream = data_lib.BatchStream.of(dataset.val, s.batch_size, config.seed + 1, shard, num_shards)
  say(f"search: {len(space.slots())} layers, up to {space.max_candidates()} candidates each, relaxation "
      f"{s.relaxation}, cost model {plan['cost_model']}, {total} steps ({warmup} warm-up), "
      f"{jax.device_count()} device(s)")

  repl = parallel.replicated(mesh)
  init_args = (jax.random.PRNGKey(config.seed), jnp.zeros((1,) + tuple(space.input_shape), jnp.float32))
  lr_at = optim.weight_lr_schedule(config.weights, total)
  batch_at = lambda stream, step: parallel.global_batch(dict(zip(("image", "label"), stream.batch_at(step))), mesh)
  # Compiles in a background thread, in this order, while this thread initialises the state: the weight step
  # (the first step waits for it), then the evaluation and the α step (needed at the end of the first epoch and
  # after the warm-up; the first steps train meanwhile). A run that ends inside its warm-up needs no α step.
  spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
                      jax.eval_shape(obj.init_state, *init_args))
  example = (spec, batch_at(train_stream, 0), batch_at(val_stream, 0), jnp.float32(1.0), jnp.float32(0.1))
  weight_step = aot.compile_in_background(
      jax.jit(obj.weight_step, out_shardings=(repl, repl), donate_argnums=0), spec, example[1], example[3])
  eval_fn = aot.compile_in_background(jax.jit(obj.eval_step), spec, example[1])
  arch_step = jax.jit(obj.arch_step, out_shardings=(repl, repl), donate_argnums=0)
  if warmup < total:
    arch_step = aot.compile_in_background(arch_step, *example)
  state = jax.jit(obj.init_state, out_shardings=repl)(*init_args)

  def step_fn(state, step):
    tau = jnp.float32(tau_at(step, total, s))
    tb, metrics = batch_at(train_stream, step), {}
    if arch_step_due(step, warmup, s):  # DARTS order: α first, on validation data, then w
      state, metrics = arch_step(state, tb, batch_at(val_stream, step), tau, jnp.float32(lr_at(step)))
    state, w_metrics = weight_step(state, tb, tau)
    return state, metrics | w_metrics

  def diverged(step, record):
    bad = loop_lib.non_finite(record, WATCHED)
    return f"{', '.join(bad)} became {record[bad[0]]} at step {step}" if bad else None

  def log_fields(state, step, epoch_end):
    fields = {"val_acc_supernet": evaluate(obj, eval_fn, state, dataset.val, s.batch_size, mesh)} if epoch_end else {}
    return fields | dict(epoch=step // per_epoch, tau=float(np.float32(tau_at(step, total, s))))

  def epoch_summary(record, _):
    # With config.search.arch_every > 1 an epoch may end on a step without an α step: no α figures then.
    in_warmup = (record["epoch"] + 1) * per_epoch <= warmup
    return (f"  epoch {record['epoch'] + 1}/{s.epochs}: val acc (supernet) {record['val_acc_supernet']:.4f}"
            + (f"  expected cost {record['expected_cost']:.4g}  α entropy {record['alpha_entropy']:.3f}"
               if "expected_cost" in record else "  (warm-up: weights only)" if in_warmup else ""))

  loop = loop_lib.Loop(
      name=workdir, checkpoint_dir=os.path.join(workdir, "checkpoints"),
      metrics_paths=[os.path.join(workdir, rundir.METRICS_FILE)], total_steps=total, steps_per_epoch=per_epoch,
      images_per_step=s.batch_size, log_every=config.log_every, checkpoint_every=config.checkpoint_every,
      keep_checkpoints=config.keep_checkpoints,
      advice="Lower config.weights.lr or config.arch.lr, or the penalty weight config.cost.lam.")
  done = loop.run(state, step_fn, diverged=diverged, log_fields=log_fields, epoch_summary=epoch_summary)
  state, t_end = done.state, time.time()

  arch = supernet_lib.derive(space, jax.device_get(state.arch), s.relaxation, name=config.get("name", ""))
  val_acc = evaluate(obj, eval_fn, state, dataset.val, s.batch_size, mesh)
  derived_cost = float(cost_lib.architecture_cost(obj.op_cost, arch))
  closure = gate_closure(space, [jax.device_get(state.arch)], lambda g: [evaluate(
      obj, eval_fn, state.replace(arch=dict(state.arch, gate=jnp.asarray(g[0]))), dataset.val, s.batch_size, mesh)])
  result = dict(
      arch_hash=arch.hash(), arch=arch.summary(), val_acc_supernet=val_acc, gate_closure=closure[0],
      selected_gates=supernet_lib.selected_gate_summary(space, jax.device_get(state.arch)),
      expected_cost=float(obj.expected_cost(state.arch)), derived_cost=derived_cost, cost_model=plan["cost_model"],
      cost_ref=plan["cost_ref"], steps=total, relaxation=s.relaxation,
      probs=[np.asarray(p).round(4).tolist() for p in obj.probs(jax.device_get(state.arch))],
      alpha=[np.asarray(a).tolist() for a in jax.device_get(state.arch["alpha"])],
      candidates=[[c.name for c in slot.candidates] for slot in space.slots()],
      seconds=dict(total=t_end - t_start, loop=done.seconds), devices=jax.device_count())
  if jax.process_index() == 0:
    arch.save(arch_path)
    rundir.atomic_write_json(result_path, result)
  say(f"derived {arch.hash()}: {' '.join(arch.summary()['layers'])}  ({arch.macs()} MACs, {arch.params()} params)"
      f"; written to {arch_path}")
  return result
