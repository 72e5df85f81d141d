"""Runs an int8 `.tflite` on an emulated core: build the TFLM program, run it under QEMU, check every output byte.

    result = runner.run_on_target(flatbuffer, "cortex-m4", inputs_int8, expected_int8, labels, build_dir)

The program (edgenas.export.csource's `main.cc`, the same one a board builds) embeds the model and the test
images, runs each image, prints the int8 outputs and the arena TFLM really used, and calls a marker function
around every operator. A QEMU TCG plugin (`plugin.py`) logs the executed-instruction count at every marker call,
which gives exact instructions per inference and per operator, repeatable run to run.

The host's TFLite Micro interpreter is the reference: a device output that differs in any byte is a mismatch,
reported with the image, the output index and both bytes.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import time
from typing import Callable, Optional, Sequence

import numpy as np

from edgenas.device import errors
from edgenas.device import plugin as plugin_lib
from edgenas.device import targets as targets_lib
from edgenas.device import tflm as tflm_lib

SUPPORT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "support")
MARKER_SYMBOL = "edgenas_marker"
DEFAULT_TIMEOUT_S = 600.0
APP_OPT = "-Os"
RESULT_VERSION = 1


def _say(line: str) -> None:
  print(line, flush=True)


@dataclasses.dataclass
class ProgramOutput:
  """What the device program printed."""
  op_names: list[str]
  outputs: dict[int, list[int]]
  arena_used_bytes: Optional[int]
  images: Optional[int]
  images_matching: Optional[int]
  done: bool
  error: Optional[str]


_MODEL_LINE = re.compile(r"EDGENAS_MODEL,([^,]*),(\d+),(\d+),(\d+),(\d+),(\d+),(\d+)")


def parse_program_output(text: str) -> ProgramOutput:
  """Reads the EDGENAS_* lines of `main.cc` (see its header comment); other lines are ignored."""
  ops: list[str] = []
  outputs: dict[int, list[int]] = {}
  current: Optional[list[int]] = None
  arena = images = matching = error = None
  done = False
  for raw in text.splitlines():
    line = raw.strip()
    if current is not None:
      if line.startswith("EDGENAS_OUTPUT_END,"):
        current = None
      elif re.fullmatch(r"-?\d+", line):
        current.append(int(line))
      continue
    if line.startswith("EDGENAS_OP,"):
      ops.append(line.split(",", 2)[2])
    elif line.startswith("EDGENAS_OUTPUT_BEGIN,"):
      current = outputs.setdefault(int(line.split(",")[1]), [])
    elif line.startswith("EDGENAS_MODEL,"):
      m = _MODEL_LINE.match(line)
      if m:
        images, matching, arena = int(m.group(2)), int(m.group(3)), int(m.group(4))
    elif line.startswith("EDGENAS_ERROR,") and error is None:
      error = line.split(",", 1)[1]
    elif line == "EDGENAS_DONE":
      done = True
  return ProgramOutput(ops, outputs, arena, images, matching, done, error)


def elf_sizes(target: targets_lib.Target, elf: str) -> dict:
  """{text, data, bss} bytes of the ELF (Berkeley format of `size`): flash = text + data, RAM = data + bss."""
  out = subprocess.run([target.prefix + "size", elf], capture_output=True, text=True)
  lines = out.stdout.strip().splitlines()
  if out.returncode != 0 or len(lines) < 2:
    raise errors.BuildError(f"{elf}: {target.prefix}size failed: {out.stderr.strip()}")
  text, data, bss = (int(v) for v in lines[1].split()[:3])
  return dict(text=text, data=data, bss=bss)


def _write(path: str, text: str) -> None:
  with open(path, "w") as f:
    f.write(text)


def write_program(directory: str, flatbuffer: bytes, host, inputs_int8: np.ndarray, expected_int8: np.ndarray,
                  labels: Sequence[int], arena_bytes: int, model_name: str) -> dict:
  """Writes main.cc, model_data.cc/.h and model_ops.h for the model into `directory`; returns their facts.
  `host` is the model's `edgenas.export.verify.TflmRunner` (shapes and quantization come from it)."""
  from edgenas.export import csource
  from edgenas.export import resolver
  from edgenas.export import verify

  input_shape = [int(d) for d in host.input["shape"][1:]]
  extra_sizes = [int(np.prod(d["shape"])) for d in _input_details(host)[1:]]
  output_size = int(np.prod(host.output["shape"]))
  qin, qout = host.input_qparams, host.output_qparams
  ops = verify.model_ops(flatbuffer)
  # The resolver methods of the tree the program compiles against (TFLM_DIR may name another than the pinned one).
  table = resolver.from_tflm(tflm_lib.resolve_tflm_dir())
  verify.check_tflm_ops(ops, table)
  summary = verify.op_summary(ops, table)
  sources = csource.model_data_sources(flatbuffer, arena_bytes, qin, qout, input_shape, output_size,
                                       np.asarray(inputs_int8).reshape(len(inputs_int8), -1), expected_int8,
                                       list(labels), model_name, extra_sizes)
  sources["model_ops.h"] = csource.model_ops_header(summary, model_name)
  sources["main.cc"] = csource.MAIN_CC
  os.makedirs(directory, exist_ok=True)
  csource.write_sources(directory, sources)
  input_size = int(np.prod(input_shape)) + sum(extra_sizes)
  return dict(input_size=input_size, output_size=output_size, samples=len(inputs_int8),
              harness_bytes=csource.sample_bytes(input_size, output_size, len(inputs_int8)),
              ops=[o["op"] for o in ops])


