"""The CIFAR-sized search step, edgenas (JAX) against our own PyTorch implementation of the same supernet and step.

  python -m benchmarks.torch_reference [--steps 3] [--relaxations softmax,sigmoid] [--modes eager,compile]
      [--out benchmarks/results/torch_reference.json]

The supernet is built from edgenas's own search-space description (`benchmarks.search_step.CIFAR_SPACE`: 32x32x3,
batch 64, a 16-channel stem, 4 searchable layers of 9 MBConv candidates k{3,5,7} x e{1,3,6} plus skip), so both
sides run the same candidates, channel gates and batch-statistics BatchNorm:
- candidate: [1x1 expand, BN, ReLU6], depthwise kh x kw (TF "SAME" padding), BN, ReLU6, x channel gates
  (hard-concrete samples, one per 4 expanded channels), 1x1 project, BN, + input when the shapes allow;
- a layer's output: Σ_j w_j · candidate_j(x), w = softmax(α) or sigmoid(α);
- weight step: cross-entropy on a train batch, gradients for the weights only, global-norm clip, L2,
  Nesterov SGD;
- architecture step: cross-entropy on a validation batch + λ·expected cost (a linear cost per candidate, scaled
  by its gates' open probability; negligible work on either side), gradients for α and the gate logits only,
  Adam (β1 0.5).

Every measurement runs in its own child process of this one, one after another, so JAX and PyTorch see the same
machine and load. PyTorch is a benchmark-only dependency (`pip install torch==2.13.0`, CPU build); edgenas never
imports it. Prints one JSON object and writes it to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

from benchmarks import results_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _space():
  from benchmarks.search_step import CIFAR_SPACE
  from edgenas import space as space_lib
  return space_lib.SearchSpace.from_config(dict(CIFAR_SPACE, input_shape=(32, 32, 3), num_classes=10))


def measure_torch(relaxation: str, mode: str, steps: int) -> dict:
  """Runs in the child process."""
  import numpy as np
  import torch
  import torch.nn.functional as F
  from torch import nn
  from edgenas.nn import supernet as sn  # the hard-concrete constants and the gate layout, not its JAX code
  from edgenas.nn.depthwise import same_padding

  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  space = _space()

  def same_pad(x, kh, kw, sh, sw):
    """TensorFlow's SAME padding (extra row/column at the end), as TFLite and edgenas use."""
    _, top, bottom = same_padding(x.shape[2], kh, sh)
    _, left, right = same_padding(x.shape[3], kw, sw)
    return F.pad(x, (left, right, top, bottom))

  class BatchStatNorm(nn.Module):
    def __init__(self, c):
      super().__init__()
      self.scale, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x):
      return F.batch_norm(x, None, None, self.scale, self.bias, training=True, eps=1e-3)

  class MBConv(nn.Module):
    def __init__(self, cin, cout, kernel, expansion, stride, residual, gate_group):
      super().__init__()
      self.hidden = cin * expansion
      self.expand = nn.Conv2d(cin, self.hidden, 1, bias=False) if expansion != 1 else None
      self.expand_bn = BatchStatNorm(self.hidden) if expansion != 1 else None
      self.kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
      self.stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
      self.dw = nn.Conv2d(self.hidden, self.hidden, self.kernel, self.stride, groups=self.hidden, bias=False)
      self.dw_bn = BatchStatNorm(self.hidden)
      self.project = nn.Conv2d(self.hidden, cout, 1, bias=False)
      self.project_bn = BatchStatNorm(cout)
      self.residual, self.gate_group, self.gated = residual, gate_group, expansion != 1

    def forward(self, x, gate):
      h = x
      if self.expand is not None:
        h = F.relu6(self.expand_bn(self.expand(h)))
      h = F.relu6(self.dw_bn(self.dw(same_pad(h, *self.kernel, *self.stride))))
      if self.gated:
        h = h * gate.repeat_interleave(self.gate_group)[:self.hidden].view(1, -1, 1, 1)
      h = self.project_bn(self.project(h))
      return h + x if self.residual else h

  class Supernet(nn.Module):
    def __init__(self):
      super().__init__()
      cin = space.input_shape[-1]
      k = space.stem_kernel if isinstance(space.stem_kernel, int) else space.stem_kernel[0]
      self.stem = nn.Conv2d(cin, space.stem_channels, k, space.stem_stride, padding="same", bias=False)
      self.stem_bn = BatchStatNorm(space.stem_channels)
      self.layers = nn.ModuleList()
      self.gate_slices = []
      offset = 0
      for slot in space.slots():
        cands, slices = nn.ModuleList(), []
        for c in slot.candidates:
          if c.op == "skip":
            cands.append(nn.Identity())
            slices.append(None)
            continue
          cands.append(MBConv(slot.in_channels, slot.out_channels, c.kernel, c.expansion, slot.stride,
                              slot.residual_ok, space.gate_group))
          n = sn.n_gate_groups(slot, c, space.gate_group)
          slices.append((offset, n))
          offset += n
        self.layers.append(cands)
        self.gate_slices.append(slices)
      self.n_gates = offset
      self.classifier = nn.Linear(space.stages[-1][1], space.num_classes)

    def forward(self, x, alphas, gates):
      x = F.relu6(self.stem_bn(self.stem(x)))
      for cands, slices, a in zip(self.layers, self.gate_slices, alphas):
        w = torch.softmax(a, 0) if relaxation == "softmax" else torch.sigmoid(a)
        out = 0
        for j, (cand, sl) in enumerate(zip(cands, slices)):
          y = cand(x) if sl is None else cand(x, gates[sl[0]:sl[0] + sl[1]])
          out = out + w[j] * y
        x = out
      return self.classifier(x.mean((2, 3)))

  net = Supernet()
  alphas = [torch.zeros(len(s.candidates), requires_grad=True) for s in space.slots()]
  gate_logits = torch.full((net.n_gates,), sn.GATE_INIT_LOGIT, requires_grad=True)
  # A linear cost per candidate (its MACs, normalised): the expected cost the architecture step sees.
  cand_cost = [torch.tensor([float(s.in_h * s.in_w * s.in_channels * max(c.expansion, 1)) if c.op != "skip"
                             else 0.0 for c in s.candidates]) / 1e6 for s in space.slots()]

  def gate_sample(logits):
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + logits) / sn.HC_BETA)
    return (s * (sn.HC_ZETA - sn.HC_GAMMA) + sn.HC_GAMMA).clamp(0.0, 1.0)

  model = torch.compile(net) if mode == "compile" else net
  w_opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=3e-4)
  a_opt = torch.optim.Adam(alphas + [gate_logits], lr=0.05, betas=(0.5, 0.999))
  rng = np.random.default_rng(0)
  bs = 64
  shape = (bs, space.input_shape[-1], *space.input_shape[:2])
  train = (torch.tensor(rng.random(shape), dtype=torch.float32), torch.tensor(rng.integers(0, 10, bs)))
  val = (torch.tensor(rng.random(shape), dtype=torch.float32), torch.tensor(rng.integers(0, 10, bs)))

  def weight_step():
    with torch.no_grad():
      gates = gate_sample(gate_logits)
    loss = F.cross_entropy(model(train[0], [a.detach() for a in alphas], gates), train[1])
    w_opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(net.parameters(), 5.0)
    w_opt.step()

  def arch_step():
    gates = gate_sample(gate_logits)
    ce = F.cross_entropy(model(val[0], alphas, gates), val[1])
    open_prob = torch.sigmoid(gate_logits - sn.HC_BETA * math.log(-sn.HC_GAMMA / sn.HC_ZETA)).mean()
    probs = [torch.softmax(a, 0) if relaxation == "softmax" else torch.sigmoid(a) for a in alphas]
    cost = sum((p * c).sum() for p, c in zip(probs, cand_cost)) * open_prob
    grads = torch.autograd.grad(ce + 0.1 * cost, alphas + [gate_logits])  # α and gates only, not the weights
    for a, g in zip(alphas, grads):
      a.grad = g + 1e-3 * a.detach()  # weight decay on α only, as edgenas.optim.arch_optimizer
    gate_logits.grad = grads[-1]
    a_opt.step()

  t0 = time.perf_counter()
  arch_step()
  weight_step()  # the first pair: torch.compile's compilation happens here
  first_s = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    arch_step()
    weight_step()
    times.append(time.perf_counter() - t0)
  ms = 1000 * float(np.median(times))
  return dict(framework="pytorch", torch=torch.__version__, mode=mode, relaxation=relaxation, batch_size=bs,
              threads=torch.get_num_threads(), first_pair_s=round(first_s, 2), ms_per_step_pair=round(ms, 1),
              peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))


