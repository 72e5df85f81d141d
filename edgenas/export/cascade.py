"""A deployment plan as one device program: stage 1 on every frame, stage 2 only when stage 1 fires.

    python -m launch.export --plan=PLAN_DIR [--targets=cortex-m4]   # -> PLAN_DIR/cascade/

`launch.plan` recommends a single network or a two-stage cascade with int8 thresholds (plan.json["deployment"]).
`export_plan` turns that into the C++ program a board runs:
  - `model_data.cc/.h`: every stage's flatbuffer, its arena, input/output quantisation and threshold, and a set
    of test frames as float features (what the front-end hands the models), with the outputs the host's TFLite
    Micro interpreter computed for each stage on each frame and the decisions the plan's logic takes on them;
  - `model_ops.h`: one resolver holding the operators of every stage, each once;
  - `main.cc`: per frame, quantise the features for stage 1, run it, compare its positive-class output byte with
    its threshold; only when it fires, quantise for stage 2 and run it. Every stage output that runs is checked
    byte for byte against the host's, and so is which stages ran and the detection;
  - `Makefile.cortex_m`, `Makefile.riscv32`: the same build files as a single-model export.

On each emulated target (`run_plan_target`) the program runs under QEMU with the instruction-count plugin, which
logs a marker around each stage's Invoke: instructions per stage and per frame on the target's instruction set.

Quantisation is the same on both sides: q = clamp(round_half_even(x / scale) + zero_point) in float32, numpy's
`np.round` on the host (as the planner quantises) and `rintf` (round to nearest even) on the device.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from edgenas import rundir
from edgenas.console import say
from edgenas.export import csource
from edgenas.export import errors

CASCADE_DIR = "cascade"
REPORT_FILE = "report.json"
REPORT_VERSION = 1
DEFAULT_FRAMES = 24
SCAN_CHUNK = 256  # test clips run through stage 1 at a time while choosing frames


class CascadeSpec:
  """The stages of a plan's deployment: flatbuffers, thresholds and the positive class."""

  def __init__(self, plan_path: str, option: Optional[str] = None):
    self.plan_dir = os.path.dirname(plan_path)
    plan = _read_plan(plan_path)
    deployment = plan["deployment"]
    self.platform = plan.get("platform")
    self.positive_index = int(deployment["positive_index"])
    self.positive_label = deployment.get("positive_label", str(self.positive_index))
    self.data_config = deployment.get("data_config")
    chosen = option or plan.get("recommended")
    self.option = next((o for o in plan.get("options", []) if o.get("name") == chosen), None)
    if option is None:  # the recommended deployment
      self.kind, stages = deployment.get("kind"), deployment.get("stages") or []
      self.operating_point = deployment.get("operating_point")
    else:  # another option the plan lists
      if self.option is None or not self.option.get("thresholds_q"):
        names = [o.get("name") for o in plan.get("options", []) if o.get("thresholds_q")]
        raise errors.ExportError(f"{plan_path}: no option {option!r}; options: {', '.join(map(str, names))}")
      networks = {n.get("name"): n for n in plan.get("networks", [])}
      stages = [dict(name=n, tflite=networks.get(n, {}).get("tflite", ""), sha256=networks.get(n, {}).get("sha256"),
                     threshold_q=int(t)) for n, t in zip(self.option["stages"], self.option["thresholds_q"])]
      self.kind, self.operating_point = self.option.get("kind"), self.option.get("operating_point")
    self.name = chosen
    self.names, self.flatbuffers, self.thresholds_q = [], [], []
    if not 1 <= len(stages) <= 2:
      raise errors.ExportError(f"{plan_path}: deployment has {len(stages)} stages; a device program runs 1 or 2")
    for i, stage in enumerate(stages):
      path = stage.get("tflite", "")
      if not os.path.isfile(path):
        raise errors.ExportError(f"{plan_path}: stage {i + 1} ({stage.get('name')}): {path or 'no tflite'} is "
                                 "missing; plan again with the networks where they are now")
      with open(path, "rb") as f:
        flatbuffer = f.read()
      want = stage.get("sha256")
      if want and hashlib.sha256(flatbuffer).hexdigest() != want:
        raise errors.ExportError(f"{plan_path}: stage {i + 1} ({stage.get('name')}): {path} changed since it was "
                                 "planned (sha256 differs); its threshold no longer holds: plan again")
      threshold = stage.get("threshold_q")
      if not isinstance(threshold, int) or not -128 <= threshold <= 128:
        raise errors.ExportError(f"{plan_path}: stage {i + 1}: threshold_q {threshold!r} is not an int8 level "
                                 "(-128 ... 128)")
      self.names.append(str(stage.get("name", f"stage{i + 1}")))
      self.flatbuffers.append(flatbuffer)
      self.thresholds_q.append(threshold)
    if not isinstance(self.data_config, dict) or "dataset" not in self.data_config:
      raise errors.ExportError(f"{plan_path}: deployment.data_config is missing; plan again (launch.plan)")


