"""Silicon Labs' MVP accelerator (EFR32xG24): a per-operator cycle model fitted to layers measured on the chip.

The EFR32MG24 runs TFLM's convolution, depthwise, fully connected, add and pooling kernels on its Matrix Vector
Processor (MVP) when the tensor sizes allow, and everything else on its Cortex-M33. Emulating the M33 alone
cannot price that (the board runs ResNet-8 4.5x faster than the M33's CMSIS-NN instruction count allows), and
the MVP is not emulated by QEMU. What exists instead are measurements: Silicon Labs publishes, for every model
of its MLTK model zoo, `mltk profile <model> --device --accelerator MVP` run on a physical EFR32xG24 at 78 MHz,
one row per layer with the MVP's cycle counter ("Acc Cycles"), the CPU's cycles spent in the layer
("CPU Cycles") and the layer's time. `scripts/import_mvp_layers.py` transcribes them into
`platforms/efr32mg24_mvp_layers.csv` (each row names its file and commit).

The model, per regime (`REGIMES`: convolution, depthwise per output pixel or per channel, fully connected, add,
average and max pooling), on features that follow from how the MVP kernels work (Silicon Labs' MVP
documentation, `docs.silabs.com/machine-learning/latest/aiml-fundamentals/mvp-accelerator`, and the Gecko SDK
4.2 kernels):

    accelerator cycles = θ_acc · ACC_FEATURES[regime]    (MAC passes, outputs, a constant, ...)
    CPU cycles         = θ_cpu · CPU_FEATURES[regime]    (programs the CPU loads, output pixels, a constant, ...)
    layer cycles       = max(accelerator, CPU) + overlap · min(accelerator, CPU)

- MAC passes: the MVP takes int8 pairs as one complex value when the innermost (channel) dimension is even, so
  it does two MACs per pass; with an odd channel count it does one. MAC passes = executed MACs / packing.
- θ: non-negative least squares on relative error over the measured layers of each regime; the overlap (in
  [0, 1]) from the measured layer times: the CPU loads every program itself and can queue only one behind the
  running one, so the two only partly overlap.

Operators the MVP does not run (softmax, reshape, ...) or whose tensors exceed its limits stay on the core and are
priced from the core's emulated counts (`edgenas.energy.cycles`).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import re
from typing import Iterable, Sequence

import numpy as np
from scipy import optimize

from edgenas.energy import features as features_lib
from edgenas.energy.errors import EnergyModelError

LAYERS_VERSION = 1
VERSION_LINE = f"#edgenas-mvp-layers version={LAYERS_VERSION}"
GEOMETRY_COLUMNS = ("op", "in_h", "in_w", "in_c", "out_h", "out_w", "out_c", "kernel_h", "kernel_w", "stride_h",
                    "stride_w", "padding")
LAYER_COLUMNS = ("model", "index", "op", "macs", "acc_cycles", "cpu_cycles", "time_us") + GEOMETRY_COLUMNS[1:] + (
    "source",)

_PLATFORMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "platforms")


def default_layers_path() -> str:
  return os.path.join(_PLATFORMS, "efr32mg24_mvp_layers.csv")


@dataclasses.dataclass(frozen=True)
class Geometry:
  op: str
  in_h: int
  in_w: int
  in_c: int
  out_h: int
  out_w: int
  out_c: int
  kernel_h: int = 1
  kernel_w: int = 1
  stride_h: int = 1
  stride_w: int = 1
  padding: str = "same"

  @property
  def outputs(self) -> int:
    return self.out_h * self.out_w * self.out_c

  @property
  def positions(self) -> int:
    return self.out_h * self.out_w

  @property
  def inputs(self) -> int:
    return self.in_h * self.in_w * self.in_c

  @property
  def macs(self) -> float:
    """Executed MACs: the MVP kernels give SAME padding's edges programs of their own that skip the taps
    outside the input."""
    taps = self.kernel_h * self.kernel_w * features_lib.tap_fraction(
        self.op, self.in_h, self.in_w, self.kernel_h, self.kernel_w, self.stride_h, self.stride_w,
        self.padding == "same")
    if self.op == "conv_2d":
      return self.outputs * taps * self.in_c
    if self.op == "depthwise_conv_2d":
      return self.outputs * taps
    if self.op == "fully_connected":
      return float(self.in_h * self.in_w * self.in_c * self.out_c)
    return 0.0

  @property
  def packing(self) -> int:
    """Int8 values per MVP element: two (one complex int8) when the innermost dimension the kernel streams is
    even. Depthwise's per-pixel path streams channels; the other ops stream input channels. An expected
    (fractional or traced) channel count inside the search counts as even: search spaces use even widths."""
    if isinstance(self.in_c, (int, np.integer)):
      return 2 if self.in_c % 2 == 0 else 1
    return 2

  @property
  def padded(self) -> bool:
    return self.padding == "same" and (self.kernel_h > 1 or self.kernel_w > 1)


@dataclasses.dataclass(frozen=True)
class MeasuredLayer:
  """One layer of a device profile: what ran, and the chip's counters for it."""
  model: str
  index: int
  geometry: Geometry
  macs: int  # as the profiler counts them (nominal)
  acc_cycles: int
  cpu_cycles: int
  time_us: float
  source: str

  @property
  def op(self) -> str:
    return self.geometry.op


