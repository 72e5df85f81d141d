"""The whole job in one call: search → derive → retrain → export, with the baselines retrained on the same budget,
ending in a side-by-side table.

Layout of the pipeline's workdir (each stage is an ordinary workdir of its own launcher, so any stage can be
re-run or inspected with the launcher alone, and a pipeline started again resumes stage by stage):

  DIR/search/            launch.search:  arch.json, search.json, metrics.jsonl, checkpoints/
  DIR/retrain/           launch.retrain: report.json, checkpoints/, export/ (launch.export: model.tflite, C sources)
  DIR/baselines/<name>/  launch.retrain on each hand-designed reference network
  DIR/summary.json, DIR/summary.md

The baselines do not depend on the search, so they retrain in a thread beside the search, retrain and export
(in a single-process run): on 2 CPU cores one XLA program keeps about 1.6 cores busy, and each stage's
compilation leaves cores idle that the other fills. Their progress lines start with `[baselines] `. If the main
stages stop (an error, Ctrl-C), the baselines stop at their next step with a checkpoint there, and a rerun resumes
both. The summary's `seconds.baselines` is then how long the pipeline waited for them after the export;
`seconds.baselines_own` is their own wall time.

The summary is rewritten only when what it summarises changed: a rerun of a finished pipeline leaves both files
as they are. A stage finished before the run keeps the wall time recorded when it finished (the previous
summary's, else the stage's own record), so a resume never reports its own few seconds as the stage's time.
"""
from __future__ import annotations

import json
import os
import time
from typing import Mapping, Sequence

from edgenas import architecture as arch_lib
from edgenas import baselines as baselines_lib
from edgenas import retrain_cache
from edgenas import rundir
from edgenas import search as search_lib
from edgenas import train as train_lib
from edgenas.console import say

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
STAGES = ("search", "retrain", "export", "baselines")  # summary.json's seconds: these add up to its total


def _row(name: str, report: dict, platform: str, export_report: dict | None = None) -> dict:
  """One line of the summary table; with an export, its TFLM accuracy and what each emulated target ran."""
  cost = report["platforms"][platform]
  row = dict(network=name, arch_hash=report["arch_hash"], test_acc_float=report["test_acc_float"],
             test_acc_fake_quant=report["test_acc_fake_quant"], energy_uj=cost["energy_uj"],
             latency_ms=cost["latency_ms"], peak_sram_bytes=cost["peak_sram_bytes"], flash_bytes=cost["flash_bytes"],
             macs=report["macs"], params=report["params"])
  if export_report is not None:
    row.update(test_acc_int8_tflm=export_report["accuracy"]["int8_tflm"],
               argmax_agreement_int8=export_report["accuracy"]["argmax_agreement_int8_float"],
               arena_bytes_tflm=export_report["arena"]["measured_tflm_bytes"],
               tflite_bytes=export_report["tflite_bytes"],
               targets={t: dict(matches_host=r["matches_host"], images_checked=r["images_checked"],
                                instructions_per_inference=r["instructions_per_inference"],
                                arena_used_bytes=r["arena_used_bytes"],
                                deployed_flash_bytes=r["elf"]["deployed_flash_bytes"])
                        for t, r in export_report.get("targets", {}).items()})
  return row


def run_pipeline(config, workdir: str, *, baselines: bool = True, export: bool = True,
                 targets: Sequence[str] | None = None) -> dict:
  """Runs every stage (see the module docstring). `targets`: the emulated cores the export runs on and is
  checked byte for byte (edgenas.device); None means the platform's own core, () none. Everything is checked
  before the workdir is touched; it is locked for the run, and each stage locks its own sub-directory."""
  t0 = time.time()
  search_lib.check_config(config)
  train_lib.check_later_stages(config, baselines)
  platform = config.cost.platform
  if targets is None:
    from edgenas.energy import platform as platform_lib
    own = platform_lib.load_platform(platform).target
    targets = (own,) if own else ()
  if export and targets:
    from edgenas.device import targets as targets_lib
    from edgenas.device import tflm
    for t in targets_lib.parse_targets(",".join(targets)):
      targets_lib.check_toolchain(t)  # before the search, not after it
    tflm.resolve_tflm_dir()
  with rundir.workdir_lock(workdir):
    return _run_stages(config, workdir, t0, platform, baselines, export, targets)