def _read_plan(path: str) -> dict:
  if not os.path.isfile(path):
    raise errors.ExportError(f"--plan: {path} not found (launch.plan writes plan.json in its --out_dir)")
  try:
    plan = rundir.read_json(path)
  except ValueError as e:
    raise errors.ExportError(f"{path}: not valid JSON ({e})") from None
  deployment = plan.get("deployment") if isinstance(plan, dict) else None
  if not isinstance(deployment, dict) or "positive_index" not in deployment or "stages" not in deployment:
    raise errors.ExportError(f"{path}: no deployment section with stages and positive_index; plan again "
                             "(launch.plan)")
  return plan


def plan_path(path: str) -> str:
  """plan.json itself, or the planner's output directory holding it."""
  return os.path.join(path, "plan.json") if os.path.isdir(path) else path


# --------------------------------------------------------------------------------------------------------------
# The host's reference: what the program must compute, frame by frame


class HostCascade:
  """The stages in the host's TFLite Micro interpreter, with the plan's decision logic."""

  def __init__(self, spec: CascadeSpec):
    from edgenas.export import verify
    self.spec = spec
    self.runners = [verify.TflmRunner(fb) for fb in spec.flatbuffers]
    shapes = {tuple(int(d) for d in r.input["shape"][1:]) for r in self.runners}
    classes = {int(np.prod(r.output["shape"])) for r in self.runners}
    if len(shapes) != 1 or len(classes) != 1 or any(r.num_inputs != 1 for r in self.runners):
      raise errors.ExportError(f"plan stages {', '.join(spec.names)} take inputs {sorted(shapes)} with outputs "
                               f"{sorted(classes)}: a cascade needs one input shape and one label set")
    self.input_shape, self.num_classes = shapes.pop(), classes.pop()
    if not 0 <= spec.positive_index < self.num_classes:
      raise errors.ExportError(f"positive class {spec.positive_index} is not an output of {spec.names[0]} "
                               f"({self.num_classes} classes)")

  def stage_outputs(self, stage: int, features: np.ndarray) -> np.ndarray:
    runner = self.runners[stage]
    return runner.run_int8(runner.quantize_input(features))

  def fires(self, stage: int, outputs: np.ndarray) -> np.ndarray:
    return outputs[:, self.spec.positive_index].astype(np.int32) >= self.spec.thresholds_q[stage]

  def run(self, features: np.ndarray) -> dict:
    """{outputs [N, stages, classes] (zeros where a stage did not run), stages_run [N], detected [N]}."""
    n, stages = len(features), len(self.runners)
    outputs = np.zeros((n, stages, self.num_classes), np.int8)
    ran = np.zeros(n, np.int32)
    live = np.ones(n, bool)
    for s in range(stages):
      idx = np.flatnonzero(live)
      if idx.size == 0:
        break
      out = self.stage_outputs(s, features[idx])
      outputs[idx, s] = out
      ran[idx] += 1
      live[idx] = self.fires(s, out)
    return dict(outputs=outputs, stages_run=ran, detected=live & (ran == stages))


def choose_frames(host: HostCascade, split, count: int) -> np.ndarray:
  """Indices of `count` test clips, about half on which stage 1 fires (so stage 2 runs) and half on which it does
  not, the first of each kind in the split's order; fewer of a kind when the split has too few."""
  want_fire = count // 2 if len(host.runners) > 1 else 0
  fire, rest = [], []
  for start in range(0, len(split), SCAN_CHUNK):
    features, _ = split.take(np.arange(start, min(start + SCAN_CHUNK, len(split))))
    fired = host.fires(0, host.stage_outputs(0, features))
    for i, f in enumerate(fired):
      (fire if f else rest).append(start + i)
    if len(fire) >= want_fire and len(rest) >= count - want_fire:
      break
  take_fire = fire[:max(want_fire, count - len(rest))]
  take = sorted(take_fire + rest[:count - len(take_fire)])
  return np.asarray(take[:count], np.int64)


# --------------------------------------------------------------------------------------------------------------
# C sources


def _stage_symbol(i: int) -> str:
  return f"g_edgenas_stage{i + 1}_model"


