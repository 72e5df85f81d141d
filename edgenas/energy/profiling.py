"""Building lookup tables: single-operator int8 models over a grid, timed on the host or on a board.

- `default_grid()` lists the operator configurations a table covers (kept modest so profiling takes minutes).
- `single_op_model(spec)` builds a one-operator Keras model and converts it to full-integer int8 TFLite.
- `time_on_host(...)` runs such a model in the TFLite Micro interpreter (reference kernels) and times it.
- `board_benchmark_sources(...)` writes a TFLM program that times each model with the DWT cycle counter and
  prints one `EDGENAS_LUT` line per model over serial; `parse_serial_log(...)` turns that log into LUT rows.

TensorFlow and tflite-micro are imported inside the functions that need them: this module is importable (and
the serial-log parser usable) without them.
"""
from __future__ import annotations

import itertools
import random
import time
from typing import Sequence

import numpy as np

from edgenas import ops as ops_lib
from edgenas.energy import lut as lut_lib
from edgenas.energy import tflite_graph
from edgenas.energy.errors import EnergyModelError

SERIAL_PREFIX = "EDGENAS_LUT"
SERIAL_CLOCK = "EDGENAS_CLOCK_HZ"
# Fields after the prefix on one serial line, in order.
SERIAL_FIELDS = ("op", "in_h", "in_w", "in_c", "out_c", "kernel", "stride", "groups", "cycles_mean",
                 "cycles_std", "count")


def default_grid(seed: int = 0) -> list[ops_lib.OpSpec]:
  """Operator configurations spanning the digits- and CIFAR-sized search spaces and the MLPerf Tiny models.

  Dense products are sampled (fixed seed) so the table stays small; sizes are chosen so that 1x1 expansions of
  the search spaces (up to 384 channels on small maps) are inside the table's range.
  """
  rng = random.Random(seed)
  grid = []
  convs = [(h, c_in, c_out, k, s) for h in (4, 8, 16, 32) for c_in in (1, 3, 8, 16, 32, 64)
           for c_out in (8, 16, 32, 64) for k in (1, 3, 5) for s in (1, 2)]
  convs = [c for c in convs if c[0] * c[0] * c[1] * c[2] * c[3] * c[3] / c[4] ** 2 <= 8e6]
  grid += [ops_lib.OpSpec(ops_lib.CONV_2D, h, h, ci, co, k, s) for h, ci, co, k, s in rng.sample(convs, 56)]
  # 1x1 expand/project convs of MBConv blocks: wide channels on small maps.
  pointwise = [(h, ci, co) for h in (4, 8, 16) for ci in (16, 48, 96, 192, 384) for co in (16, 32, 64, 96, 192)]
  pointwise = [p for p in pointwise if p[0] * p[0] * p[1] * p[2] <= 8e6]
  grid += [ops_lib.OpSpec(ops_lib.CONV_2D, h, h, ci, co, 1, 1) for h, ci, co in rng.sample(pointwise, 20)]
  dws = [(h, c, k, s) for h in (4, 8, 16, 32) for c in (8, 16, 32, 64, 96, 192, 384) for k in (3, 5, 7)
         for s in (1, 2)]
  dws = [d for d in dws if d[0] * d[0] * d[1] <= 200_000]
  grid += [ops_lib.OpSpec(ops_lib.DEPTHWISE_CONV_2D, h, h, c, c, k, s) for h, c, k, s in rng.sample(dws, 44)]
  grid += [ops_lib.OpSpec(ops_lib.FULLY_CONNECTED, 1, 1, ci, co) for ci, co in
           itertools.product((16, 64, 256, 1024), (10, 32, 128))]
  grid += [ops_lib.OpSpec(ops_lib.ADD, h, h, c, c) for h, c in
           itertools.product((4, 8, 16, 32), (8, 16, 32, 64)) if h * h * c <= 32768]
  for op in (ops_lib.AVERAGE_POOL_2D, ops_lib.MAX_POOL_2D):
    grid += [ops_lib.OpSpec(op, h, h, c, c, h, h) for h, c in ((2, 64), (4, 32), (4, 128), (8, 64), (8, 256))]
    grid += [ops_lib.OpSpec(op, h, h, c, c, 2, 2) for h, c in ((8, 16), (16, 32), (32, 16))]
    grid += [ops_lib.OpSpec(op, h, h, c, c, 3, 1) for h, c in ((8, 32), (16, 16))]
  grid += [ops_lib.OpSpec(ops_lib.RESHAPE, h, h, c, h * h * c) for h, c in ((1, 64), (1, 256), (4, 32), (8, 64))]
  grid += [ops_lib.OpSpec(ops_lib.SOFTMAX, 1, 1, c, c) for c in (10, 32, 100, 256, 1000)]
  return grid


