#!/usr/bin/env bash
# The search-speed figures on one GPU (issue "Search speed"), in under 8 minutes: the search step of every
# relaxation at CIFAR (32x32x3) and visual-wake-words (96x96x3) sizes, float32 and bfloat16, images/s, the
# vectorised sweep with 8 members stepping at once (one vmap), and peak device memory per row.
#
#   bash benchmarks/gpu.sh            # writes benchmarks/results/gpu.json and prints it
#
# JAX must see the GPU (`pip install -U "jax[cuda12]"`; on a machine without a network, install that wheel set
# from a local directory with `pip install --no-index --find-links DIR "jax[cuda12]"`). On the CPU the same
# rows take hours: use benchmarks/search_step.py with --configs digits there.
set -euo pipefail
cd "$(dirname "$0")/.."
backend=$(python3 -c "import jax; print(jax.default_backend())")
if [ "$backend" = "cpu" ]; then
  echo "benchmarks/gpu.sh: JAX sees no GPU or TPU (backend: cpu); install jax[cuda12] on a GPU machine" >&2
  exit 2
fi
start=$(date +%s)
python3 -m benchmarks.search_step --configs cifar,vww96 --dtypes float32,bfloat16 \
  --relaxations softmax,gumbel,sigmoid --population 8 --steps 5 --out benchmarks/results/gpu.json
echo "{\"gpu_sh_wall_s\": $(( $(date +%s) - start ))}"
