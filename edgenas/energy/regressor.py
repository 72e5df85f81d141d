"""Per-platform cost regressor: non-negative per-op-type coefficients over `edgenas.energy.features.FEATURES`.

    cost(op) = θ[op] · (executed MACs, weight bytes, activation bytes, 1, window taps)

(`edgenas.energy.features` explains why MACs are counted as executed and why window taps are a feature), fitted
to a lookup table with non-negative least squares: every coefficient is a physical cost per MAC, per byte, per
call or per tap, so none may be negative, and the model stays monotone in the channel counts the search
shrinks.

Rows are weighted by 1 / (cost + 0.1 x median cost): relative error, so the many cheap operators are priced as
well as the few expensive ones, with a floor so that rows at timer-noise level do not decide the fit. Chosen on
the host table among weights 1 / (cost + floor)^power, 5-fold held-out:

  power 0 (plain least squares): R² 0.925, MAPE 113%, MAPE of the costlier half 23%
  power 0.25:                    R² 0.940, MAPE  39%, costlier half 11%
  power 0.5:                     R² 0.953, MAPE  21%, costlier half 9.1%
  power 1:                       R² 0.973, MAPE  15%, costlier half 8.2%   <- used

Prediction is plain `jax.numpy` arithmetic: `op_cost_fn(platform)` follows the op-cost convention of
`edgenas.cost`, so `edgenas.cost.expected_cost(op_cost_fn(p), space, probs, gate_fracs)` is differentiable.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from scipy import optimize

from edgenas import ops as ops_lib
from edgenas.energy import features as features_lib
from edgenas.energy import lut as lut_lib
from edgenas.energy import platform as platform_lib
from edgenas.energy.errors import EnergyModelError

N_FEATURES = len(features_lib.FEATURES)
WEIGHT_POWER = 1.0
WEIGHT_FLOOR = 0.1  # x the op type's median cost
_COLUMN = {"latency_ms": "latency_ms_mean", "energy_uj": "energy_uj"}


def _targets(rows: Sequence[lut_lib.LutRow], quantity: str) -> np.ndarray:
  if quantity not in _COLUMN:
    raise EnergyModelError(f"unknown quantity {quantity!r}; expected one of {', '.join(_COLUMN)}")
  return np.array([getattr(r, _COLUMN[quantity]) for r in rows], np.float64)


def _features(rows: Sequence[lut_lib.LutRow], feature_fn=features_lib.cost_features) -> np.ndarray:
  return np.array([feature_fn(r.op, r.in_h, r.in_w, r.in_c, r.out_c, r.kernel, r.stride) for r in rows],
                  np.float64)


def fit_op(features: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """NNLS coefficients for one op type, rows weighted by 1 / (cost + floor)^WEIGHT_POWER (see module doc).

  Features are rescaled to unit maximum before solving so NNLS is well conditioned over columns that differ by
  six orders of magnitude (MACs vs the constant).
  """
  floor = WEIGHT_FLOOR * float(np.median(targets)) + 1e-12
  weights = (targets + floor) ** -WEIGHT_POWER
  scale = np.maximum(np.abs(features).max(axis=0), 1e-12)
  solution, _ = optimize.nnls(features / scale * weights[:, None], targets * weights)
  return solution / scale


def _regimes(rows: Sequence[lut_lib.LutRow], on_core: bool = False) -> np.ndarray:
  return np.array([features_lib.regime(r.op, r.kernel, on_core) for r in rows])


def fit(rows: Sequence[lut_lib.LutRow], quantity: str = "latency_ms",
        feature_fn=features_lib.cost_features, on_core: bool = False) -> dict[str, np.ndarray]:
  """{regime: coefficients} for every cost regime (op type, or special kernel) present in `rows`; with
  `on_core`, keyed as the core-run regimes of a board with an accelerator."""
  x, y = _features(rows, feature_fn), _targets(rows, quantity)
  keys = _regimes(rows, on_core)
  return {k: fit_op(x[keys == k], y[keys == k]) for k in sorted(set(keys))}


def predict_rows(coefs: Mapping[str, np.ndarray], rows: Sequence[lut_lib.LutRow],
                 feature_fn=features_lib.cost_features) -> np.ndarray:
  x = _features(rows, feature_fn)
  return np.array([float(np.dot(lookup(coefs, r.op, r.kernel), f)) for r, f in zip(rows, x)])


def lookup(coefs: Mapping[str, Sequence[float]], op: str, kernel: int = 1, on_core: bool = False):
  """The coefficients of `op` with this kernel: its special-kernel regime if fitted, else its op type's (the
  core-run ones with `on_core`)."""
  suffix = features_lib.ON_CORE if on_core else ""
  for key in (features_lib.regime(op, kernel, on_core), op + suffix):
    if key in coefs:
      return coefs[key]
  raise EnergyModelError(f"no cost coefficients for operator {op!r}{' run on the core' if on_core else ''}: the "
                         f"platform's table has no such rows")


def r2_score(y: np.ndarray, pred: np.ndarray) -> float:
  ss_res = float(np.sum((y - pred) ** 2))
  ss_tot = float(np.sum((y - y.mean()) ** 2))
  return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def mape(y: np.ndarray, pred: np.ndarray) -> float:
  keep = y > 0
  if not keep.any():
    return float("nan")
  return float(np.mean(np.abs(pred[keep] - y[keep]) / y[keep]) * 100.0)


def kfold_quality(rows: Sequence[lut_lib.LutRow], quantity: str = "latency_ms", folds: int = 5,
                  seed: int = 0, feature_fn=features_lib.cost_features) -> dict:
  """Held-out fit quality: each row is predicted by a model fitted without it (k-fold, per op type).

  Returns overall R² (on the costs) and R² on log-costs (which weighs small operators like large ones), MAPE
  over all rows and over the costlier half (the operators that dominate a network's sum; the cheapest rows are
  a few microseconds on the host, where timer noise is of the order of the cost), and R²/MAPE per op type. An op type with fewer rows than folds is scored leave-one-out.
  """
  y = _targets(rows, quantity)
  return quality(y, _regimes(rows), kfold_predictions(rows, quantity, folds, seed, feature_fn), quantity, folds)


def kfold_predictions(rows: Sequence[lut_lib.LutRow], quantity: str = "latency_ms", folds: int = 5,
                      seed: int = 0, feature_fn=features_lib.cost_features) -> np.ndarray:
  """Each row's cost predicted by its regime's fit on the folds without it."""
  x, y = _features(rows, feature_fn), _targets(rows, quantity)
  ops = _regimes(rows)
  pred = np.zeros_like(y)
  rng = np.random.default_rng(seed)
  for op in sorted(set(ops)):
    idx = np.flatnonzero(ops == op)
    idx = idx[rng.permutation(len(idx))]
    k = min(folds, len(idx))
    for fold in np.array_split(idx, k):
      train = np.setdiff1d(idx, fold)
      if len(train) == 0:
        raise EnergyModelError(f"k-fold: operator {op!r} has a single row; at least two are needed")
      pred[fold] = x[fold] @ fit_op(x[train], y[train])
  return pred


def quality(y: np.ndarray, ops: np.ndarray, pred: np.ndarray, quantity: str, folds: int) -> dict:
  """R² (costs and log-costs), MAPE (all rows, costlier half) and per-regime R²/MAPE of held-out predictions."""
  per_op = {}
  for op in sorted(set(ops)):
    m = ops == op
    per_op[op] = dict(rows=int(m.sum()), r2=_round(r2_score(y[m], pred[m])), mape_pct=_round(mape(y[m], pred[m])))
  pos = (y > 0) & (pred > 0)
  large = y >= np.median(y)
  return dict(quantity=quantity, folds=folds, rows=len(y), r2=_round(r2_score(y, pred)),
              r2_log=_round(r2_score(np.log(y[pos]), np.log(pred[pos]))), mape_pct=_round(mape(y, pred)),
              mape_pct_upper_half=_round(mape(y[large], pred[large])), per_op=per_op)


def _round(v: float) -> float | None:
  """4 significant digits; None (JSON null) where undefined, e.g. R² of an op type whose rows are all 0."""
  return None if not np.isfinite(v) else float(f"{v:.4g}")


# ----------------------------------------------------------------------------------------------------------
# Prediction (JAX)


def coefficient_matrix(coefs: Mapping[str, Sequence[float]]) -> jnp.ndarray:
  """[len(REGIMES), N_FEATURES] in `edgenas.energy.features.REGIMES` order (a special kernel the table has no
  fit for takes its op type's row); op types the table lacks are NaN, so using one is loud rather than free."""
  m = np.full((len(features_lib.ALL_REGIMES), N_FEATURES), np.nan, np.float32)
  for i, key in enumerate(features_lib.ALL_REGIMES):
    suffix = features_lib.ON_CORE if key.endswith(features_lib.ON_CORE) else ""
    found = coefs.get(key, coefs.get(features_lib.base_op(key) + suffix))
    if found is not None:
      m[i] = np.asarray(found, np.float32)
  return jnp.asarray(m)


def regime_index(op: str, kernel: int, on_core: bool = False) -> int:
  """Row of `coefficient_matrix` for an operator with this kernel (run on the core of a board whose accelerator
  cannot run it, with `on_core`)."""
  return features_lib.ALL_REGIMES.index(features_lib.regime(op, kernel, on_core))


def predict(coef_matrix: jnp.ndarray, op_index: jnp.ndarray, features: jnp.ndarray) -> jnp.ndarray:
  """Cost of operators given their regime index (`regime_index`) and feature vectors; pure and vmap-able."""
  return jnp.sum(coef_matrix[op_index] * features, axis=-1)


def op_cost_fn(platform: platform_lib.Platform | str, quantity: str = "energy_uj"):
  """An `edgenas.cost` op-cost function: `op_cost(op, in_h, in_w, in_c, out_c, kernel, stride) -> scalar`
  in `quantity` units (µJ or ms) on `platform`; differentiable in `in_c`/`out_c`."""
  if isinstance(platform, str):
    platform = platform_lib.load_platform(platform)
  coefs = {op: jnp.asarray(c, jnp.float32) for op, c in platform.coefficients(quantity).items()}
  runs_on_core = core_predicate(platform)

  def op_cost(op, in_h, in_w, in_c, out_c, kernel=1, stride=1):
    feats = features_lib.cost_features(op, in_h, in_w, in_c, out_c, kernel, stride)

    def priced(on_core):
      theta = lookup(coefs, op, kernel, on_core)
      return sum(theta[i] * feats[i] for i in range(N_FEATURES))
    on_core = runs_on_core(op, in_h, in_w, in_c, out_c, kernel, stride)
    if isinstance(on_core, bool):
      return priced(on_core)
    return jnp.where(on_core, priced(True), priced(False))  # the channels decide whether the layer fits

  op_cost.__name__ = f"{platform.name}_{quantity}"
  return op_cost


def fit_table(rows: Sequence[lut_lib.LutRow], on_core: Sequence[bool], core_rows, quantity: str) -> dict:
  """Coefficients for a board's table: without a `core_rows`, `fit(rows)`; with one (a board with an
  accelerator), the accelerated regimes from the rows the accelerator runs and the `_on_core` regimes from
  `core_rows`, every configuration priced on the core."""
  if core_rows is None:
    return fit(rows, quantity)
  accelerated = [r for r, c in zip(rows, on_core) if not c]
  return dict(fit(accelerated, quantity), **fit(core_rows, quantity, on_core=True))


def core_predicate(platform: platform_lib.Platform):
  """`on_core(op, in_h, in_w, in_c, out_c, kernel, stride)`: whether the layer runs on the core of a board whose
  accelerator runs the others (always False without an accelerator; a JAX boolean for traced channels)."""
  from edgenas.energy import accelerator as accelerator_lib
  from edgenas.energy import cycles as cycles_lib
  model = cycles_lib.from_profile(platform.cycle_model, platform.path) if platform.cycle_model else None
  if model is None or model.accelerator is None:
    return lambda *args: False

  def on_core(op, in_h, in_w, in_c, out_c, kernel=1, stride=1):
    fits = model.accelerated(accelerator_lib.geometry(op, in_h, in_w, in_c, out_c, kernel, stride))
    return (not fits) if isinstance(fits, bool) else ~fits
  return on_core


def _nominal_features(*args):
  """edgenas.ops.op_features with a zero window-taps column: the contract's features, for comparison."""
  return tuple(ops_lib.op_features(*args)) + (0.0,)


def fit_platform(platform: platform_lib.Platform, folds: int = 5) -> platform_lib.Platform:
  """The platform with its regressor refitted on its own table and its k-fold fit quality recorded.

  On a board with an accelerator the layers it runs and the layers that fall back to the core get coefficients
  of their own: the accelerated regimes are fitted on the rows the accelerator runs, the `_on_core` ones on
  every configuration priced on the core (the table's core-run rows plus the core's price of the others), so a
  layer that grows past the accelerator's limits is priced as what it then is."""
  import dataclasses
  import datetime
  rows = lut_lib.load_lut(platform.lut_path)
  runs_on_core = core_predicate(platform)
  on_core = [runs_on_core(r.op, r.in_h, r.in_w, r.in_c, r.out_c, r.kernel, r.stride) for r in rows]
  has_accelerator = "accelerator" in (platform.cycle_model or {})
  runs_accelerated = [has_accelerator and not c for c in on_core]
  core_rows = core_table(platform) if any(runs_accelerated) and any(on_core) else None
  regressor, fit_quality = {}, {}
  for quantity in platform_lib.QUANTITIES:
    if core_rows is None:
      coefs = fit(rows, quantity)
      fit_quality[quantity] = kfold_quality(rows, quantity, folds)
    else:
      accelerated = [r for r, c in zip(rows, on_core) if not c]
      coefs = fit_table(rows, on_core, core_rows, quantity)
      # Held out: each accelerated row by the fit on the other accelerated rows, each core-run row by the fit on
      # the rest of the core table.
      pred_acc = iter(kfold_predictions(accelerated, quantity, folds))
      pred_core = kfold_predictions(core_rows, quantity, folds)
      pred = np.array([pred_core[i] if c else next(pred_acc) for i, c in enumerate(on_core)])
      regimes = np.array([features_lib.regime(r.op, r.kernel, c) for r, c in zip(rows, on_core)])
      fit_quality[quantity] = quality(_targets(rows, quantity), regimes, pred, quantity, folds)
    regressor[quantity] = {op: [float(f"{c:.6g}") for c in v] for op, v in coefs.items()}
  if platform.target:
    from edgenas.energy import counts as counts_lib
    counts = counts_lib.load_counts(counts_lib.counts_path(platform.target))
    # Instructions and flash data reads per operator, from the target's own counts (the LUT's latency column
    # carries each count here); flash reads price the wait states of other operating points. On a board with an
    # accelerator, the layers it runs read no weights through the core's flash path that another operating
    # point's wait states would re-price (their cycles are the board's measured ones): their flash reads count 0;
    # their instructions stay the core kernels' (what runs if the layer falls back).
    for quantity in platform_lib.OPTIONAL_QUANTITIES:
      counted = [lut_lib.LutRow(r.op, r.in_h, r.in_w, r.in_c, r.out_c, r.kernel, r.stride, r.groups,
                                0.0 if quantity == "flash_reads" and accelerated else float(getattr(r, quantity)),
                                0.0, 1, 0.0, r.source) for r, accelerated in zip(counts, runs_accelerated)]
      regressor[quantity] = {op: [float(f"{c:.6g}") for c in v] for op, v in fit(counted).items()}
      fit_quality[quantity] = dict(kfold_quality(counted, "latency_ms", folds), quantity=quantity)
  nominal = kfold_quality(rows, "latency_ms", folds, feature_fn=_nominal_features)
  fit_quality["latency_ms_with_contract_features"] = {
      k: nominal[k] for k in ("r2", "r2_log", "mape_pct", "mape_pct_upper_half")}
  fit_quality["method"] = (f"{folds}-fold cross-validation per op type on {os.path.basename(platform.lut_path)}: "
                           "every row predicted by an NNLS fit that did not see it" + (
                               "; rows the core runs by the fit on the core's price of every configuration"
                               if core_rows is not None else ""))
  fit_quality["fitted"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  return dataclasses.replace(platform, regressor=regressor, fit_quality=fit_quality)


def core_table(platform: platform_lib.Platform, model=None, active_mw: float | None = None) -> list[lut_lib.LutRow]:
  """Every counted configuration of the platform's target priced on its core alone (`model`, by default the
  profile's cycle model, without the accelerator), in the table's row order."""
  from edgenas.energy import calibration, counts as counts_lib, cycles as cycles_lib
  model = model or cycles_lib.from_profile(platform.cycle_model, platform.path)
  counts = counts_lib.load_counts(counts_lib.counts_path(platform.target))
  return calibration.emulated_rows(counts, platform, dataclasses.replace(model, accelerator=None),
                                   platform.active_mw if active_mw is None else active_mw)