def data_sources(host: HostCascade, features: np.ndarray, labels: Sequence[int], reference: Mapping,
                 arenas: Sequence[int], name: str) -> dict[str, str]:
  """{'model_data.h', 'model_data.cc'}: the stages, their quantisation and thresholds, the test frames and the
  host's outputs and decisions for them."""
  spec, n = host.spec, len(features)
  stages = len(spec.flatbuffers)
  feature_size = int(np.prod(host.input_shape))
  flat = np.asarray(features, np.float32).reshape(n, -1)
  if not np.all(np.isfinite(flat)):
    raise errors.ExportError("cascade frames: a feature is not finite; the front-end produced NaN or inf")

  def per_stage(values, fmt=str):
    return "{" + ", ".join(fmt(v) for v in values) + "}"
  qin = [r.input_qparams for r in host.runners]
  qout = [r.output_qparams for r in host.runners]
  header = f"""// Generated by edgenas.export for the plan {name}. Do not edit; export the plan again instead.
#ifndef EDGENAS_MODEL_DATA_H_
#define EDGENAS_MODEL_DATA_H_

#include <stdint.h>

// Stage 1 runs on every frame; stage 2 (if any) when stage 1's int8 output for the positive class reaches its
// threshold. The frame is a detection when the last stage that ran is the last stage and it fired.
#define EDGENAS_NUM_STAGES {stages}
constexpr int kEdgenasNumStages = EDGENAS_NUM_STAGES;
constexpr int kEdgenasPositiveIndex = {spec.positive_index};  // {spec.positive_label}
constexpr int kEdgenasNumClasses = {host.num_classes};
constexpr int kEdgenasFeatureSize = {feature_size};  // {" x ".join(str(d) for d in host.input_shape)} float features per frame

// Each stage: its int8 .tflite (16-byte aligned), tensor arena, quantisation and threshold.
// real_value = scale * (int8_value - zero_point)
{chr(10).join(f"extern const unsigned char {_stage_symbol(i)}[];  // {spec.names[i]}" for i in range(stages))}
extern const unsigned char* const kEdgenasStageModels[{stages}];
extern uint8_t* const kEdgenasStageArenas[{stages}];
constexpr int kEdgenasStageArenaBytes[{stages}] = {per_stage(arenas)};
constexpr float kEdgenasStageInputScale[{stages}] = {per_stage([q[0] for q in qin], csource._float_literal)};
constexpr int kEdgenasStageInputZeroPoint[{stages}] = {per_stage([int(q[1]) for q in qin])};
constexpr float kEdgenasStageOutputScale[{stages}] = {per_stage([q[0] for q in qout], csource._float_literal)};
constexpr int kEdgenasStageOutputZeroPoint[{stages}] = {per_stage([int(q[1]) for q in qout])};
constexpr int kEdgenasStageThreshold[{stages}] = {per_stage(spec.thresholds_q)};  // int8 output levels

// Test frames (float features), their labels, and what the host's TFLite Micro interpreter computed: each
// stage's int8 outputs (zeros where the stage does not run), the number of stages run, the detection.
constexpr int kEdgenasNumFrames = {n};
extern const float g_edgenas_frames[{n}][{feature_size}];
extern const int16_t g_edgenas_frame_labels[{n}];
extern const int8_t g_edgenas_expected_outputs[{n}][{stages}][{host.num_classes}];
extern const uint8_t g_edgenas_expected_stages_run[{n}];
extern const uint8_t g_edgenas_expected_detected[{n}];

#endif  // EDGENAS_MODEL_DATA_H_
"""
  models = "\n".join(
      f"// {spec.names[i]}\nalignas(16) const unsigned char {_stage_symbol(i)}[] = {{\n"
      f"{csource._c_array(list(fb), '0x{:02x}')}\n}};" for i, fb in enumerate(spec.flatbuffers))
  arena_defs = "\n".join(f"alignas(16) uint8_t g_edgenas_stage{i + 1}_arena[{int(a)}];" for i, a in enumerate(arenas))
  frames = ",\n".join("  {" + ", ".join(csource._float_literal(v) for v in row) + "}" for row in flat)
  outputs = ",\n".join("  {" + ", ".join("{" + ", ".join(str(int(v)) for v in stage) + "}" for stage in frame) + "}"
                       for frame in reference["outputs"])
  source = f"""// Generated by edgenas.export for the plan {name}. Do not edit; export the plan again instead.
#include "model_data.h"

{models}
const unsigned char* const kEdgenasStageModels[{stages}] = {per_stage([_stage_symbol(i) for i in range(stages)])};

{arena_defs}
uint8_t* const kEdgenasStageArenas[{stages}] = {per_stage([f"g_edgenas_stage{i + 1}_arena" for i in range(stages)])};

const float g_edgenas_frames[{n}][{feature_size}] = {{
{frames}
}};
const int16_t g_edgenas_frame_labels[{n}] = {per_stage([int(v) for v in labels])};
const int8_t g_edgenas_expected_outputs[{n}][{stages}][{host.num_classes}] = {{
{outputs}
}};
const uint8_t g_edgenas_expected_stages_run[{n}] = {per_stage([int(v) for v in reference["stages_run"]])};
const uint8_t g_edgenas_expected_detected[{n}] = {per_stage([int(v) for v in reference["detected"]])};
"""
  return {"model_data.h": header, "model_data.cc": source}