def _input_details(host) -> list[dict]:
  """The details of every input of the model `host` (a verify.TflmRunner) runs, in order."""
  return [host.interpreter.get_input_details(i) for i in range(host.num_inputs)]


def host_outputs(host, samples: np.ndarray) -> np.ndarray:
  """The host TFLM's int8 outputs for samples whose rows hold every input of the model, one after another."""
  details = _input_details(host)
  sizes = [int(np.prod(d["shape"])) for d in details]
  flat = np.asarray(samples, np.int8).reshape(len(samples), -1)
  if flat.shape[1] != sum(sizes):
    raise errors.DeviceError(f"inputs of {flat.shape[1]} values per sample; the model takes {sum(sizes)} "
                             f"({' + '.join(str(v) for v in sizes)})")
  outs = []
  for row in flat:
    offset = 0
    for i, (d, size) in enumerate(zip(details, sizes)):
      host.interpreter.set_input(row[offset:offset + size].reshape(d["shape"]), i)
      offset += size
    host.interpreter.invoke()
    outs.append(np.asarray(host.interpreter.get_output(0)).reshape(-1))
  return np.stack(outs)


def _support_sources(target: targets_lib.Target) -> tuple[list[str], list[str]]:
  """(sources to compile, extra link flags) of the emulator board: start-up code, linker script, exit path."""
  script = ["-T", os.path.join(SUPPORT_DIR, target.linker_script)]
  if target.family == "cortex_m":
    # -L: ld finds the board scripts' shared `INCLUDE cortex_m_sections.ld` on the library path.
    return [os.path.join(SUPPORT_DIR, "startup_cortex_m.c")], script + ["-L", SUPPORT_DIR]
  return [os.path.join(SUPPORT_DIR, "riscv_virt.c"), os.path.join(SUPPORT_DIR, "riscv_cxx.cc")], script


def build_program(target: targets_lib.Target, library: tflm_lib.Library, directory: str, model_name: str,
                  log: Callable[[str], None] = _say, sources: Optional[Sequence[str]] = None) -> str:
  """Compiles and links the program in `directory` (its main.cc and model_data.cc, or `sources`) against
  `library`, with the emulator board's start-up code; returns the ELF path. A failure raises BuildError naming
  the log, which is kept."""
  build_log = os.path.join(directory, "build.log")
  if os.path.exists(build_log):
    os.remove(build_log)
  support, link_extra = _support_sources(target)
  defines = ["-DEDGENAS_REPEATS=0", "-DEDGENAS_STDIO_LOG", f"-DEDGENAS_MODEL_NAME=\"{model_name}\""]
  objects = []
  if sources is None:
    sources = [os.path.join(directory, "main.cc"), os.path.join(directory, "model_data.cc")]
  for src in list(sources) + support:
    obj = os.path.join(directory, "obj", os.path.splitext(os.path.basename(src))[0] + ".o")
    os.makedirs(os.path.dirname(obj), exist_ok=True)
    cmd = tflm_lib.compile_command(target, src, obj, (directory,) + library.include_dirs, defines, opt=APP_OPT)
    if tflm_lib.run_logged(cmd, build_log) != 0:
      raise errors.BuildError(f"target {target.name}: compiling {os.path.basename(src)} failed; log kept at "
                              f"{build_log}")
    objects.append(obj)
  elf = os.path.join(directory, "edgenas_model.elf")
  # The C driver links no libstdc++: Debian has none for bare-metal RISC-V, and TFLM needs none.
  linker = target.prefix + ("g++" if target.family == "cortex_m" else "gcc")
  cmd = ([linker, *target.link_flags, *objects, library.archive, *link_extra, "-Wl,--gc-sections",
          f"-Wl,-Map={os.path.join(directory, 'edgenas_model.map')}", "-lm", "-o", elf])
  if tflm_lib.run_logged(cmd, build_log) != 0:
    raise errors.BuildError(f"target {target.name}: linking {os.path.basename(elf)} failed; log kept at {build_log}")
  return elf


