"""A tiny search on digits for tests and smoke runs: seconds, not minutes. Not meant to find a good network."""
from experiments import digits


def get_config():
  c = digits.get_config()
  c.name = "tiny"
  c.space.stem.channels = 8
  c.space.stages = [dict(layers=1, channels=8, stride=1), dict(layers=1, channels=16, stride=2)]
  c.space.kernels = (3, 5)
  c.space.expansions = (1, 3)
  c.search.epochs = 1
  c.search.warmup_epochs = 0
  c.search.batch_size = 32
  c.search.max_steps = 12
  c.checkpoint_every = 4
  c.log_every = 4
  return c