MAIN_CC = r"""// Generated by edgenas.export for a deployment plan: a detector that runs stage 1 on every frame and stage 2
// only when stage 1 fires. It runs every embedded test frame and checks each stage's output bytes, the stages
// that ran and the detection against the host's TFLite Micro result. Prints (MicroPrintf: the board's serial
// port, or semihosting in an emulator):
//   EDGENAS_STAGE_BEGIN,<frame>,<stage>  <v0> <v1> ...  EDGENAS_STAGE_END,<frame>,<stage>   int8 outputs
//   EDGENAS_FRAME,<frame>,<stages_run>,<detected>,<cycles>
//   EDGENAS_MISMATCH,<frame>,<what>,<device>,<host>          the first difference of a frame, if any
//   EDGENAS_CASCADE,<frames>,<frames_matching>,<stage2_runs>,<detections>,<arena1_used>,<arena2_used>
//   EDGENAS_DONE
// The process exits 0 when every frame matched, 2 on a mismatch, 1 on an error.
//
// On a board, replace the embedded frames with the front-end's features (DetectFrame below is the whole
// detector) and wake the core once per frame; the cycles printed are the frame's latency at the core clock.
// Each Invoke is bracketed by calls of edgenas_marker() (the frame by two more), which an instruction-counting
// emulator plugin logs: instructions per stage and per frame.
#include <math.h>
#include <stdint.h>

#include "model_data.h"
#include "model_ops.h"
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_log.h"
#include "tensorflow/lite/micro/system_setup.h"
#include "tensorflow/lite/schema/schema_generated.h"

#ifndef EDGENAS_MAIN
#define EDGENAS_MAIN main
#endif

""" + csource.DEVICE_PRELUDE + r"""
namespace {
""" + csource.CYCLE_COUNTER + r"""
// round half to even, as numpy's np.round on the host: rintf under the default rounding mode.
void Quantize(const float* x, int stage, int8_t* q) {
  const float scale = kEdgenasStageInputScale[stage];
  const float zero_point = static_cast<float>(kEdgenasStageInputZeroPoint[stage]);
  for (int i = 0; i < kEdgenasFeatureSize; ++i) {
    float v = rintf(x[i] / scale) + zero_point;
    q[i] = static_cast<int8_t>(v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v));
  }
}

struct Decision {
  int stages_run;
  bool detected;
};

// The detector: stage 1, and stage 2 only when stage 1 fires.
Decision DetectFrame(const float* features, tflite::MicroInterpreter* const* stages) {
  Decision d = {0, false};
  for (int s = 0; s < kEdgenasNumStages; ++s) {
    tflite::MicroInterpreter* stage = stages[s];
    Quantize(features, s, stage->input(0)->data.int8);
    edgenas_marker();
    TfLiteStatus status = stage->Invoke();
    edgenas_marker();
    if (status != kTfLiteOk) return {-1, false};
    ++d.stages_run;
    const bool fires = stage->output(0)->data.int8[kEdgenasPositiveIndex] >= kEdgenasStageThreshold[s];
    if (!fires) return d;
  }
  d.detected = true;
  return d;
}

void PrintStage(int frame, int stage, const int8_t* v) {
  // One value per call keeps the line within MicroPrintf's buffer whatever the number of classes.
  MicroPrintf("EDGENAS_STAGE_BEGIN,%d,%d", frame, stage + 1);
  for (int i = 0; i < kEdgenasNumClasses; ++i) MicroPrintf("%d", static_cast<int>(v[i]));
  MicroPrintf("EDGENAS_STAGE_END,%d,%d", frame, stage + 1);
}
}  // namespace

int EDGENAS_MAIN() {
  EDGENAS_REGISTER_LOG();
  tflite::InitializeTarget();
  StartCycleCounter();
  static EdgenasOpResolver resolver;  // every stage's operators, each registered once
  if (RegisterEdgenasOps(resolver) != kTfLiteOk) {
    MicroPrintf("EDGENAS_ERROR,op registration");
    return 1;
  }
  const tflite::Model* models[kEdgenasNumStages];
  for (int s = 0; s < kEdgenasNumStages; ++s) {
    models[s] = tflite::GetModel(kEdgenasStageModels[s]);
    if (models[s]->version() != TFLITE_SCHEMA_VERSION) {
      MicroPrintf("EDGENAS_ERROR,stage %d: schema version %d, expected %d", s + 1,
                  static_cast<int>(models[s]->version()), TFLITE_SCHEMA_VERSION);
      return 1;
    }
  }
  static tflite::MicroInterpreter stage1(models[0], resolver, kEdgenasStageArenas[0], kEdgenasStageArenaBytes[0]);
#if EDGENAS_NUM_STAGES > 1
  static tflite::MicroInterpreter stage2(models[1], resolver, kEdgenasStageArenas[1], kEdgenasStageArenaBytes[1]);
  tflite::MicroInterpreter* const stages[kEdgenasNumStages] = {&stage1, &stage2};
#else
  tflite::MicroInterpreter* const stages[kEdgenasNumStages] = {&stage1};
#endif
  for (int s = 0; s < kEdgenasNumStages; ++s) {
    if (stages[s]->AllocateTensors() != kTfLiteOk) {
      MicroPrintf("EDGENAS_ERROR,stage %d: AllocateTensors failed: raise its arena (%d bytes)", s + 1,
                  kEdgenasStageArenaBytes[s]);
      return 1;
    }
  }

  int matching = 0, stage2_runs = 0, detections = 0;
  for (int f = 0; f < kEdgenasNumFrames; ++f) {
    edgenas_marker();
    const uint32_t start = Cycles();
    const Decision d = DetectFrame(g_edgenas_frames[f], stages);
    const uint32_t cycles = Cycles() - start;
    edgenas_marker();
    if (d.stages_run < 0) {
      MicroPrintf("EDGENAS_ERROR,Invoke failed on frame %d", f);
      return 1;
    }
    stage2_runs += d.stages_run > 1;
    detections += d.detected;
    bool same = true;
    for (int s = 0; s < d.stages_run; ++s) {
      const int8_t* out = stages[s]->output(0)->data.int8;
      PrintStage(f, s, out);
      for (int i = 0; i < kEdgenasNumClasses && same; ++i) {
        if (out[i] != g_edgenas_expected_outputs[f][s][i]) {
          MicroPrintf("EDGENAS_MISMATCH,%d,stage%d_output%d,%d,%d", f, s + 1, i, static_cast<int>(out[i]),
                      static_cast<int>(g_edgenas_expected_outputs[f][s][i]));
          same = false;
        }
      }
    }
    if (same && d.stages_run != g_edgenas_expected_stages_run[f]) {
      MicroPrintf("EDGENAS_MISMATCH,%d,stages_run,%d,%d", f, d.stages_run, g_edgenas_expected_stages_run[f]);
      same = false;
    }
    if (same && d.detected != (g_edgenas_expected_detected[f] != 0)) {
      MicroPrintf("EDGENAS_MISMATCH,%d,detected,%d,%d", f, d.detected, g_edgenas_expected_detected[f]);
      same = false;
    }
    matching += same;
    MicroPrintf("EDGENAS_FRAME,%d,%d,%d,%u", f, d.stages_run, d.detected ? 1 : 0, static_cast<unsigned>(cycles));
  }
  MicroPrintf("EDGENAS_CASCADE,%d,%d,%d,%d,%u,%u", kEdgenasNumFrames, matching, stage2_runs, detections,
              static_cast<unsigned>(stages[0]->arena_used_bytes()),
              static_cast<unsigned>(kEdgenasNumStages > 1 ? stages[kEdgenasNumStages - 1]->arena_used_bytes() : 0));
  MicroPrintf("EDGENAS_DONE");
  return matching == kEdgenasNumFrames ? 0 : 2;
}
"""