def run_elf(target: targets_lib.Target, elf: str, timeout_s: float = DEFAULT_TIMEOUT_S, mem: bool = False,
            log_path: Optional[str] = None) -> tuple[int, str, plugin_lib.PluginLog]:
  """(exit status, console text, plugin log) of the ELF under QEMU with the instruction-count plugin."""
  plugin = plugin_lib.build_plugin()
  marker = plugin_lib.symbol_address(elf, MARKER_SYMBOL, nm=target.nm)
  count_log = os.path.splitext(elf)[0] + ".icount"
  if os.path.exists(count_log):
    os.remove(count_log)
  flash, ram = plugin_lib.memory_ranges(elf, nm=target.nm) if mem else (None, None)
  cmd = [target.qemu, *target.qemu_args, "-kernel", elf,
         *plugin_lib.plugin_args(plugin, marker, count_log, flash, ram, mem, classes=mem)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
  except subprocess.TimeoutExpired as e:
    text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    if log_path:
      _write(log_path, text)
    raise errors.EmulatorTimeoutError(
        f"target {target.name}: {os.path.basename(elf)} did not finish within {timeout_s:.0f} s under "
        f"{target.qemu}{f'; its output is kept at {log_path}' if log_path else ''}") from None
  text = proc.stdout + proc.stderr
  if log_path:
    _write(log_path, text)
  return proc.returncode, text, plugin_lib.parse_log(count_log)


def _instruction_counts(marks: Sequence[int], images: int, num_ops: int, where: str) -> tuple[np.ndarray,
                                                                                              np.ndarray]:
  """(instructions per inference [images], per operator [images, ops]) from the marker counts: per image, one
  marker before Invoke, two per operator, one after."""
  per_image = 2 + 2 * num_ops
  if len(marks) != images * per_image:
    raise errors.DeviceError(f"{where}: the plugin logged {len(marks)} marker calls, expected {images} images x "
                             f"{per_image} (1 + 2 x {num_ops} operators + 1)")
  m = np.asarray(marks, np.int64).reshape(images, per_image)
  inference = m[:, -1] - m[:, 0]
  ops = m[:, 2:-1:2] - m[:, 1:-1:2]
  return inference, ops


def compare_outputs(device: dict[int, list[int]], expected: np.ndarray) -> tuple[int, Optional[dict]]:
  """(images matching the host byte for byte, the first mismatch {image, index, device, host} or None)."""
  matching, first = 0, None
  for i, want in enumerate(np.asarray(expected, np.int64)):
    got = device.get(i)
    if got is None or len(got) != len(want):
      if first is None:
        first = dict(image=i, index=None, device=None, host=None,
                     note=f"the device printed {0 if got is None else len(got)} of {len(want)} outputs")
      continue
    diff = np.flatnonzero(np.asarray(got) != want)
    if diff.size == 0:
      matching += 1
    elif first is None:
      j = int(diff[0])
      first = dict(image=i, index=j, device=int(got[j]), host=int(want[j]))
  return matching, first


def run_on_target(flatbuffer: bytes, target: targets_lib.Target | str, inputs_int8: np.ndarray, build_dir: str,
                  labels: Optional[Sequence[int]] = None, arena_bytes: Optional[int] = None,
                  model_name: str = "edgenas_model", timeout_s: float = DEFAULT_TIMEOUT_S, mem: bool = False,
                  log: Callable[[str], None] = _say) -> dict:
  """Builds and runs the model on `target` over the int8 images (N, ...input shape; for a model with several
  inputs, N rows of all its inputs one after another); returns the report entry
  (see the module docstring). The host TFLM interpreter computes the expected outputs. `arena_bytes` defaults to
  the host's recorded arena plus growth room and CMSIS-NN scratch headroom (`verify.device_arena_bytes`).

  Raises DeviceError subclasses for a missing tool, a failed build, a hang or a program error; a byte mismatch is
  recorded (matches_host false, first_mismatch), not raised, so the caller decides."""
  from edgenas.export import verify

  target = targets_lib.get_target(target) if isinstance(target, str) else target
  targets_lib.check_toolchain(target)
  host = verify.TflmRunner(flatbuffer)
  inputs_int8 = np.asarray(inputs_int8, np.int8)
  expected_int8 = host_outputs(host, inputs_int8)
  if arena_bytes is None:
    # Room to spare instead of the host's minimal arena: the device prints what it really used.
    recorded = verify.recorded_arena(flatbuffer)["reported_bytes"]
    arena_bytes = verify.device_arena_bytes(flatbuffer, recorded + verify.MAX_ARENA_GROWTH_BYTES)
  labels = [-1] * len(inputs_int8) if labels is None else [int(v) for v in labels]
  library = tflm_lib.build_library(target, log=log)
  directory = os.path.join(build_dir, target.name)
  if os.path.isdir(directory):
    shutil.rmtree(directory)
  t0 = time.time()
  facts = write_program(directory, flatbuffer, host, inputs_int8, expected_int8, labels, arena_bytes, model_name)
  elf = build_program(target, library, directory, model_name, log)
  t_build = time.time()
  sizes = elf_sizes(target, elf)
  status, text, counts = run_elf(target, elf, timeout_s, mem, os.path.join(directory, "console.txt"))
  t_run = time.time()
  out = parse_program_output(text)
  where = f"target {target.name} ({os.path.join(directory, 'console.txt')})"
  if out.error is not None:
    raise errors.DeviceError(f"{where}: the program failed: {out.error}")
  if not out.done:
    raise errors.DeviceError(f"{where}: the program ended (exit status {status}) without finishing; see its "
                             "console output")
  images = len(inputs_int8)
  inference, per_op = _instruction_counts([m.instructions for m in counts.marks], images, len(out.op_names), where)
  matching, first = compare_outputs(out.outputs, expected_int8)
  operators = [dict(index=i, op=name, instructions=int(round(float(per_op[:, i].mean()))))
               for i, name in enumerate(out.op_names)]
  accesses = None
  if mem and counts.marks and counts.marks[0].mem is not None:
    triples = [(m.mem.flash_reads, m.mem.ram_reads, m.mem.ram_writes) for m in counts.marks]
    mem_ops, accesses = _memory_counts(triples, images, len(out.op_names))
    for entry, m in zip(operators, mem_ops):
      entry.update(m)
  classes = None
  if counts.marks and counts.marks[0].classes is not None:
    names = list(counts.marks[0].classes)
    op_classes, classes = _memory_counts([[m.classes[k] for k in names] for m in counts.marks], images,
                                         len(out.op_names), names)
    for entry, c in zip(operators, op_classes):
      entry["classes"] = c
  log(f"device: {target.name}: {matching}/{images} images match the host byte for byte; "
      f"{int(np.mean(inference)):,} instructions per inference; arena {out.arena_used_bytes} B; "
      f"flash {sizes['text'] + sizes['data']:,} B (build {t_build - t0:.0f} s, run {t_run - t_build:.1f} s)")
  return dict(
      version=RESULT_VERSION, target=target.name, description=target.description, kernels=target.kernels,
      matches_host=bool(matching == images and first is None), images_checked=images, images_matching=matching,
      first_mismatch=first, exit_status=status,
      instructions_per_inference=int(round(float(np.mean(inference)))),
      instructions_per_inference_min=int(inference.min()), instructions_per_inference_max=int(inference.max()),
      data_accesses_per_inference=accesses, instruction_classes_per_inference=classes, operators=operators, arena_used_bytes=out.arena_used_bytes, arena_allocated_bytes=int(arena_bytes),
      elf=dict(sizes, path=os.path.relpath(elf, build_dir), flash_bytes=sizes["text"] + sizes["data"],
               test_data_bytes=facts["harness_bytes"],
               deployed_flash_bytes=sizes["text"] + sizes["data"] - facts["harness_bytes"]),
      toolchain=dict(compiler=library.compiler, qemu=target.qemu_version(), qemu_args=list(target.qemu_args),
                     tflm_commit=library.tflm_commit, core_opt=tflm_lib.CORE_OPT, kernel_opt=tflm_lib.KERNEL_OPT,
                     app_opt=APP_OPT),
      seconds=dict(library=round(library.seconds, 1), build=round(t_build - t0, 1), run=round(t_run - t_build, 2)))


def _memory_counts(mem_marks: Sequence[Sequence[int]], images: int, num_ops: int,
                   names: Sequence[str] = ("flash_reads", "ram_reads", "ram_writes")) -> tuple[list[dict], dict]:
  """(per operator, per inference) means over the images of cumulative counters logged at each mark: data
  accesses by region (flash reads, RAM reads, RAM writes) or, with `names`, instruction classes."""
  per_image = 2 + 2 * num_ops
  m = np.asarray(mem_marks, np.int64).reshape(images, per_image, -1)
  d = (m[:, 2:-1:2] - m[:, 1:-1:2]).mean(axis=0)
  total = (m[:, -1] - m[:, 0]).mean(axis=0)

  def as_dict(r):
    return {k: int(round(v)) for k, v in zip(names, r)}
  return [as_dict(r) for r in d], as_dict(total)
