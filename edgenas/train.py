"""Retraining a derived network from scratch, optionally quantization-aware for the last epochs.

`run_retrain(config, arch, workdir)` trains `edgenas.nn.model.Net(arch)` with the `config.retrain` settings:
SGD (Nesterov) or AdamW, linear warm-up then cosine decay, decoupled weight decay on conv/dense kernels only,
label smoothing, random-shift (and, for flip-invariant data, flip) augmentation, an optional EMA of the weights
(evaluation and export then use the EMA weights). The last `qat_epochs` epochs run quantization-aware through
`edgenas.quant` (BN folded with frozen statistics, int8 fake quantization, tracked activation ranges).

The run directory follows the search's rules (both run in `edgenas.loop`): the resolved config (with the
architecture) in `config.json`, orbax checkpoints every `checkpoint_every` steps, `metrics.jsonl`, progress lines
with an ETA, and a restart on the same workdir resumes and ends exactly where an uninterrupted run would (batches
and augmentation are functions of (seed, step)). At the end it writes the trained variables (`final/`, read back
by `load_trained`) and `report.json`: float and fake-quant test accuracy, parameters, MACs, and the predicted
latency, energy, peak SRAM and flash on each configured platform.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from edgenas import aot
from edgenas import architecture as arch_lib
from edgenas import checkpoint as ckpt_lib
from edgenas import checks
from edgenas import data as data_lib
from edgenas import loop as loop_lib
from edgenas import optim
from edgenas import parallel
from edgenas import quant as quant_lib
from edgenas import rundir
from edgenas.console import say
from edgenas.nn import model as model_lib
from edgenas.objective import cross_entropy

ARCH_FILE = "arch.json"
REPORT_FILE = "report.json"
FINAL_DIR = "final"
CHECKPOINT_DIR = "checkpoints"
REPORT_VERSION = 1
OPTIMIZERS = ("sgd", "adamw")
EVAL_CHUNK = 512  # test images per compiled evaluation call (the last chunk is padded)
CALIBRATION_IMAGES = 1024  # train images for post-training ranges when QAT is off


class RetrainError(ValueError):
  """A retraining request that cannot work (config, arch.json vs dataset); the message names the field/file."""


@flax.struct.dataclass
class RetrainState:
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any  # what evaluation and export use; equals params when the EMA is off
  quant: quant_lib.QuantState


# --------------------------------------------------------------------------------------------------------------
# Configuration


REQUIRED_FIELDS = ("epochs", "batch_size", "optimizer", "lr", "warmup_epochs", "weight_decay", "label_smoothing",
                   "ema_decay", "max_shift", "qat_epochs", "qat_lr")


def check_config(rc) -> None:
  """Rejects a `config.retrain` that cannot train, naming the field: every field's type and range, and no NaN or
  Inf where a number feeds the optimizer or the schedule. Reads nothing, in microseconds."""
  missing = [name for name in REQUIRED_FIELDS if name not in rc]
  if missing:
    raise RetrainError(f"config.retrain is missing {', '.join(missing)} (see experiments/digits.py for every "
                       f"field and its meaning)")
  if rc.optimizer not in OPTIMIZERS:
    raise RetrainError(f"config.retrain.optimizer must be one of {OPTIMIZERS}, got {rc.optimizer!r}")
  where, err = "config.retrain", RetrainError
  epochs = checks.number(rc, "epochs", where, err, integer=True, ge=1)
  checks.number(rc, "batch_size", where, err, integer=True, ge=1)
  checks.number(rc, "lr", where, err, gt=0)
  checks.number(rc, "lr_min_ratio", where, err, ge=0, le=1, default=0.0)
  checks.number(rc, "momentum", where, err, ge=0, lt=1, default=0.9)
  qat_epochs = checks.number(rc, "qat_epochs", where, err, integer=True, ge=0, le=epochs,
                             why=f"QAT runs the last qat_epochs of epochs = {epochs}")
  checks.number(rc, "qat_lr", where, err, **(dict(gt=0, why="QAT is on: qat_epochs > 0") if qat_epochs else dict(ge=0)))
  checks.number(rc, "warmup_epochs", where, err, ge=0, lt=epochs, why=f"config.retrain.epochs is {epochs}")
  checks.number(rc, "ema_decay", where, err, ge=0, lt=1, why="0 = off")
  checks.number(rc, "label_smoothing", where, err, ge=0, lt=1)
  checks.number(rc, "weight_decay", where, err, ge=0)
  checks.number(rc, "max_shift", where, err, integer=True, ge=0)
  checks.flag(rc, "flip", where, err, True)
  checks.flag(rc, "use_val", where, err, True)
  names = rc.get("platforms", ()) or ()
  if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
    raise RetrainError(f"config.retrain.platforms must be a list of platform names, got {names!r}")


def check_platforms(names: Sequence[str], where: str) -> list[str]:
  """`names` if every one is a platform whose latency and energy can be predicted (a shipped name or a profile
  .json); else RetrainError naming the first that is not and, for a name, the shipped ones. `where` says where
  the names came from (a flag or a config field)."""
  from edgenas.energy import platform as platform_lib  # the energy model, only where platforms are named
  for name in names:
    try:
      platform = platform_lib.load_platform(name)
      for quantity in platform_lib.QUANTITIES:
        platform.coefficients(quantity)
    except platform_lib.EnergyModelError as e:
      raise RetrainError(f"{where}: {e}") from None
  return list(names)


def check_later_stages(config, baselines: bool = True) -> None:
  """What a pipeline or sweep will need after its search, checked before the search starts: a valid
  config.retrain, the platforms its reports price and known baselines. A bad field then costs seconds, not a
  whole search."""
  if "retrain" not in config:
    raise RetrainError("retraining needs a config.retrain section (see experiments/digits.py)")
  check_config(config.retrain)
  platforms_of(config)
  if baselines:
    from edgenas import baselines as baselines_lib
    baselines_lib.check_names(tuple(config.get("baselines", ())))


def platforms_of(config, platforms: Sequence[str] | None = None) -> list[str]:
  """The platforms a report prices, each checked to exist: `platforms` (--platforms) if given, else
  `config.retrain.platforms`, or else the search's `config.cost.platform`."""
  if platforms:
    return check_platforms(list(platforms), "--platforms")
  names = list(config.retrain.get("platforms", ()) or ())
  if names:
    return check_platforms(names, "config.retrain.platforms")
  return check_platforms([config.cost.platform], "config.cost.platform")