# --------------------------------------------------------------------------------------------------------------
# Reading MLTK's profile tables.

_SUFFIX = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3, "u": 1e-6}


def _number(text: str) -> float:
  m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kMGmu]?)\s*", text)
  if not m:
    raise ValueError(f"not a profiler number: {text!r}")
  return float(m.group(1)) * _SUFFIX[m.group(2)]


def _nhwc(shape: str) -> tuple[int, int, int]:
  """(h, w, c) of a profiler shape '1xHxWxC' or '1xC' (a vector counts as 1x1xC)."""
  dims = [int(d) for d in shape.split("x")]
  if len(dims) == 4:
    return dims[1], dims[2], dims[3]
  if len(dims) == 2:
    return 1, 1, dims[1]
  if len(dims) == 1:
    return 1, 1, dims[0]
  if len(dims) == 3:
    return 1, dims[1], dims[2]
  raise ValueError(f"unexpected tensor shape {shape!r}")


def parse_device_profile(text: str, model: str, source: str) -> list[MeasuredLayer]:
  """The layers of the first 'Model Layers' table in `text` (MLTK's profiler summary).

  Columns: Index | OpCode | # Ops | # MACs | Acc Cycles | CPU Cycles | Time (s) | Input Shape | Output Shape |
  Options. Counters are printed with k/M suffixes (4 significant digits), times with m/u."""
  layers, header = [], None
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.strip().startswith("|") else None
    if cells is None:
      if header is not None and layers and not line.strip().startswith("+"):
        break
      continue
    if cells[0] == "Index":
      header = cells
      continue
    if header is None or not cells[0].isdigit():
      continue
    row = dict(zip(header, cells))
    inputs = row["Input Shape"].split(",")
    options = row.get("Options", "")
    stride = re.search(r"stride:(\d+)x(\d+)", options)
    padding = re.search(r"[Pp]adding:(\w+)", options)
    op = row["OpCode"]
    in_h, in_w, in_c = _nhwc(inputs[0])
    out_h, out_w, out_c = _nhwc(row["Output Shape"])
    kernel_h = kernel_w = 1
    if op in ("conv_2d", "depthwise_conv_2d") and len(inputs) > 1:
      kdims = [int(d) for d in inputs[1].split("x")]
      kernel_h, kernel_w = kdims[1], kdims[2]
    elif op in ("average_pool_2d", "max_pool_2d"):
      f = re.search(r"filter:(\d+)x(\d+)", options)
      if f:
        kernel_w, kernel_h = int(f.group(1)), int(f.group(2))
    if stride and op in ("average_pool_2d", "max_pool_2d"):
      stride_w, stride_h = int(stride.group(1)), int(stride.group(2))  # MLTK prints pooling as WxH
    elif stride:
      stride_h, stride_w = int(stride.group(1)), int(stride.group(2))
    else:
      stride_h = stride_w = 1
    geom = Geometry(op, in_h, in_w, in_c, out_h, out_w, out_c, kernel_h, kernel_w, stride_h, stride_w,
                    padding.group(1).lower() if padding else "same")
    layers.append(MeasuredLayer(
        model=model, index=int(row["Index"]), geometry=geom, macs=int(round(_number(row["# MACs"]))),
        acc_cycles=int(round(_number(row["Acc Cycles"]))), cpu_cycles=int(round(_number(row["CPU Cycles"]))),
        time_us=round(_number(row["Time (s)"]) * 1e6, 3), source=source))
  if not layers:
    raise EnergyModelError(f"{source}: no 'Model Layers' table found")
  return layers