def _run_stages(config, workdir: str, t0: float, platform: str, baselines: bool, export: bool,
                targets: Sequence[str]) -> dict:
  """`run_pipeline` once everything is checked and its workdir is locked."""
  search_dir = os.path.join(workdir, "search")
  finished = _finished_stages(config, workdir, baselines, export, targets)
  import jax
  # Several processes must run their collectives in one order: there the baselines wait their turn.
  overlap = baselines and bool(tuple(config.baselines)) and jax.process_count() == 1
  say("== 1/4 search ==" + (" (the baselines retrain beside it, on lines starting [baselines])" if overlap else ""))
  beside = _BaselinesBeside(config, workdir, platform) if overlap else None
  try:
    search_result = search_lib.run_search(config, search_dir)
    arch = arch_lib.Architecture.load(os.path.join(search_dir, search_lib.ARCH_FILE))
    t_search = time.time()

    say("== 2/4 retrain the searched network ==")
    retrain_dir = os.path.join(workdir, "retrain")
    report = train_lib.run_retrain(config, arch, retrain_dir, platforms=[platform])
    t_retrain = time.time()

    export_report, export_dir = None, None
    if export:
      say("== 3/4 export to TFLite Micro, verify in the TFLM interpreter"
          f"{' and on ' + ', '.join(targets) if targets else ''} ==")
      from edgenas import export as export_lib
      export_dir = os.path.join(retrain_dir, "export")
      export_report = export_lib.export_workdir(retrain_dir, [platform], out_dir=export_dir, targets=targets)
    t_export = time.time()

    base_reports = []
    if baselines:
      say("== 4/4 baselines, same data, budget and cost model ==")
      if beside is not None:
        base_reports = beside.result()
      else:
        base_reports = _retrain_baselines(config, workdir, platform, tuple(arch.input_shape), arch.num_classes)
  except BaseException:
    if beside is not None:
      beside.stop()
    raise
  t_end = time.time()
  rows = [_row("searched", report, platform, export_report)]
  rows += [_row(name, r, platform) for name, r in base_reports]
  seconds = dict(search=t_search - t0, retrain=t_retrain - t_search, export=t_export - t_retrain,
                 baselines=t_end - t_export)
  recorded = dict(  # what each stage recorded when it finished, for stages this run only read
      search=search_result.get("seconds", {}).get("total"),
      retrain=report.get("seconds", {}).get("this_process"),
      export=(export_report or {}).get("seconds", {}).get("total"),
      baselines=_sum_or_none(r.get("seconds", {}).get("this_process") for _, r in base_reports))
  for stage, value in recorded.items():
    if finished[stage] and value is not None:
      seconds[stage] = value
  seconds["total"] = sum(seconds[stage] for stage in STAGES)
  if beside is not None and not finished["baselines"]:
    seconds["baselines_own"] = beside.seconds

  ref = next((r for r in rows if r["network"] == "mobilenetv2_1.0"), None)
  for r in rows:
    r["energy_vs_mobilenetv2_1.0"] = r["energy_uj"] / ref["energy_uj"] if ref else None
  summary = dict(
      platform=platform, dataset=config.dataset, rows=rows, search=dict(
          arch_hash=search_result["arch_hash"], layers=search_result["arch"]["layers"],
          val_acc_supernet=search_result["val_acc_supernet"], cost_model=search_result["cost_model"],
          lam=config.cost.lam, penalty=config.cost.penalty),
      seconds=seconds,
      files=dict(arch=os.path.join(search_dir, search_lib.ARCH_FILE),
                 retrain_report=os.path.join(retrain_dir, train_lib.REPORT_FILE),
                 export=export_dir, tflite=os.path.join(export_dir, "model.tflite") if export_dir else None,
                 export_report=os.path.join(export_dir, "report.json") if export_dir else None))
  summary = write_summary(workdir, summary, finished)
  say("\n" + summary_table(summary))
  return summary