# --------------------------------------------------------------------------------------------------------------
# Export


def export_plan(path: str, out_dir: Optional[str] = None, targets: Sequence[str] = (), frames: int = DEFAULT_FRAMES,
                cpu: str = "cortex-m4+fp", riscv_arch: str = "rv32imac", option: Optional[str] = None,
                log: Callable[[str], None] = say) -> dict:
  """Writes the device program of the plan's recommended deployment (or of the option named `option`) into
  `out_dir` (default: the plan's directory/cascade) and runs it on each emulated target; returns report.json.
  Files are written into a staging directory and moved into place whole."""
  from edgenas import data as data_lib
  from edgenas.export import resolver
  from edgenas.export import verify
  from edgenas.device import tflm as tflm_lib
  import ml_collections

  path = plan_path(path)
  spec = CascadeSpec(path, option)
  out_dir = out_dir or os.path.join(spec.plan_dir, CASCADE_DIR)
  if frames < 1:
    raise errors.ExportError(f"--plan_frames must be >= 1, got {frames}")
  host = HostCascade(spec)
  dataset = data_lib.load_data(ml_collections.ConfigDict(spec.data_config))
  if int(np.prod(dataset.input_shape)) != int(np.prod(host.input_shape)):
    raise errors.ExportError(f"{path}: the dataset {dataset.name} gives inputs {tuple(dataset.input_shape)}, the "
                             f"stages take {host.input_shape}")
  index = choose_frames(host, dataset.test, frames)
  features, labels = dataset.test.take(index)
  features = np.asarray(features, np.float32)
  reference = host.run(features)
  name = "+".join(spec.names)
  log(f"cascade: {name}: {len(index)} test frames, stage 1 fires on {int((reference['stages_run'] > 1).sum())}, "
      f"{int(reference['detected'].sum())} detections (host TFLite Micro)")

  table = resolver.from_tflm(tflm_lib.resolve_tflm_dir())
  summary, arenas = [], []
  for fb in spec.flatbuffers:
    ops = verify.model_ops(fb)
    verify.check_tflm_ops(ops, table)
    summary += verify.op_summary(ops, table)
    recorded = verify.recorded_arena(fb)["reported_bytes"]
    arenas.append(verify.device_arena_bytes(fb, recorded + verify.MAX_ARENA_GROWTH_BYTES))
  sources = csource.build_sources(summary, name, cpu=cpu, riscv_arch=riscv_arch)
  sources["main.cc"] = MAIN_CC
  sources.update(data_sources(host, features, labels, reference, arenas, name))

  staging = out_dir.rstrip("/") + ".staging"
  if os.path.isdir(staging):
    shutil.rmtree(staging)
  os.makedirs(staging)
  csource.write_sources(staging, sources)
  for i, fb in enumerate(spec.flatbuffers):
    with open(os.path.join(staging, f"stage{i + 1}.tflite"), "wb") as f:
      f.write(fb)
  option = spec.option or {}
  report = dict(
      version=REPORT_VERSION, plan=os.path.abspath(path), option=spec.name, platform=spec.platform, kind=spec.kind, name=name,
      positive=dict(index=spec.positive_index, label=spec.positive_label),
      operating_point=spec.operating_point,
      stages=[dict(name=n, tflite=f"stage{i + 1}.tflite", threshold_q=t, arena_bytes=int(a),
                   sha256=hashlib.sha256(fb).hexdigest())
              for i, (n, t, a, fb) in enumerate(zip(spec.names, spec.thresholds_q, arenas, spec.flatbuffers))],
      frames=dict(test_indices=[int(i) for i in index], labels=[int(v) for v in labels],
                  stages_run=[int(v) for v in reference["stages_run"]],
                  detected=[int(v) for v in reference["detected"]]),
      # events rare: stage 1 fires at its false-trigger rate on the test split's negatives
      plan_test_trigger_rate=(option.get("test") or {}).get("stage1_false_trigger_rate"),
      files=sorted(list(sources) + [f"stage{i + 1}.tflite" for i in range(len(spec.flatbuffers))]),
      targets={})
  rundir.atomic_write_json(os.path.join(staging, REPORT_FILE), report)
  if os.path.isdir(out_dir):
    old = out_dir.rstrip("/") + ".old"
    if os.path.isdir(old):
      shutil.rmtree(old)
    os.replace(out_dir, old)
    os.replace(staging, out_dir)
    shutil.rmtree(old)
  else:
    os.replace(staging, out_dir)
  log(f"cascade: wrote {', '.join(report['files'])} -> {out_dir}")
  for target in targets:
    report = run_plan_target(out_dir, target, host, reference, log)
  return report


