"""The accuracy/energy Pareto front of a sweep, its plot and its Markdown summary.

Records are the plain dicts of `sweep.json` (one per member): they need `id`, `platform`, `lam`, `status`,
`energy_uj` and the accuracy field the front is drawn on. A member is on the front when no other member of the same
platform is at least as accurate *and* at most as costly, and strictly better in one of the two.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

OK_STATUSES = ("searched", "retrained", "exported")
LOG_SCALE_SPAN = 10.0  # a log energy axis once the largest energy is more than this many times the smallest


def usable(records: Sequence[Mapping], accuracy_key: str) -> list[Mapping]:
  """Records that finished and have both coordinates."""
  return [r for r in records if r.get("status") in OK_STATUSES and r.get(accuracy_key) is not None
          and r.get("energy_uj") is not None]


def dominates(a: Mapping, b: Mapping, accuracy_key: str) -> bool:
  """a is at least as accurate and at most as costly as b, and strictly better in one."""
  acc_a, acc_b, e_a, e_b = a[accuracy_key], b[accuracy_key], a["energy_uj"], b["energy_uj"]
  return acc_a >= acc_b and e_a <= e_b and (acc_a > acc_b or e_a < e_b)


def pareto_front(records: Sequence[Mapping], accuracy_key: str) -> list[Mapping]:
  """The non-dominated records, per platform (energies on different devices are not one scale), each platform's
  front sorted by energy."""
  candidates = usable(records, accuracy_key)
  front = []
  for platform in sorted({r["platform"] for r in candidates}):
    group = [r for r in candidates if r["platform"] == platform]
    keep = [r for r in group if not any(dominates(o, r, accuracy_key) for o in group if o is not r)]
    front += sorted(keep, key=lambda r: (r["energy_uj"], -r[accuracy_key]))
  return front


def point_label(record: Mapping, show_platform: bool, show_target: bool) -> str:
  label = f"λ={record['lam']:g}"
  if show_target and record.get("target"):
    label += f" T={record['target']:g}"
  if show_platform:
    label += f" {record['platform']}"
  return label


def plot_front(records: Sequence[Mapping], front: Sequence[Mapping], accuracy_key: str, path: str,
               baselines: Sequence[Mapping] = (), title: str = "") -> None:
  """accuracy vs energy per inference: every member (labelled by λ), the front as a step line per platform,
  and retrained baselines as stars. Log energy axis when the energies span more than LOG_SCALE_SPAN."""
  import matplotlib
  matplotlib.use("Agg")  # files only; never a display
  from matplotlib import pyplot as plt

  points = usable(records, accuracy_key)
  marks = [b for b in baselines if b.get("test_acc") is not None and b.get("energy_uj") is not None]
  platforms = sorted({r["platform"] for r in points} | {b["platform"] for b in marks})
  show_target = len({r.get("target") for r in points}) > 1
  fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for n, platform in enumerate(platforms):
    color = colors[n % len(colors)]
    group = [r for r in points if r["platform"] == platform]
    ax.scatter([r["energy_uj"] for r in group], [100 * r[accuracy_key] for r in group], color=color,
               alpha=0.8, label=f"members ({platform})" if len(platforms) > 1 else "members")
    labels = {}  # members that derived the same network share a point: one label lists all their λ
    for r in group:
      labels.setdefault((r["energy_uj"], 100 * r[accuracy_key]), []).append(
          point_label(r, len(platforms) > 1, show_target))
    for xy, names in labels.items():
      ax.annotate(", ".join(names), xy, textcoords="offset points", xytext=(4, 4), fontsize=7)
    line = [r for r in front if r["platform"] == platform]
    if line:
      ax.step([r["energy_uj"] for r in line], [100 * r[accuracy_key] for r in line], where="post", color=color,
              linewidth=1.5, label=f"Pareto front ({platform})" if len(platforms) > 1 else "Pareto front")
    for b in (b for b in marks if b["platform"] == platform):
      ax.scatter([b["energy_uj"]], [100 * b["test_acc"]], marker="*", s=140, color=color, edgecolor="black")
      ax.annotate(b["name"], (b["energy_uj"], 100 * b["test_acc"]), textcoords="offset points", xytext=(4, -10),
                  fontsize=7)
  if marks:
    ax.scatter([], [], marker="*", s=140, color="white", edgecolor="black", label="baselines (retrained)")
  energies = [r["energy_uj"] for r in points] + [b["energy_uj"] for b in marks]
  if energies and min(energies) > 0 and max(energies) / min(energies) > LOG_SCALE_SPAN:
    ax.set_xscale("log")
  ax.set_xlabel("predicted energy per inference (µJ)")
  ax.set_ylabel(ACCURACY_LABELS.get(accuracy_key, accuracy_key) + " (%)")
  ax.set_title(title or "accuracy vs energy")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


ACCURACY_LABELS = {"val_acc": "supernet validation accuracy", "test_acc": "retrained test accuracy"}


def _fmt(value, spec: str) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "–"
  return format(value, spec)


def summary_markdown(records: Sequence[Mapping], front: Sequence[Mapping], accuracy_key: str,
                     baselines: Sequence[Mapping] = (), notes: Sequence[str] = ()) -> str:
  """A Markdown table of every member (front members marked ★), then the baselines, then notes."""
  on_front = {r["id"] for r in front}
  lines = ["# Sweep summary", "", f"Front drawn on **{ACCURACY_LABELS.get(accuracy_key, accuracy_key)}** against "
           f"predicted energy; ★ = on the Pareto front of its platform.", "",
           "| member | λ | target | platform | arch | val acc | test acc | energy µJ | latency ms | SRAM KiB | "
           "flash KiB | front | status |",
           "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|:-:|---|"]
  for r in sorted(records, key=lambda r: (r["platform"], r.get("target") or 0, r["lam"])):
    lines.append("| " + " | ".join([
        r["id"], f"{r['lam']:g}", _fmt(r.get("target"), "g"), r["platform"], r.get("arch_hash") or "–",
        _fmt(r.get("val_acc"), ".4f"), _fmt(r.get("test_acc"), ".4f"), _fmt(r.get("energy_uj"), ".4g"),
        _fmt(r.get("latency_ms"), ".4g"), _fmt(_kib(r.get("peak_sram_bytes")), ".1f"),
        _fmt(_kib(r.get("flash_bytes")), ".1f"), "★" if r["id"] in on_front else "", r.get("status", "?")]) + " |")
  if baselines:
    lines += ["", "## Baselines (retrained)", "", "| baseline | platform | test acc | energy µJ | latency ms | "
              "SRAM KiB | flash KiB |", "|---|---|---:|---:|---:|---:|---:|"]
    for b in baselines:
      lines.append(f"| {b['name']} | {b['platform']} | {_fmt(b.get('test_acc'), '.4f')} | "
                   f"{_fmt(b.get('energy_uj'), '.4g')} | {_fmt(b.get('latency_ms'), '.4g')} | "
                   f"{_fmt(_kib(b.get('peak_sram_bytes')), '.1f')} | {_fmt(_kib(b.get('flash_bytes')), '.1f')} |")
  if notes:
    lines += [""] + [f"- {n}" for n in notes]
  return "\n".join(lines) + "\n"


def _kib(n):
  return None if n is None else n / 1024