def emulated_grid(seed: int = 0) -> list[ops_lib.OpSpec]:
  """`default_grid` plus the wide layers of MobileNet-sized networks (up to 1280 output channels), for tables
  counted on an emulated target, where a row costs instructions, not minutes of host timing."""
  rng = random.Random(seed + 1)
  wide = [(h, ci, co) for h in (1, 2, 4, 8) for ci in (192, 320, 576, 960) for co in (256, 384, 576, 1280)]
  wide = [w for w in wide if w[0] * w[0] * w[1] * w[2] <= 8e6]
  grid = default_grid(seed)
  grid += [ops_lib.OpSpec(ops_lib.CONV_2D, h, h, ci, co, 1, 1) for h, ci, co in rng.sample(wide, 16)]
  grid += [ops_lib.OpSpec(ops_lib.CONV_2D, h, h, ci, co, 3, s) for h, ci, co, s in
           ((8, 64, 128, 1), (8, 96, 256, 2), (4, 128, 256, 1), (16, 32, 128, 2))]
  grid += [ops_lib.OpSpec(ops_lib.DEPTHWISE_CONV_2D, h, h, c, c, k, 1) for h, c, k in
           ((4, 576, 3), (2, 960, 3), (4, 960, 5), (8, 576, 7))]
  grid += [ops_lib.OpSpec(ops_lib.FULLY_CONNECTED, 1, 1, ci, co) for ci, co in ((1280, 10), (1280, 100), (576, 12))]
  return grid


def profile_emulated(grid: Sequence[ops_lib.OpSpec], targets: Sequence[str], build_dir: str,
                     log=print) -> dict[str, list]:
  """{target: count rows}: every configuration of `grid` counted on each emulated core (edgenas.device.profile):
  per row, the instructions its kernel executed, its data accesses by memory region and the arena TFLM used.
  The models are converted once for all targets."""
  from edgenas.device import profile as device_profile
  from edgenas.device import targets as targets_lib
  from edgenas.energy import counts as counts_lib

  defs = [targets_lib.get_target(t) for t in targets]
  for d in defs:
    targets_lib.check_toolchain(d)  # before minutes of conversion
  models = []
  for i, spec in enumerate(grid):
    models.append(single_op_model(spec))
    if (i + 1) % 40 == 0 or i + 1 == len(grid):
      log(f"converted {i + 1}/{len(grid)} single-operator models")
  out = {}
  for d in defs:
    results = device_profile.count_models(models, d, build_dir, log=log)
    source = f"emulated: {d.description}; QEMU counts of the kernel's Invoke (edgenas.device.profile)"
    out[d.name] = [counts_lib.CountRow(spec.op, spec.in_h, spec.in_w, spec.in_c, spec.out_c, spec.kernel,
                                       spec.stride, lut_lib.groups_of(spec.op, spec.in_c), source=source, **r)
                   for spec, r in zip(grid, results)]
  return out


def single_op_model(spec: ops_lib.OpSpec, calibration_samples: int = 8, seed: int = 0) -> bytes:
  """A full-integer int8 .tflite that runs exactly `spec` (int8 input and output, no QUANTIZE ops)."""
  import tensorflow as tf  # lazily: only profiling needs TensorFlow

  h, w, c = spec.in_h, spec.in_w, spec.in_c
  layers = tf.keras.layers
  if spec.op in (ops_lib.FULLY_CONNECTED, ops_lib.SOFTMAX):
    shapes = [(h * w * c,)]
  elif spec.op == ops_lib.ADD:
    shapes = [(h, w, c), (h, w, c)]
  else:
    shapes = [(h, w, c)]
  inputs = [tf.keras.Input(shape=s, batch_size=1) for s in shapes]
  if spec.op == ops_lib.CONV_2D:
    out = layers.Conv2D(spec.out_c, spec.kernel, strides=spec.stride, padding="same")(inputs[0])
  elif spec.op == ops_lib.DEPTHWISE_CONV_2D:
    out = layers.DepthwiseConv2D(spec.kernel, strides=spec.stride, padding="same")(inputs[0])
  elif spec.op == ops_lib.FULLY_CONNECTED:
    out = layers.Dense(spec.out_c)(inputs[0])
  elif spec.op == ops_lib.ADD:
    out = layers.Add()(inputs)
  elif spec.op in (ops_lib.AVERAGE_POOL_2D, ops_lib.MAX_POOL_2D):
    pool = layers.AveragePooling2D if spec.op == ops_lib.AVERAGE_POOL_2D else layers.MaxPooling2D
    if spec.kernel >= h and spec.kernel >= w:
      out = pool(pool_size=(h, w), padding="valid")(inputs[0])
    else:
      out = pool(pool_size=spec.kernel, strides=spec.stride, padding="same")(inputs[0])
  elif spec.op == ops_lib.RESHAPE:
    out = layers.Reshape((h * w * c,))(inputs[0])
  elif spec.op == ops_lib.SOFTMAX:
    out = layers.Softmax()(inputs[0])
  else:
    raise EnergyModelError(f"single_op_model: no builder for operator {spec.op!r}")
  model = tf.keras.Model(inputs, out)

  def representative():
    rng = np.random.default_rng(seed)
    for _ in range(calibration_samples):
      yield [rng.uniform(-1, 1, (1,) + s).astype(np.float32) for s in shapes]

  converter = tf.lite.TFLiteConverter.from_keras_model(model)
  converter.optimizations = [tf.lite.Optimize.DEFAULT]
  converter.representative_dataset = representative
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  converter.inference_input_type = tf.int8
  converter.inference_output_type = tf.int8
  flatbuffer = converter.convert()
  _check_single_op(flatbuffer, spec)
  return flatbuffer


