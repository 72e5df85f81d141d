"""Writes edgenas/energy/platforms/efr32mg24_mvp_layers.csv from Silicon Labs' published device profiles.

Silicon Labs' MLTK documents, in each model-zoo module's docstring, the output of
`mltk profile <model> --device --accelerator MVP`: the model run on a physical EFR32xG24 (Cortex-M33 at 78 MHz
with the MVP accelerator), one row per layer with the accelerator's and the CPU's cycle counters and the layer's
time. Those measurements are what `edgenas.energy.accelerator` fits its MVP cost model to; this script only
transcribes them (parsing is `edgenas.energy.accelerator.parse_device_profile`), keeping for every row the file
and the commit it came from.

Needs a git clone of github.com/SiliconLabs/mltk (no network at run time: clone it where you have one and pass
the path; a bare clone works):

    python scripts/import_mvp_layers.py --mltk_git=/path/to/mltk[.git] [--out=...]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edgenas.energy import accelerator  # noqa: E402

MARKER = "--device --accelerator MVP"


def _git(repo: str, *args: str) -> str:
  return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True, text=True).stdout


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mltk_git", required=True, help="a clone (bare or not) of SiliconLabs/mltk")
  parser.add_argument("--out", default=accelerator.default_layers_path())
  args = parser.parse_args()
  try:
    head = _git(args.mltk_git, "rev-parse", "HEAD").strip()
    files = _git(args.mltk_git, "grep", "-l", "-F", "-e", MARKER, "HEAD", "--", "mltk/models/*.py").split()
  except (OSError, subprocess.CalledProcessError) as e:
    print(f"error: {args.mltk_git} is not a readable git clone of SiliconLabs/mltk ({e})", file=sys.stderr)
    return 1
  rows = []
  for name in sorted(f.split(":", 1)[1] for f in files):
    text = _git(args.mltk_git, "show", f"HEAD:{name}")
    commit = _git(args.mltk_git, "log", "-1", "--format=%H", "HEAD", "--", name).strip()
    model = os.path.splitext(os.path.basename(name))[0]
    layers = accelerator.parse_device_profile(text[text.index(MARKER):], model,
                                              source=f"SiliconLabs/mltk@{commit}:{name}")
    print(f"{model}: {len(layers)} layers")
    rows.extend(layers)
  accelerator.write_layers(args.out, rows, header=f"transcribed from SiliconLabs/mltk (HEAD {head}) by "
                                                   "scripts/import_mvp_layers.py")
  print(f"wrote {len(rows)} measured layers to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