def write_layers(path: str, layers: Sequence[MeasuredLayer], header: str) -> None:
  """Writes the CSV beside its destination and moves it into place once complete."""
  buf = io.StringIO()
  buf.write(VERSION_LINE + "\n")
  buf.write(f"# {header}\n")
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(LAYER_COLUMNS)
  for layer in layers:
    w.writerow([getattr(layer.geometry if c in GEOMETRY_COLUMNS else layer, c) for c in LAYER_COLUMNS])
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(buf.getvalue())
  os.replace(tmp, path)


def load_layers(path: str | None = None) -> list[MeasuredLayer]:
  """The measured layers; a malformed file is refused naming its line."""
  path = path or default_layers_path()
  try:
    with open(path) as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise EnergyModelError(f"{path}: cannot read the MVP layer measurements ({e.strerror})") from e
  if not lines or lines[0].strip() != VERSION_LINE:
    raise EnergyModelError(f"{path}: line 1 must be {VERSION_LINE!r}")
  body = [l for l in lines[1:] if not l.startswith("#")]
  reader = csv.DictReader(body)
  if tuple(reader.fieldnames or ()) != LAYER_COLUMNS:
    raise EnergyModelError(f"{path}: columns must be {','.join(LAYER_COLUMNS)}")
  layers = []
  for n, row in enumerate(reader, start=len(lines) - len(body) + 2):
    try:
      geom = Geometry(row["op"], *(int(row[c]) for c in GEOMETRY_COLUMNS[1:-1]), row["padding"])
      layer = MeasuredLayer(row["model"], int(row["index"]), geom, int(row["macs"]), int(row["acc_cycles"]),
                            int(row["cpu_cycles"]), float(row["time_us"]), row["source"])
    except (TypeError, ValueError) as e:
      raise EnergyModelError(f"{path}:{n}: malformed row ({e})") from e
    if min(layer.macs, layer.acc_cycles, layer.cpu_cycles, layer.time_us) < 0 or not math.isfinite(layer.time_us):
      raise EnergyModelError(f"{path}:{n}: negative count")
    layers.append(layer)
  return layers


# --------------------------------------------------------------------------------------------------------------
# Geometry, and which layers the MVP runs.

ACCELERATED_OPS = ("conv_2d", "depthwise_conv_2d", "fully_connected", "add", "average_pool_2d", "max_pool_2d")
MAX_DIM, MAX_STRIDE = 1024, 2047  # the MVP's array dimension and stride limits (elements)