# --------------------------------------------------------------------------------------------------------------
# On an emulated target

_FRAME_LINE = re.compile(r"EDGENAS_FRAME,(\d+),(-?\d+),(\d+),(\d+)")
_CASCADE_LINE = re.compile(r"EDGENAS_CASCADE,(\d+),(\d+),(\d+),(\d+),(\d+),(\d+)")


def parse_console(text: str) -> dict:
  """The EDGENAS_* lines of the cascade program (see MAIN_CC's header comment)."""
  outputs: dict[tuple[int, int], list[int]] = {}
  frames: dict[int, tuple[int, int]] = {}
  current, summary, error, mismatch, done = None, None, None, None, False
  for raw in text.splitlines():
    line = raw.strip()
    if current is not None:
      if line.startswith("EDGENAS_STAGE_END,"):
        current = None
      elif re.fullmatch(r"-?\d+", line):
        current.append(int(line))
      continue
    if line.startswith("EDGENAS_STAGE_BEGIN,"):
      _, f, s = line.split(",")
      current = outputs.setdefault((int(f), int(s)), [])
    elif (m := _FRAME_LINE.match(line)):
      frames[int(m.group(1))] = (int(m.group(2)), int(m.group(3)))
    elif (m := _CASCADE_LINE.match(line)):
      summary = [int(v) for v in m.groups()]
    elif line.startswith("EDGENAS_MISMATCH,") and mismatch is None:
      mismatch = line.split(",", 1)[1]
    elif line.startswith("EDGENAS_ERROR,") and error is None:
      error = line.split(",", 1)[1]
    elif line == "EDGENAS_DONE":
      done = True
  return dict(outputs=outputs, frames=frames, summary=summary, error=error, mismatch=mismatch, done=done)