def _check_single_op(flatbuffer: bytes, spec: ops_lib.OpSpec) -> None:
  names = tflite_graph.operator_names(flatbuffer)
  if names != [spec.op]:
    raise EnergyModelError(f"single_op_model({spec}): the converter produced operators {names}, not [{spec.op!r}]")


def time_on_host(flatbuffer: bytes, min_seconds: float = 0.1, max_count: int = 300, min_count: int = 10,
                 seed: int = 0) -> np.ndarray:
  """Milliseconds of each timed invoke of the model in the TFLite Micro interpreter, on random int8 inputs."""
  from tflite_micro.python.tflite_micro import runtime  # lazily: the tflite-micro wheel is optional

  interpreter = runtime.Interpreter.from_bytes(flatbuffer, arena_size=host_arena_bytes(flatbuffer))
  rng = np.random.default_rng(seed)
  for index in range(len(tflite_graph.parse_tflite(flatbuffer).inputs)):
    detail = interpreter.get_input_details(index)
    interpreter.set_input(rng.integers(-128, 128, size=detail["shape"], dtype=np.int8), index)
  interpreter.invoke()  # warm-up: first-touch of the arena
  times = []
  start = time.perf_counter()
  while len(times) < max_count and (len(times) < min_count or time.perf_counter() - start < min_seconds):
    t0 = time.perf_counter()
    interpreter.invoke()
    times.append(time.perf_counter() - t0)
  return np.asarray(times) * 1e3


def fastest_fraction(times_ms: np.ndarray, keep_fraction: float = 0.2) -> tuple[float, float, int]:
  """(mean, std, count) of the fastest `keep_fraction` of the invokes.

  On a shared machine other work only ever adds time, so the fastest invokes are the operator's own cost.
  """
  kept = np.sort(times_ms)[:max(1, int(round(len(times_ms) * keep_fraction)))]
  return float(kept.mean()), float(kept.std()), len(times_ms)


def host_arena_bytes(flatbuffer: bytes) -> int:
  """An arena that surely fits: all activations at once (no reuse), plus room for TFLM's own structures
  (the runtime's default of 10x the model size is too small for models with large activations)."""
  graph = tflite_graph.parse_tflite(flatbuffer)
  activations = sum(t.nbytes for t in graph.tensors if not t.constant)
  return 2 * activations + 10 * len(flatbuffer) + 64 * 1024


def host_harness_overhead_ms() -> float:
  """Time of invoking a model that does (almost) nothing: the Python/interpreter cost per invoke, which a
  one-operator model pays once and a real network pays once per inference, not per operator."""
  tiny = single_op_model(ops_lib.OpSpec(ops_lib.RESHAPE, 1, 1, 1, 1))
  return fastest_fraction(time_on_host(tiny, min_seconds=0.3))[0]