def _child(args: list[str]) -> dict:
  out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, EDGENAS_JAX_CACHE=""))
  if out.returncode:
    raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--relaxations", default="softmax,sigmoid")
  p.add_argument("--modes", default="eager,compile", help="PyTorch modes: eager, compile (torch.compile)")
  p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "torch_reference.json"))
  p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print(json.dumps(measure_torch(args.child[0], args.child[1], args.steps)))
    return
  try:
    import torch  # noqa: F401  (only to fail early, with the install line)
  except ImportError:
    raise SystemExit("benchmarks.torch_reference needs PyTorch: pip install torch==2.13.0 (CPU build)")
  rows, ratios = [], {}
  for relax in args.relaxations.split(","):
    jax_row = _child(["benchmarks.search_step", "--child", "cifar", relax, "float32", "0", "--steps",
                      str(args.steps)])
    jax_row["framework"] = "jax (edgenas)"
    rows.append(jax_row)
    print(json.dumps(jax_row), file=sys.stderr)
    for mode in args.modes.split(","):
      row = _child(["benchmarks.torch_reference", "--child", relax, mode, "--steps", str(args.steps)])
      rows.append(row)
      print(json.dumps(row), file=sys.stderr)
      ratios[f"{relax}: pytorch {mode} / edgenas"] = round(row["ms_per_step_pair"] / jax_row["ms_per_step_pair"],
                                                            2)
  result = dict(benchmark="torch_reference", config="cifar (benchmarks.search_step.CIFAR_SPACE), batch 64",
                cpu_count=os.cpu_count(), load_avg_1m_at_end=os.getloadavg()[0], rows=rows,
                speedup_of_edgenas=ratios, target="edgenas >= 2x faster than PyTorch eager (softmax, sigmoid)",
                note="each row in its own child process of one run, one after another; median of --steps pairs "
                     "after one warm-up pair (which holds torch.compile's compilation)")
  results_file.write(args.out, result)


if __name__ == "__main__":
  main()
