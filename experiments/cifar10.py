"""CIFAR-10 through TFDS, from a prepared data_dir (no download at run time).

Prepare once on a machine with internet: `tfds build cifar10 --data_dir=/path/to/tfds`, copy the directory, then
`python -m launch.search --config=experiments/cifar10.py --config.data_dir=/path/to/tfds --workdir=runs/c10`.
Meant for a GPU/TPU; on 2 CPU cores one epoch of the search takes a long while.
"""
import ml_collections

from experiments import digits


def get_config():
  c = digits.get_config()
  c.name = "cifar10"
  c.dataset = "tfds:cifar10"
  c.val_fraction = 0.1
  c.space = ml_collections.ConfigDict(dict(
      stem=dict(channels=16, kernel=3, stride=1),
      stages=[dict(layers=1, channels=16, stride=1), dict(layers=2, channels=24, stride=2),
              dict(layers=2, channels=32, stride=2), dict(layers=2, channels=64, stride=2)],
      kernels=(3, 5, 7),
      expansions=(1, 3, 6),
      allow_skip=True,
      gate_group=8,
      channel_divisor=8,
      head_channels=128,
  ))
  c.search.epochs = 50
  c.search.warmup_epochs = 10
  c.search.batch_size = 128
  c.search.relaxation = "gumbel"
  c.weights.lr = 0.1
  c.arch.lr = 3e-3
  c.log_every = 100
  c.checkpoint_every = 500
  if "retrain" in c:
    c.retrain.epochs = 150
    c.retrain.batch_size = 128
    c.retrain.max_shift = 4
  return c