def _out_size(n: int, k: int, s: int, padding: str) -> int:
  return -(-n // s) if padding == "same" else (n - k) // s + 1


def geometry(op: str, in_h: int, in_w: int, in_c: int, out_c: int, kernel=1, stride=1,
             padding: str = "same") -> Geometry:
  """Geometry of an operator as the tables describe it (`edgenas.ops.OpSpec` fields; kernel/stride an int or
  an (h, w) pair). Global pooling (window covering the map) is VALID with one output, as the grid builds it."""
  kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
  sh, sw = (stride, stride) if isinstance(stride, int) else stride
  if op in ("fully_connected", "softmax", "reshape"):
    return Geometry(op, 1, 1, in_h * in_w * in_c, 1, 1, out_c if op == "fully_connected" else in_h * in_w * in_c)
  if op in ("average_pool_2d", "max_pool_2d") and kh >= in_h and kw >= in_w:
    return Geometry(op, in_h, in_w, in_c, 1, 1, in_c, in_h, in_w, in_h, in_w, "valid")
  out_c = in_c if op in ("depthwise_conv_2d", "add", "average_pool_2d", "max_pool_2d") else out_c
  if op == "add":
    kh = kw = sh = sw = 1
  return Geometry(op, in_h, in_w, in_c, _out_size(in_h, kh, sh, padding), _out_size(in_w, kw, sw, padding), out_c,
                  kh, kw, sh, sw, padding)


def depthwise_path(g: Geometry) -> str:
  """'pixel' (one MVP program per output pixel, looping over the channels) when the map is small for its
  channels (W·H <= 4·Kh·Kw·C), else 'channel' (the CPU loops over channels, a program per channel and edge
  region). The rule and both limits are Silicon Labs' MVP depthwise kernel's (Gecko SDK 4.2)."""
  return "pixel" if g.in_w * g.in_h <= 4 * g.kernel_h * g.kernel_w * g.in_c else "channel"


def _fits_fc(depth: int, p: int, out_c: int) -> bool:
  if depth <= MAX_DIM * p:
    return out_c <= MAX_DIM
  if depth % p:
    return False
  n = depth // p
  return any(n % d == 0 and n // d <= MAX_DIM for d in range(1, MAX_DIM + 1))


def supported(g: Geometry):
  """Whether Silicon Labs' MVP kernels run this int8 layer on the accelerator (else they fall back to CMSIS-NN
  on the core). The array limits (each dimension <= 1024 elements, strides <= 2047) applied to the layouts
  the kernels generate; summarised from the Gecko SDK 4.2 MVP kernels' support checks.

  A Python bool for concrete channel counts; a JAX boolean when they are traced (the search's expected
  channels), so a cost can switch between the accelerator's and the core's price (`jnp.where`)."""
  p = g.packing
  traced = not all(isinstance(v, (int, np.integer)) for v in (g.in_c, g.out_c))
  if g.op == "conv_2d":
    ok = ((g.out_c <= MAX_DIM) & (g.out_w <= MAX_DIM) & (g.kernel_w * g.in_c / p <= MAX_DIM)
          & (g.kernel_h * g.kernel_w * g.in_c / p <= MAX_STRIDE) & (g.in_w * g.in_c / p <= MAX_STRIDE)
          & (g.stride_w * g.in_c / p <= MAX_STRIDE) & (g.out_w * g.out_c <= MAX_STRIDE))
  elif g.op == "depthwise_conv_2d":
    pixel = (g.in_w * g.in_c / p <= MAX_STRIDE) & (g.kernel_w * g.in_c / p <= MAX_STRIDE)
    channel = ((g.out_w * g.out_c <= MAX_STRIDE) & (g.in_w * g.in_c <= MAX_STRIDE)
               & (g.stride_w * g.in_c <= MAX_STRIDE))
    by_pixel = g.in_w * g.in_h <= 4 * g.kernel_h * g.kernel_w * g.in_c
    ok = (by_pixel & pixel) | (~by_pixel & channel) if traced else (pixel if by_pixel else channel)
  elif g.op == "fully_connected":
    ok = (g.in_c <= MAX_DIM * p) & (g.out_c <= MAX_DIM) if traced else _fits_fc(g.in_c, p, g.out_c)
  elif g.op == "add":
    ok = True
  elif g.op in ("average_pool_2d", "max_pool_2d"):
    ok = ((g.in_w * g.in_c / p <= MAX_STRIDE) & (g.stride_w * g.in_c / p <= MAX_STRIDE)
          & (g.out_w * g.in_c / p <= MAX_STRIDE) & (g.kernel_h * g.kernel_w <= 512))
  else:
    ok = False
  return ok if traced else bool(ok)


# --------------------------------------------------------------------------------------------------------------
# The cycle model.

def regime(g: Geometry) -> str:
  return f"depthwise_conv_2d_{depthwise_path(g)}" if g.op == "depthwise_conv_2d" else g.op


REGIMES = ("conv_2d", "depthwise_conv_2d_pixel", "depthwise_conv_2d_channel", "fully_connected", "add",
           "average_pool_2d", "max_pool_2d")


def _edge_regions(g: Geometry) -> int:
  """Programs a convolution issues for its SAME-padding edges: left/interior/right columns, per interleaved
  row offset (ceil(Kh/Sh))."""
  return (3 if g.padding == "same" and g.kernel_w > 1 else 1) * -(-g.kernel_h // g.stride_h)


# Per regime: (names, function of the geometry) for the accelerator's and the CPU's cycles.
ACC_FEATURES = {
    "conv_2d": ("mac_passes", "outputs", "one"),
    "depthwise_conv_2d_pixel": ("mac_passes", "outputs", "one"),
    "depthwise_conv_2d_channel": ("macs", "outputs", "one"),
    "fully_connected": ("mac_passes", "outputs", "one"),
    "add": ("element_passes", "one"),
    "average_pool_2d": ("input_passes", "outputs", "one"),
    "max_pool_2d": ("input_passes", "outputs", "one"),
}
CPU_FEATURES = {
    "conv_2d": ("edge_programs", "one"),
    "depthwise_conv_2d_pixel": ("positions", "one"),
    "depthwise_conv_2d_channel": ("channel_programs", "outputs", "one"),
    "fully_connected": ("one",),
    "add": ("one",),
    "average_pool_2d": ("positions", "one"),
    "max_pool_2d": ("channel_pairs", "one"),
}


def _feature(name: str, g: Geometry) -> float:
  p = g.packing
  if name == "one":
    return 1.0
  if name == "macs":
    return float(g.macs)
  if name == "mac_passes":
    return g.macs / p
  if name == "outputs":
    return float(g.outputs)
  if name == "positions":
    return float(g.positions)
  if name == "element_passes":
    return g.outputs / p
  if name == "input_passes":
    return g.inputs / p
  if name == "edge_programs":
    return float(_edge_regions(g))
  if name == "channel_programs":
    return float(g.in_c * _edge_regions(g))
  if name == "channel_pairs":
    return float(-(-g.in_c // p))
  raise KeyError(name)


def features(g: Geometry, which: str) -> list[float]:
  names = (ACC_FEATURES if which == "acc" else CPU_FEATURES)[regime(g)]
  return [_feature(n, g) for n in names]


@dataclasses.dataclass(frozen=True)
class MvpModel:
  """Per regime: non-negative coefficients over ACC_FEATURES / CPU_FEATURES, and the overlap fraction γ."""
  acc: dict
  cpu: dict
  overlap: dict

  def parts(self, g: Geometry) -> tuple[float, float]:
    r = regime(g)
    acc = sum(c * f for c, f in zip(self.acc[r], features(g, "acc")))
    cpu = sum(c * f for c, f in zip(self.cpu[r], features(g, "cpu")))
    return acc, cpu

  def cycles(self, g: Geometry) -> float:
    """Layer cycles: the longer of the MVP's and the CPU's work plus the fraction γ of the shorter that does
    not overlap (the CPU loads each program itself and can queue only one behind the running one)."""
    acc, cpu = self.parts(g)
    return max(acc, cpu) + self.overlap[regime(g)] * min(acc, cpu)

  def to_dict(self) -> dict:
    return {r: dict(acc=dict(zip(ACC_FEATURES[r], self.acc[r])), cpu=dict(zip(CPU_FEATURES[r], self.cpu[r])),
                    overlap=self.overlap[r]) for r in REGIMES if r in self.acc}


def from_dict(section: dict, where: str) -> MvpModel:
  acc, cpu, overlap = {}, {}, {}
  for r in REGIMES:
    entry = section.get(r)
    if not isinstance(entry, dict):
      raise EnergyModelError(f"{where}: regime {r!r} is missing")
    try:
      acc[r] = [float(entry["acc"][n]) for n in ACC_FEATURES[r]]
      cpu[r] = [float(entry["cpu"][n]) for n in CPU_FEATURES[r]]
      overlap[r] = float(entry["overlap"])
    except (KeyError, TypeError, ValueError) as e:
      raise EnergyModelError(f"{where}: regime {r!r}: missing or non-numeric coefficient ({e})") from None
    values = acc[r] + cpu[r] + [overlap[r]]
    if not all(math.isfinite(v) and v >= 0 for v in values) or overlap[r] > 1:
      raise EnergyModelError(f"{where}: regime {r!r}: coefficients must be finite and >= 0, overlap in [0, 1]")
  return MvpModel(acc, cpu, overlap)


def _nnls_relative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Non-negative θ minimising Σ ((x θ − y) / y)²."""
  w = 1.0 / np.maximum(y, 1.0)
  theta, _ = optimize.nnls(x * w[:, None], y * w)
  return theta


# Layers whose time is below this many cycles are left out of the overlap fit: the profiler's times are
# printed in steps of 30 µs (2,340 cycles at 78 MHz).
MIN_TIMED_CYCLES = 20_000


def unique_layers(layers: Iterable[MeasuredLayer]) -> list[MeasuredLayer]:
  """One row per distinct (model, geometry): a model's repeated blocks would otherwise weigh several times."""
  seen, out = set(), []
  for l in layers:
    key = (l.model, l.geometry)
    if key not in seen:
      seen.add(key)
      out.append(l)
  return out


def fit(layers: Sequence[MeasuredLayer], clock_mhz: float) -> MvpModel:
  """Coefficients per regime from the measured layers the MVP ran (accelerator cycles > 0)."""
  acc, cpu, overlap = {}, {}, {}
  by_regime: dict[str, list[MeasuredLayer]] = {}
  for l in unique_layers(layers):
    if l.op in ACCELERATED_OPS and l.acc_cycles > 0:
      by_regime.setdefault(regime(l.geometry), []).append(l)
  for r in REGIMES:
    rows = by_regime.get(r, [])
    if len(rows) < 2:
      raise EnergyModelError(f"MVP fit: regime {r!r} has {len(rows)} measured layers; at least 2 are needed")
    geoms = [l.geometry for l in rows]
    acc[r] = list(_nnls_relative(np.array([features(g, "acc") for g in geoms]),
                                 np.array([l.acc_cycles for l in rows], float)))
    cpu[r] = list(_nnls_relative(np.array([features(g, "cpu") for g in geoms]),
                                 np.array([l.cpu_cycles for l in rows], float)))
    # γ from the measured times: time − max(acc, cpu) = γ · min(acc, cpu), least squares, clipped to [0, 1].
    a = np.array([l.acc_cycles for l in rows], float)
    c = np.array([l.cpu_cycles for l in rows], float)
    t = np.array([l.time_us * clock_mhz for l in rows], float)
    keep = t >= MIN_TIMED_CYCLES
    lo, hi = np.minimum(a, c)[keep], np.maximum(a, c)[keep]
    g_ = float(np.sum(lo * (t[keep] - hi)) / np.sum(lo * lo)) if keep.any() and np.sum(lo * lo) > 0 else 0.0
    overlap[r] = float(min(max(g_, 0.0), 1.0))
  return MvpModel(acc, cpu, overlap)


def of_graph_op(o) -> Geometry:
  """Geometry of an `edgenas.energy.tflite_graph.GraphOp` (exact kernel, stride and padding from the file)."""
  s = o.spec
  return geometry(s.op, s.in_h, s.in_w, s.in_c, s.out_c, (o.kernel_h, o.kernel_w), (o.stride_h, o.stride_w),
                  o.padding)


def fit_report(model: MvpModel, layers: Sequence[MeasuredLayer], clock_mhz: float,
               held_out: Sequence[str]) -> dict:
  """How well the model reproduces the measurements: per regime the mean absolute % error of the accelerator
  and CPU cycles and of the layer time (layers timed >= MIN_TIMED_CYCLES), over the fitted layers; per held-out
  model, its accelerated layers' summed time predicted vs measured."""
  per_regime = {}
  fitted = [l for l in unique_layers(layers) if l.model not in held_out and l.op in ACCELERATED_OPS
            and l.acc_cycles > 0]
  for r in REGIMES:
    rows = [l for l in fitted if regime(l.geometry) == r]
    parts = [model.parts(l.geometry) for l in rows]
    timed = [(model.cycles(l.geometry), l.time_us * clock_mhz) for l in rows
             if l.time_us * clock_mhz >= MIN_TIMED_CYCLES]
    per_regime[r] = dict(
        layers=len(rows),
        acc_mape_pct=round(float(np.mean([abs(a / l.acc_cycles - 1) for (a, _), l in zip(parts, rows)])) * 100, 1),
        cpu_mape_pct=round(float(np.mean([abs(c / l.cpu_cycles - 1) for (_, c), l in zip(parts, rows)
                                          if l.cpu_cycles > 0])) * 100, 1),
        timed_layers=len(timed),
        time_mape_pct=round(float(np.mean([abs(p / t - 1) for p, t in timed])) * 100, 1) if timed else None)
  held = {}
  for name in held_out:
    rows = [l for l in layers if l.model == name and l.op in ACCELERATED_OPS and l.acc_cycles > 0]
    if rows:
      predicted = sum(model.cycles(l.geometry) for l in rows) / clock_mhz / 1e3
      measured = sum(l.time_us for l in rows) / 1e3
      held[name] = dict(layers=len(rows), predicted_ms=round(predicted, 3), measured_ms=round(measured, 3),
                        error_pct=round(100 * (predicted / measured - 1), 2))
  return dict(per_regime=per_regime, held_out_models=held,
              fitted_layers=len(fitted), fitted_models=sorted({l.model for l in fitted}))