def profile_host(grid: Sequence[ops_lib.OpSpec], power_mw: float, source: str, passes: int = 3,
                 log=print) -> list[lut_lib.LutRow]:
  """Measures every configuration of `grid` on this machine; energy = latency x `power_mw` (an estimate).

  The grid is timed `passes` times, one pass after another, so each row is sampled at several moments, and a
  row's figure is the mean of its fastest 20% of invokes over all passes (see `fastest_fraction`).
  """
  models = []
  for i, spec in enumerate(grid):
    models.append(single_op_model(spec))
    if (i + 1) % 20 == 0:
      log(f"converted {i + 1}/{len(grid)} models")
  overhead = host_harness_overhead_ms()
  log(f"harness overhead per invoke: {overhead * 1e3:.2f} us (subtracted from every row)")
  times = [[] for _ in grid]
  for p in range(passes):
    for i, model in enumerate(models):
      times[i].append(time_on_host(model))
    log(f"pass {p + 1}/{passes} done")
  rows = []
  for spec, row_times in zip(grid, times):
    mean, std, count = fastest_fraction(np.concatenate(row_times))
    latency = max(mean - overhead, 0.0)
    rows.append(lut_lib.LutRow(spec.op, spec.in_h, spec.in_w, spec.in_c, spec.out_c, spec.kernel, spec.stride,
                               lut_lib.groups_of(spec.op, spec.in_c), latency, std, count,
                               latency * power_mw, source))
  return rows


# ----------------------------------------------------------------------------------------------------------
# Boards: a TFLM benchmark program and the parser of its serial log.


def parse_serial_log(text: str, power_mw: float, source: str, log_name: str = "<serial log>",
                     clock_hz: float | None = None) -> list[lut_lib.LutRow]:
  """LUT rows from a board's serial output (lines written by the program of `board_benchmark_sources`).

  Cycles become milliseconds with the clock the program printed (`EDGENAS_CLOCK_HZ,<hz>`) or `clock_hz`;
  energy = latency x `power_mw`. Other lines (boot messages, noise) are ignored; a malformed EDGENAS line is an
  error naming its line number.
  """
  rows = []
  for number, line in enumerate(text.splitlines(), start=1):
    line = line.strip()
    if line.startswith(SERIAL_CLOCK + ","):
      try:
        clock_hz = float(line.split(",")[1])
      except (IndexError, ValueError):
        raise EnergyModelError(f"{log_name}: line {number}: expected '{SERIAL_CLOCK},<hz>', got {line!r}") from None
      continue
    if not line.startswith(SERIAL_PREFIX + ","):
      continue
    parts = line.split(",")[1:]
    if len(parts) != len(SERIAL_FIELDS):
      raise EnergyModelError(f"{log_name}: line {number}: expected {len(SERIAL_FIELDS)} fields "
                             f"({','.join(SERIAL_FIELDS)}) after '{SERIAL_PREFIX}', got {len(parts)}")
    fields = dict(zip(SERIAL_FIELDS, parts))
    if not clock_hz:
      raise EnergyModelError(f"{log_name}: line {number}: no '{SERIAL_CLOCK}' line before the first result "
                             f"and no clock given")
    try:
      geometry = [int(fields[k]) for k in SERIAL_FIELDS[1:8]]
      cycles_mean, cycles_std = float(fields["cycles_mean"]), float(fields["cycles_std"])
      count = int(fields["count"])
    except ValueError:
      raise EnergyModelError(f"{log_name}: line {number}: non-numeric field in {line!r}") from None
    ms = 1e3 / clock_hz
    raw = {k: str(v) for k, v in zip(lut_lib.INT_COLUMNS, geometry)}
    raw.update(op=fields["op"], latency_ms_mean=repr(cycles_mean * ms), latency_ms_std=repr(cycles_std * ms),
               count=str(count), energy_uj=repr(cycles_mean * ms * power_mw), source=source)
    rows.append(lut_lib.parse_row(raw, f"{log_name}: line {number}"))
  if not rows:
    raise EnergyModelError(f"{log_name}: no '{SERIAL_PREFIX}' lines found")
  return rows


# Registers every operator type a lookup-table row can hold (shared by the board and the emulator programs).
LUT_RESOLVER_CC = """  resolver.AddConv2D();
  resolver.AddDepthwiseConv2D();
  resolver.AddFullyConnected();
  resolver.AddAdd();
  resolver.AddAveragePool2D();
  resolver.AddMaxPool2D();
  resolver.AddReshape();
  resolver.AddSoftmax();
"""