def compare(console: Mapping, reference: Mapping) -> tuple[int, Optional[dict]]:
  """(frames whose stage outputs, stages run and detection all equal the host's, the first difference)."""
  matching, first = 0, None
  for f, (want_outputs, want_ran, want_det) in enumerate(zip(reference["outputs"], reference["stages_run"],
                                                             reference["detected"])):
    ran, det = console["frames"].get(f, (None, None))
    problem = None
    if ran != int(want_ran):
      problem = dict(what="stages_run", device=ran, host=int(want_ran))
    else:
      for s in range(ran):
        got = console["outputs"].get((f, s + 1), [])
        want = [int(v) for v in want_outputs[s]]
        if got != want:
          j = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
          problem = dict(what=f"stage{s + 1}_output{j}", device=got[j] if j < len(got) else None,
                         host=want[j] if j < len(want) else None)
          break
      if problem is None and det != int(want_det):
        problem = dict(what="detected", device=det, host=int(want_det))
    if problem is None:
      matching += 1
    elif first is None:
      first = dict(frame=f, **problem)
  return matching, first


def _instruction_counts(marks: Sequence[int], stages_run: Sequence[int], where: str) -> dict:
  """Per frame: [frame start, (Invoke start, Invoke end) per stage run, frame end]."""
  from edgenas.device import errors as device_errors
  expected = sum(2 + 2 * int(r) for r in stages_run)
  if len(marks) != expected:
    raise device_errors.DeviceError(f"{where}: the plugin logged {len(marks)} marker calls, expected {expected} "
                                    "for the frames' stages")
  frame, per_stage, k = [], [[] for _ in range(2)], 0
  for r in stages_run:
    m = marks[k:k + 2 + 2 * int(r)]
    frame.append(m[-1] - m[0])
    for s in range(int(r)):
      per_stage[s].append(m[2 + 2 * s] - m[1 + 2 * s])
    k += 2 + 2 * int(r)
  return dict(frame=frame, stages=[v for v in per_stage if v])