def _retrain_baselines(config, workdir: str, platform: str, input_shape, num_classes: int):
  """[(name, report)] of `config.baselines`, each retrained (or its cached retrain reused) in its workdir."""
  out = []
  for name, base in baselines_lib.baseline_architectures(tuple(input_shape), num_classes,
                                                         names=tuple(config.baselines)).items():
    out.append((name, retrain_cache.retrain_baseline(config, base, os.path.join(workdir, "baselines", name),
                                                     [platform], train_lib.run_retrain)))
  return out


class _BaselinesBeside:
  """The baselines' retraining in a thread of its own, started at once. Their input shape and class count come
  from the dataset, loaded here in the caller's thread before the thread starts (for the embedded KWS set this is
  where it is generated, once; the search then reads it from the cache)."""

  def __init__(self, config, workdir: str, platform: str):
    import threading
    from edgenas import data as data_lib
    dataset = data_lib.load_data(config)
    self._args = (config, workdir, platform, dataset.input_shape, dataset.num_classes)
    self._stop = threading.Event()
    self._reports, self._error, self.seconds = None, None, None
    self._thread = threading.Thread(target=self._run, name="edgenas-baselines", daemon=False)
    self._thread.start()

  def _run(self) -> None:
    from edgenas import console
    from edgenas import loop as loop_lib
    t = time.time()
    try:
      with console.prefixed("[baselines] "), loop_lib.stop_when(self._stop):
        self._reports = _retrain_baselines(*self._args)
    except BaseException as e:  # handed to the main thread by result()
      self._error = e
    self.seconds = time.time() - t

  def result(self) -> list:
    """[(name, report)] of the baselines once they finish; their error, if they failed, raised here."""
    self._thread.join()
    if self._error is not None:
      raise self._error
    return self._reports

  def stop(self) -> None:
    """Stops the baselines at their next step (a checkpoint there, for the rerun) and waits for them."""
    if self._thread.is_alive():
      say("stopping the baselines running beside (a checkpoint at their current step; a rerun resumes them)")
      self._stop.set()
      self._thread.join()


def _finished_stages(config, workdir: str, baselines: bool, export: bool, targets: Sequence[str]) -> dict:
  """{stage: whether it finished before this run}: such a stage is only read, not run."""
  search_dir, retrain_dir = os.path.join(workdir, "search"), os.path.join(workdir, "retrain")
  export_report = os.path.join(retrain_dir, "export", "report.json")
  exported = export and os.path.exists(export_report)
  if exported and targets:  # an export gains the targets it lacks: that is work done now
    exported = set(targets) <= set(rundir.read_json(export_report).get("targets", {}))
  names = tuple(config.get("baselines", ()))
  return dict(
      search=all(os.path.exists(os.path.join(search_dir, f)) for f in (search_lib.RESULT_FILE, search_lib.ARCH_FILE)),
      retrain=os.path.exists(os.path.join(retrain_dir, train_lib.REPORT_FILE)),
      export=exported,
      baselines=baselines and all(os.path.exists(os.path.join(workdir, "baselines", n, train_lib.REPORT_FILE))
                                  for n in names))


def _sum_or_none(values):
  values = list(values)
  return None if not values or any(v is None for v in values) else sum(values)


def _results_of(summary: dict) -> dict:
  """A summary without its wall times and file paths: what decides whether it changed."""
  plain = json.loads(json.dumps(rundir.to_jsonable(summary)))
  return {k: v for k, v in plain.items() if k not in ("seconds", "files")}