_MAIN_CC = r"""// Generated by `python -m launch.profile --backend=board`: times every model in models.h with the DWT cycle
// counter and prints one line per model over serial:
//   EDGENAS_LUT,op,in_h,in_w,in_c,out_c,kernel,stride,groups,cycles_mean,cycles_std,count
// Build it in your TFLite Micro project (it needs a DebugLog/serial port and SystemCoreClock), run it, save the
// serial output and convert it with `python -m launch.profile --backend=parse_log --log=FILE`.
#include <cmath>
#include <cstdint>
#include <cstdio>

#include "models.h"
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_log.h"
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"

extern uint32_t SystemCoreClock;

namespace {
constexpr int kRepeats = %(repeats)d;
constexpr int kArenaSize = %(arena_bytes)d;
alignas(16) uint8_t g_arena[kArenaSize];

volatile uint32_t* const kDwtCtrl = reinterpret_cast<uint32_t*>(0xE0001000);
volatile uint32_t* const kDwtCyccnt = reinterpret_cast<uint32_t*>(0xE0001004);
volatile uint32_t* const kDemcr = reinterpret_cast<uint32_t*>(0xE000EDFC);

void EnableCycleCounter() {
  *kDemcr |= 0x01000000;  // TRCENA: enable the DWT unit
  *kDwtCyccnt = 0;
  *kDwtCtrl |= 1;  // CYCCNTENA
}
}  // namespace

int main() {
  EnableCycleCounter();
  tflite::MicroMutableOpResolver<8> resolver;
""" + LUT_RESOLVER_CC + r"""  // MicroPrintf implements a small printf subset: plain %%d/%%u/%%s, no length modifiers.
  MicroPrintf("EDGENAS_CLOCK_HZ,%%u", static_cast<unsigned>(SystemCoreClock));
  for (int m = 0; m < kNumModels; ++m) {
    const ModelEntry& e = kModels[m];
    tflite::MicroInterpreter interpreter(tflite::GetModel(e.data), resolver, g_arena, kArenaSize);
    if (interpreter.AllocateTensors() != kTfLiteOk) {
      MicroPrintf("EDGENAS_ERROR,%%d,allocate", m);
      continue;
    }
    for (size_t i = 0; i < interpreter.inputs_size(); ++i) {
      TfLiteTensor* in = interpreter.input(i);
      for (size_t b = 0; b < in->bytes; ++b) in->data.int8[b] = static_cast<int8_t>((b * 37 + i) & 0x7f);
    }
    interpreter.Invoke();  // warm-up
    double sum = 0, sum_sq = 0;
    for (int r = 0; r < kRepeats; ++r) {
      uint32_t start = *kDwtCyccnt;
      interpreter.Invoke();
      double cycles = static_cast<double>(*kDwtCyccnt - start);
      sum += cycles;
      sum_sq += cycles * cycles;
    }
    double mean = sum / kRepeats;
    double var = sum_sq / kRepeats - mean * mean;
    MicroPrintf("EDGENAS_LUT,%%s,%%d,%%d,%%d,%%d,%%d,%%d,%%d,%%u,%%u,%%d", e.op, e.in_h, e.in_w, e.in_c, e.out_c,
                e.kernel, e.stride, e.groups, static_cast<unsigned>(mean),
                static_cast<unsigned>(std::sqrt(var > 0 ? var : 0)), kRepeats);
  }
  MicroPrintf("EDGENAS_DONE");
  return 0;
}
"""


def board_benchmark_sources(models: Sequence[tuple[ops_lib.OpSpec, bytes]], repeats: int = 20,
                            arena_bytes: int = 160 * 1024) -> dict[str, str]:
  """{'main.cc': ..., 'models.h': ...}: a TFLM benchmark program for a board, with the models as C arrays.

  The per-invoke cycle count includes TFLM's per-invoke bookkeeping, as the host harness does; subtract an
  empty-model measurement if you need the pure operator cost.
  """
  header = ["// Generated by edgenas.energy.profiling: one int8 single-operator model per LUT row.",
            "#pragma once", "#include <cstdint>", "",
            "struct ModelEntry { const unsigned char* data; const char* op; int in_h, in_w, in_c, out_c, kernel, "
            "stride, groups; };", ""]
  entries = []
  for i, (spec, flatbuffer) in enumerate(models):
    body = ",".join(str(b) for b in flatbuffer)
    header.append(f"alignas(16) const unsigned char g_model_{i}[{len(flatbuffer)}] = {{{body}}};")
    entries.append(f"  {{g_model_{i}, \"{spec.op}\", {spec.in_h}, {spec.in_w}, {spec.in_c}, {spec.out_c}, "
                   f"{spec.kernel}, {spec.stride}, {lut_lib.groups_of(spec.op, spec.in_c)}}},")
  header += ["", f"constexpr int kNumModels = {len(entries)};", "const ModelEntry kModels[] = {"] + entries + ["};"]
  return {"main.cc": _MAIN_CC % dict(repeats=repeats, arena_bytes=arena_bytes), "models.h": "\n".join(header) + "\n"}