def run_plan_target(out_dir: str, target_name: str, host: Optional[HostCascade] = None,
                    reference: Optional[Mapping] = None, log: Callable[[str], None] = say) -> dict:
  """Builds the program in `out_dir` for the emulated `target_name`, runs it under QEMU and records the result in
  report.json["targets"]; a byte that differs from the host raises MismatchError naming the frame and output."""
  from edgenas.device import errors as device_errors
  from edgenas.device import runner
  from edgenas.device import targets as targets_lib
  from edgenas.device import tflm as tflm_lib

  report_path = os.path.join(out_dir, REPORT_FILE)
  report = rundir.read_json(report_path)
  if host is None or reference is None:
    host = HostCascade(CascadeSpec(report["plan"], report.get("option")))
    reference = _reference_from_report(report, host)
  target = targets_lib.get_target(target_name)
  targets_lib.check_toolchain(target)
  library = tflm_lib.build_library(target, log=log)
  directory = os.path.join(out_dir, "build", target.name)
  if os.path.isdir(directory):
    shutil.rmtree(directory)
  os.makedirs(directory)
  t0 = time.time()
  elf = runner.build_program(target, library, directory, report["name"][:60], log,
                             sources=[os.path.join(out_dir, "main.cc"), os.path.join(out_dir, "model_data.cc")])
  t_build = time.time()
  sizes = runner.elf_sizes(target, elf)
  console_path = os.path.join(directory, "console.txt")
  status, text, counts = runner.run_elf(target, elf, log_path=console_path)
  t_run = time.time()
  console = parse_console(text)
  where = f"target {target.name} ({console_path})"
  if console["error"] is not None:
    raise device_errors.DeviceError(f"{where}: the program failed: {console['error']}")
  if not console["done"] or console["summary"] is None:
    raise device_errors.DeviceError(f"{where}: the program ended (exit status {status}) without finishing")
  matching, first = compare(console, reference)
  frames = len(reference["stages_run"])
  if console["mismatch"] is not None and first is None:
    # The device's own check against the outputs embedded in model_data.cc (frame, what, device, host).
    f, what, dev, want = (console["mismatch"].split(",") + [None] * 4)[:4]
    first = dict(frame=int(f), what=what, device=dev, host=want, note="found by the device's own check")
  matching = min(matching, int(console["summary"][1]))
  ran = [console["frames"].get(f, (0, 0))[0] for f in range(frames)]
  counts_ = _instruction_counts([m.instructions for m in counts.marks], ran, where)
  stage_means = [int(round(float(np.mean(v)))) for v in counts_["stages"]]
  frame_data = int(frames * (int(np.prod(host.input_shape)) * 4 + 2 + len(host.runners) * host.num_classes + 2))
  trigger = report.get("plan_test_trigger_rate")
  result = dict(
      target=target.name, description=target.description, kernels=target.kernels,
      matches_host=bool(matching == frames and first is None), frames_checked=frames, frames_matching=matching,
      first_mismatch=first, exit_status=status, stage2_runs=int(console["summary"][2]),
      detections=int(console["summary"][3]),
      arena_used_bytes=[int(v) for v in console["summary"][4:4 + len(host.runners)]],
      instructions_per_stage=stage_means,
      instructions_per_frame=dict(mean=int(round(float(np.mean(counts_["frame"])))), min=int(min(counts_["frame"])),
                                  max=int(max(counts_["frame"]))),
      elf=dict(sizes, flash_bytes=sizes["text"] + sizes["data"], test_data_bytes=frame_data,
               deployed_flash_bytes=sizes["text"] + sizes["data"] - frame_data),
      toolchain=dict(compiler=library.compiler, qemu=target.qemu_version(), tflm_commit=library.tflm_commit),
      seconds=dict(build=round(t_build - t0, 1), run=round(t_run - t_build, 2)))
  if len(stage_means) == 2 and trigger is not None:
    # What the plan's test-split trigger rate makes of the measured counts: instructions the detector executes per
    # frame on average, against stage 2 run on every frame.
    per_frame = stage_means[0] + float(trigger) * stage_means[1]
    result["at_plan_trigger_rate"] = dict(stage1_trigger_rate=float(trigger),
                                          instructions_per_frame=int(round(per_frame)),
                                          stage2_alone_instructions_per_frame=stage_means[1],
                                          ratio=round(per_frame / stage_means[1], 4))
  rundir.atomic_write_json(os.path.join(directory, "result.json"), result)
  if not result["matches_host"]:
    m = first or {}
    raise device_errors.MismatchError(
        f"target {target.name}: frame {m.get('frame')} differs from the host TFLite Micro interpreter at "
        f"{m.get('what')} (device {m.get('device')}, host {m.get('host')}); {matching}/{frames} frames matched; "
        f"build kept in {directory}")
  report = dict(report, targets=dict(report.get("targets", {}), **{target.name: result}))
  rundir.atomic_write_json(report_path, report)
  log(f"cascade: {target.name}: {matching}/{frames} frames byte-exact with the host (stage 2 ran on "
      f"{result['stage2_runs']}); instructions per stage {', '.join(f'{v:,}' for v in stage_means)}; arenas "
      f"{', '.join(str(v) for v in result['arena_used_bytes'])} B; flash {result['elf']['deployed_flash_bytes']:,} B "
      f"(build {t_build - t0:.0f} s, run {t_run - t_build:.1f} s)")
  return report


def _reference_from_report(report: Mapping, host: HostCascade) -> dict:
  """The host reference for the frames report.json recorded (a later --targets run on a written program)."""
  from edgenas import data as data_lib
  import ml_collections
  dataset = data_lib.load_data(ml_collections.ConfigDict(host.spec.data_config))
  features, _ = dataset.test.take(np.asarray(report["frames"]["test_indices"], np.int64))
  return host.run(np.asarray(features, np.float32))