def write_summary(workdir: str, summary: dict, finished: Mapping[str, bool]) -> dict:
  """Writes summary.json and summary.md unless the workdir's summary already says the same; returns the summary
  as on disk.

  `finished`: {stage: whether it finished before this run}. Those stages keep the wall times of the previous
  summary, so a rewrite (another stage changed) still reports how long they took when they ran.
  """
  json_path, md_path = os.path.join(workdir, SUMMARY_JSON), os.path.join(workdir, SUMMARY_MD)
  previous = None
  if os.path.exists(json_path):
    try:
      previous = rundir.read_json(json_path)
    except rundir.RunDirError as e:  # a summary is derived from the stages; an unreadable one is written anew
      say(f"{json_path}: {e}; writing it again")
  if previous is not None:
    old = previous.get("seconds", {})
    seconds = {stage: old[stage] if finished.get(stage) and stage in old else value
               for stage, value in summary["seconds"].items() if stage != "total"}
    seconds["total"] = sum(seconds[stage] for stage in STAGES)
    summary = {**summary, "seconds": seconds}
    if _results_of(previous) == _results_of(summary):
      say(f"{workdir}: the summary is up to date; {SUMMARY_JSON} and {SUMMARY_MD} are left as they are")
      if not os.path.exists(md_path):  # deleted by hand: the table of the unchanged summary again
        _write_text_if_changed(md_path, summary_table(previous) + "\n")
      return previous
  rundir.atomic_write_json(json_path, summary)
  _write_text_if_changed(md_path, summary_table(summary) + "\n")
  return summary


def _write_text_if_changed(path: str, text: str) -> None:
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def summary_table(summary: dict) -> str:
  """A Markdown table a person reads at a glance, plus where the files are."""
  lines = [f"Platform {summary['platform']}, dataset {summary['dataset']}; searched with {summary['search']['penalty']}"
           f" penalty λ={summary['search']['lam']} on {summary['search']['cost_model']}",
           "",
           "| network | test acc (float) | test acc (int8 fake-quant) | test acc (int8, TFLM) | energy µJ | "
           "vs MBV2-1.0 | latency ms | peak SRAM KiB | flash KiB | MACs |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  target_names = sorted({t for r in summary["rows"] for t in r.get("targets", {})})
  lines[2] += "".join(f" on {t} |" for t in target_names)
  lines[3] += "---|" * len(target_names)
  for r in summary["rows"]:
    tflm = r.get("test_acc_int8_tflm")
    ratio = r.get("energy_vs_mobilenetv2_1.0")
    line = (f"| {r['network']} | {100 * r['test_acc_float']:.2f}% | {100 * r['test_acc_fake_quant']:.2f}% | "
            f"{'' if tflm is None else f'{100 * tflm:.2f}%'} | {r['energy_uj']:.1f} | "
            f"{'' if ratio is None else f'{100 * ratio:.1f}%'} | {r['latency_ms']:.2f} | "
            f"{r['peak_sram_bytes'] / 1024:.1f} | {r['flash_bytes'] / 1024:.1f} | {r['macs']:,} |")
    for t in target_names:
      d = r.get("targets", {}).get(t)
      line += "" if d is None else (
          f" {'byte-exact' if d['matches_host'] else 'MISMATCH'} on {d['images_checked']} images, "
          f"{d['instructions_per_inference'] / 1e6:.2f} M instr, arena {d['arena_used_bytes'] / 1024:.1f} KiB, "
          f"flash {d['deployed_flash_bytes'] / 1024:.0f} KiB |")
      line += " |" if d is None else ""
    lines.append(line)
  s = summary["seconds"]
  baselines = f"baselines {s['baselines']:.0f}"
  if "baselines_own" in s:
    baselines += f" more after the export; they ran {s['baselines_own']:.0f} s beside the other stages"
  lines += ["", f"Wall time: {s['total']:.0f} s (search {s['search']:.0f}, retrain {s['retrain']:.0f}, export "
                f"{s['export']:.0f}, {baselines})", "", "Files:"]
  lines += [f"- {k}: {v}" for k, v in summary["files"].items() if v]
  return "\n".join(lines)
