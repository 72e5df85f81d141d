"""The optimizers: the search's weight and architecture optimizers, and the retraining optimizer.

Small pure factories of optax transformations and schedules, read from one config section each: `config.weights`
and `config.arch` for the search (`edgenas.objective`), `config.retrain` for retraining (`edgenas.train`).
"""
from __future__ import annotations

import jax
import optax

# --------------------------------------------------------------------------------------------------------------
# Search


def weight_lr_schedule(cfg, total_steps: int) -> optax.Schedule:
  """Cosine decay from lr to lr_min; second-order DARTS also uses it as the virtual step size ξ."""
  return optax.cosine_decay_schedule(cfg.lr, max(1, total_steps), alpha=cfg.lr_min / cfg.lr)


def weight_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
  """SGD + momentum with a cosine schedule by default (DARTS), gradient clipping, decoupled L2."""
  lr = weight_lr_schedule(cfg, total_steps)
  if cfg.optimizer == "sgd":
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.add_decayed_weights(cfg.weight_decay),
                       optax.sgd(lr, momentum=cfg.momentum, nesterov=True))
  if cfg.optimizer == "adamw":
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.adamw(lr, weight_decay=cfg.weight_decay))
  raise ValueError(f"config.weights.optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")


def arch_mask(arch, key: str):
  """True on the leaves of `arch["alpha"]` or of `arch["gate"]` only (a vectorised population's stacked arch too)."""
  return {k: jax.tree.map(lambda _: k == key, v) for k, v in arch.items()}


def arch_optimizer(cfg) -> optax.GradientTransformation:
  """Adam on α and gate logits (DARTS: lr 3e-4, β1 0.5, weight decay 1e-3 on α).

  The gate logits get their own decay, `gate_weight_decay` (default 0). Decay pulls a logit towards 0, where a
  hard-concrete gate is P(z > 0) = 0.83 open: a prior of "open, undecided" that no gate can cross at the
  energy penalties users run. On KWS (experiments/kws.py, gates at their initial logit 3) decay 1e-3 is a
  gradient of 3e-3 per gate, the additive cost term's 4.0e-7 at λ = 0.03 and 4.0e-6 at λ = 0.3; with that decay
  no gate of a 12-epoch KWS search at either λ crossed the threshold (benchmarks/results/gate_closure_kws.json
  before this change)."""
  decay_gates = cfg.get("gate_weight_decay", 0.0)
  return optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=lambda a: arch_mask(a, "alpha")),
                     optax.add_decayed_weights(decay_gates, mask=lambda a: arch_mask(a, "gate")),
                     optax.adam(cfg.lr, b1=cfg.b1, b2=cfg.b2))


# --------------------------------------------------------------------------------------------------------------
# Retraining


def retrain_lr_schedule(rc, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
  """Float phase: linear warm-up from 0 to lr over warmup_epochs, then cosine decay to lr * lr_min_ratio by the
  start of QAT. QAT phase: cosine decay from qat_lr to 0. QAT gets its own, much smaller rate because with BN
  folded from frozen statistics nothing renormalises the layers any more: at the float phase's rates one step
  is enough to wreck a trained network (measured: momentum SGD at 0.015 dropped digits train accuracy from
  80% to 25%)."""
  qat_steps = min(int(rc.qat_epochs * steps_per_epoch), total_steps)
  float_steps = total_steps - qat_steps
  warmup = min(int(rc.warmup_epochs * steps_per_epoch), max(0, float_steps - 1))
  float_lr = optax.warmup_cosine_decay_schedule(0.0, rc.lr, warmup, max(float_steps, warmup + 1),
                                                end_value=rc.lr * rc.get("lr_min_ratio", 0.0))
  if not qat_steps:
    return float_lr
  qat_lr = optax.cosine_decay_schedule(rc.qat_lr, qat_steps)
  return optax.join_schedules([float_lr, qat_lr], [float_steps])


def kernel_mask(params):
  """Weight decay on kernels only: BN scales/biases and biases are not decayed (standard practice)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def retrain_optimizer(rc, total_steps: int, steps_per_epoch: int) -> optax.GradientTransformation:
  """Nesterov SGD or AdamW on `retrain_lr_schedule`, with decoupled weight decay on kernels only."""
  lr = retrain_lr_schedule(rc, total_steps, steps_per_epoch)
  if rc.optimizer == "sgd":
    return optax.chain(optax.add_decayed_weights(rc.weight_decay, mask=kernel_mask),
                       optax.sgd(lr, momentum=rc.get("momentum", 0.9), nesterov=True))
  return optax.adamw(lr, weight_decay=rc.weight_decay, mask=kernel_mask)