def check_compatible(arch: arch_lib.Architecture, dataset: data_lib.Dataset, source: str) -> None:
  if tuple(arch.input_shape) != tuple(dataset.input_shape):
    raise RetrainError(f"{source}: field 'input_shape' is {list(arch.input_shape)} but dataset "
                       f"'{dataset.name}' has images of {list(dataset.input_shape)}")
  if arch.num_classes != dataset.num_classes:
    raise RetrainError(f"{source}: field 'num_classes' is {arch.num_classes} but dataset '{dataset.name}' has "
                       f"{dataset.num_classes} classes")


# --------------------------------------------------------------------------------------------------------------
# Steps


class Trainer:
  """The jit-able pieces for one architecture and config: init, the float and QAT steps, evaluation."""

  def __init__(self, arch: arch_lib.Architecture, rc, total_steps: int, steps_per_epoch: int):
    self.arch, self.rc = arch, rc
    self.net = model_lib.Net(arch)
    self.tx = optim.retrain_optimizer(rc, total_steps, steps_per_epoch)
    self.lr = optim.retrain_lr_schedule(rc, total_steps, steps_per_epoch)
    self.float_correct_jit = jax.jit(self.float_correct)

  def init_state(self, rng) -> RetrainState:
    variables = model_lib.init_net(self.arch, rng)
    params = variables["params"]
    return RetrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
                        opt_state=self.tx.init(params), ema_params=params,
                        quant=quant_lib.init_quant_state(self.arch))

  def _apply_update(self, state: RetrainState, grads, **changes) -> RetrainState:
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = self.rc.ema_decay
    if decay > 0:
      # TF-style warm-up of the EMA decay, so a short run's average is not dominated by the initial weights.
      d = jnp.minimum(decay, (1.0 + state.step) / (10.0 + state.step))
      ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
    else:
      ema = params
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema, **changes)

  def _metrics(self, loss, logits, labels, grads, step):
    return dict(loss=loss, train_acc=jnp.mean(jnp.argmax(logits, -1) == labels),
                grad_norm=optax.tree.norm(grads), lr=self.lr(step))

  def float_step(self, state: RetrainState, batch):
    """Plain training: BatchNorm with batch statistics, running statistics updated."""
    def loss_fn(params):
      logits, new_vars = self.net.apply({"params": params, "batch_stats": state.batch_stats}, batch["image"],
                                        train=True, mutable=["batch_stats"])
      return cross_entropy(logits, batch["label"], self.rc.label_smoothing), (logits, new_vars["batch_stats"])

    (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = self._metrics(loss, logits, batch["label"], grads, state.step)
    return self._apply_update(state, grads, batch_stats=stats), metrics

  def qat_step(self, state: RetrainState, batch):
    """Quantization-aware: BN folded with frozen statistics, int8 fake quantization, ranges tracked."""
    def loss_fn(params):
      logits, quant = quant_lib.qat_forward(self.arch, params, state.batch_stats, state.quant, batch["image"])
      return cross_entropy(logits, batch["label"], self.rc.label_smoothing), (logits, quant)

    (loss, (logits, quant)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = self._metrics(loss, logits, batch["label"], grads, state.step)
    return self._apply_update(state, grads, quant=quant), metrics

  def eval_variables(self, state: RetrainState) -> dict:
    return {"params": state.ema_params, "batch_stats": state.batch_stats}

  def float_correct(self, variables, images, labels, valid):
    logits = self.net.apply(variables, images, train=False)
    return jnp.sum((jnp.argmax(logits, -1) == labels) & valid)

  def fake_quant_correct(self, variables, ranges, images, labels, valid):
    logits = quant_lib.fake_quant_logits(self.arch, variables, ranges, images)
    return jnp.sum((jnp.argmax(logits, -1) == labels) & valid)


def accuracy(correct_fn, split: data_lib.Split, *args) -> float:
  """Accuracy over a whole split in fixed-size chunks (the last one padded and masked: one compile)."""
  n, correct = len(split), 0
  chunk = min(EVAL_CHUNK, n)
  for images, labels in data_lib.chunks(split, chunk):
    valid = np.ones(chunk, bool)
    if len(labels) < chunk:
      pad = chunk - len(labels)
      valid[len(labels):] = False
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
      labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    correct += int(correct_fn(*args, images, labels, valid))
  return correct / max(1, n)


# --------------------------------------------------------------------------------------------------------------
# Running


def training_split(dataset: data_lib.Dataset, use_val: bool) -> data_lib.Split:
  """Retraining uses the search's validation images too (they only steered α), unless told to hold them out."""
  if not use_val:
    return dataset.train
  return data_lib.concat(dataset.train, dataset.val)


def recorded_config(config, arch: arch_lib.Architecture) -> dict:
  """What a restart must match: the config and the architecture being trained."""
  return {"config": rundir.to_jsonable(config), "retrain_arch": arch.to_dict()}


def _place_arch(arch: arch_lib.Architecture, workdir: str) -> None:
  path = os.path.join(workdir, ARCH_FILE)
  if os.path.exists(path):
    existing = arch_lib.Architecture.load(path)
    if existing.hash() != arch.hash():
      raise RetrainError(f"{path} holds architecture {existing.hash()}, not {arch.hash()}: this workdir retrains "
                         f"another network. Use a new --workdir.")
    return
  if jax.process_index() == 0:
    arch.save(path)


def run_retrain(config, arch: arch_lib.Architecture, workdir: str, platforms: Sequence[str] | None = None,
                source: str = "arch.json") -> dict:
  """Trains `arch` from scratch per `config.retrain`, writes `workdir/report.json`, returns the report.

  `platforms` overrides the platforms priced in the report; `source` names the arch.json in error messages.
  A finished workdir returns its report without training again. The config is checked before the workdir is
  touched and `config.json` written only once training is known to start; the workdir is locked for the run."""
  if "retrain" not in config:
    raise RetrainError("the config has no 'retrain' section (see experiments/digits.py)")
  check_config(config.retrain)
  platform_names = platforms_of(config, platforms)  # before any work: an unknown one would fail at the end
  with rundir.workdir_lock(workdir):
    return _retrain(config, arch, workdir, platform_names, source)


def _retrain(config, arch: arch_lib.Architecture, workdir: str, platform_names: Sequence[str], source: str) -> dict:
  rc = config.retrain
  report_path = os.path.join(workdir, REPORT_FILE)
  recorded = recorded_config(config, arch)
  rundir.check_resume(workdir, recorded)  # a finished or started run there must have this config and network
  if os.path.exists(report_path):
    say(f"{workdir}: retraining already finished; not running it again (use a new --workdir to retrain anew)")
    return rundir.read_json(report_path)

  t_start = time.time()
  dataset = data_lib.load_data(config)
  check_compatible(arch, dataset, source)
  use_val = rc.get("use_val", True)
  train_split = training_split(dataset, use_val)
  parallel.check_batch_size(rc.batch_size)
  steps_per_epoch = len(train_split) // rc.batch_size
  if steps_per_epoch < 1:
    raise RetrainError(f"config.retrain.batch_size {rc.batch_size} is larger than the training split "
                       f"({len(train_split)} images)")
  rundir.prepare_workdir(workdir, recorded)  # only now: training starts
  _place_arch(arch, workdir)
  total = rc.epochs * steps_per_epoch
  qat_start = (rc.epochs - rc.qat_epochs) * steps_per_epoch
  mesh = parallel.make_mesh()
  shard, num_shards = parallel.process_shard()
  stream = data_lib.BatchStream.of(train_split, rc.batch_size, config.seed, shard, num_shards)
  flip = bool(rc.get("flip", True)) and dataset.flip_invariant
  trainer = Trainer(arch, rc, total, steps_per_epoch)
  say(f"retrain {arch.name or arch.hash()} ({arch.hash()}): {arch.macs()} MACs, {arch.params()} params; "
      f"{rc.epochs} epochs x {steps_per_epoch} steps, {rc.optimizer} lr {rc.lr}, "
      f"QAT from step {qat_start if rc.qat_epochs else 'never'}, EMA {rc.ema_decay or 'off'}, "
      f"{jax.device_count()} device(s)")

  repl = parallel.replicated(mesh)
  state = jax.jit(trainer.init_state, out_shardings=repl)(jax.random.PRNGKey(config.seed))
  float_step = jax.jit(trainer.float_step, out_shardings=(repl, repl), donate_argnums=0)
  qat_step = jax.jit(trainer.qat_step, out_shardings=(repl, repl), donate_argnums=0)

  def batch_at(step):
    images, labels = stream.batch_at(step)
    images = data_lib.augment(images, np.random.default_rng([config.seed, step]), rc.max_shift, flip)
    return _device_batch({"image": images, "label": labels}, mesh)

  if 0 < qat_start < total:  # the QAT step compiles in the background while the float epochs train
    qat_step = aot.compile_in_background(qat_step, state, batch_at(0))

  def step_fn(state, step):
    return (qat_step if step >= qat_start else float_step)(state, batch_at(step))

  def diverged(step, record):
    return f"the loss became {record['loss']} at step {step}" if loop_lib.non_finite(record, ("loss",)) else None

  def log_fields(state, step, epoch_end):
    fields = dict(epoch=step // steps_per_epoch, qat=step >= qat_start)
    if epoch_end and not use_val:
      fields["val_acc"] = accuracy(trainer.float_correct_jit, dataset.val, trainer.eval_variables(state))
    return fields

  loop = loop_lib.Loop(
      name=workdir, checkpoint_dir=os.path.join(workdir, CHECKPOINT_DIR),
      metrics_paths=[os.path.join(workdir, rundir.METRICS_FILE)], total_steps=total,
      steps_per_epoch=steps_per_epoch, images_per_step=rc.batch_size, log_every=config.log_every,
      checkpoint_every=config.checkpoint_every, keep_checkpoints=config.keep_checkpoints,
      advice="Lower config.retrain.lr.", carry_seconds=True)
  done = loop.run(state, step_fn, diverged=diverged, log_fields=log_fields)
  state = done.state

  report = _final_report(config, arch, trainer, state, dataset, train_split, qat_start < total, platform_names,
                         workdir)
  report["steps"] = total
  report["seconds"] = dict(train=done.train_seconds, this_process=time.time() - t_start)
  if jax.process_index() == 0:
    rundir.atomic_write_json(report_path, report)
  say(f"retrained {arch.hash()}: test acc float {report['test_acc_float']:.4f}, fake-quant int8 "
      f"{report['test_acc_fake_quant']:.4f}; report in {report_path}")
  return report


def _device_batch(batch: dict, mesh) -> dict:
  """The batch sharded over the mesh; on a single device as plain arrays, since the CPU depthwise kernel's
  chunked weight gradient (a lax.scan over the batch) rejects batch-sharded inputs."""
  if jax.device_count() == 1:
    return {k: jnp.asarray(v) for k, v in batch.items()}
  return parallel.global_batch(batch, mesh)


def _final_report(config, arch, trainer: Trainer, state: RetrainState, dataset, train_split, qat: bool,
                  platform_names, workdir: str) -> dict:
  variables = jax.device_get(trainer.eval_variables(state))
  if qat:
    ranges, ranges_source = jax.device_get(state.quant.ranges), "qat_ema_minmax"
  else:
    ranges = quant_lib.calibrate_ranges(arch, variables, data_lib.head(train_split, CALIBRATION_IMAGES)[0])
    ranges_source = "post_training_minmax"
  save_final(workdir, arch, variables, ranges)
  acc_float = accuracy(trainer.float_correct_jit, dataset.test, variables)
  acc_fq = accuracy(jax.jit(trainer.fake_quant_correct), dataset.test, variables, ranges)
  return dict(
      version=REPORT_VERSION, arch_hash=arch.hash(), arch_name=arch.name, arch=arch.summary(),
      dataset=dataset.name, test_images=len(dataset.test), test_acc_float=acc_float, test_acc_fake_quant=acc_fq,
      params=arch.params(), macs=arch.macs(), epochs=config.retrain.epochs, qat_epochs=config.retrain.qat_epochs,
      ema_decay=config.retrain.ema_decay, activation_ranges=quant_lib.ranges_to_json(ranges),
      ranges_source=ranges_source, platforms={name: platform_costs(arch, name) for name in platform_names})


def platform_costs(arch: arch_lib.Architecture, platform: str) -> dict:
  """The predicted per-inference figures of `arch` on one platform (the energy model's estimate)."""
  from edgenas.energy import estimate  # the energy model, imported only where it is used
  e = estimate.estimate_architecture(arch, platform)
  return {k: e[k] for k in ("latency_ms", "energy_uj", "peak_sram_bytes", "flash_bytes", "weight_bytes",
                            "fits_sram", "fits_flash")} | {"out_of_range_ops": len(e["out_of_range"])}


# --------------------------------------------------------------------------------------------------------------
# The trained network, for the exporter


def save_final(workdir: str, arch: arch_lib.Architecture, variables, ranges) -> None:
  """Writes the variables evaluation used (EMA weights when enabled) and the activation ranges to
  `workdir/final` (orbax), replacing an earlier copy."""
  directory = os.path.join(workdir, FINAL_DIR)
  if jax.process_index() == 0 and os.path.isdir(directory):
    shutil.rmtree(directory)  # a copy left by a run killed after training is rewritten whole
  with ckpt_lib.Checkpointer(directory, keep=1) as ckpt:
    ckpt.save(0, {"variables": variables, "ranges": {k: np.asarray(v, np.float32) for k, v in ranges.items()}},
              {"arch_hash": arch.hash()}, force=True)


def load_trained(workdir: str) -> tuple[arch_lib.Architecture, dict, dict]:
  """(arch, variables {"params", "batch_stats"}, activation ranges {tensor: [min, max]}) of a finished retrain.

  The variables are those the report's accuracies were measured with; feed them to
  `edgenas.nn.model.fold_batchnorm` / `forward_folded`. Ranges are as tracked by QAT (or calibrated after
  training when QAT was off); report.json's `ranges_source` says which."""
  arch = arch_lib.Architecture.load(os.path.join(workdir, ARCH_FILE))
  directory = os.path.join(workdir, FINAL_DIR)
  if not os.path.isdir(directory):
    raise RetrainError(f"{workdir}: no trained network ({FINAL_DIR}/ is missing); run launch.retrain on it first")
  target = {"variables": jax.device_get(model_lib.init_net(arch, jax.random.PRNGKey(0))),
            "ranges": {k: np.zeros((2,), np.float32) for k in quant_lib.activation_names(arch)}}
  with ckpt_lib.Checkpointer(directory, keep=1) as ckpt:
    restored = ckpt.restore_latest(target)
  if restored is None:
    raise RetrainError(f"{directory}: holds no saved network")
  if restored.metadata.get("arch_hash") != arch.hash():
    raise RetrainError(f"{directory} was trained for architecture {restored.metadata.get('arch_hash')}, but "
                       f"{workdir}/{ARCH_FILE} is {arch.hash()}")
  return arch, restored.state["variables"], restored.state["ranges"]


def resolve_arch_path(path: str) -> str:
  """An arch.json path, or a search workdir holding one."""
  if os.path.isdir(path):
    candidate = os.path.join(path, ARCH_FILE)
    if not os.path.exists(candidate):
      raise RetrainError(f"{path} is a directory without an {ARCH_FILE} (is the search finished?)")
    return candidate
  return path
