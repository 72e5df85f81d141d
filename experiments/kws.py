"""Keyword spotting, MLPerf Tiny's task: 12 classes (ten words, silence, unknown) from 1 s of 16 kHz audio.

The input is the MLPerf Tiny KWS front-end's 49x10 MFCC map (30 ms windows every 20 ms, 40 mel bins, 10
coefficients; `edgenas.audio`). The default data is the embedded set synthesised with espeak-ng on first use and
cached (`edgenas.kws`; no download); `--config.dataset=tfds:speech_commands --config.data_dir=DIR` reads Speech
Commands v0.02 prepared with TFDS instead.

The space starts with DS-CNN's 10x4 stem (stride 2: 25x5 maps) and searches two stages of inverted-residual
blocks, with kernels square and tall (7x3: longer in time than in frequency), the second stage halving time only.
Override any field from the command line, e.g. `--config.cost.lam=0.3`.
"""
import ml_collections

from experiments import digits


def get_config():
  c = digits.get_config()
  c.name = "kws"
  c.dataset = "kws"
  c.data_dir = ""  # kws: the cache's parent (default ~/.cache/edgenas/datasets); tfds:speech_commands: the TFDS dir
  c.val_fraction = 0.1

  c.space = ml_collections.ConfigDict(dict(
      stem=dict(channels=32, kernel=(10, 4), stride=2),
      stages=[dict(layers=2, channels=32, stride=1), dict(layers=2, channels=64, stride=(2, 1))],
      kernels=(3, 5, (7, 3)),
      expansions=(1, 3, 6),
      allow_skip=True,
      gate_group=8,
      channel_divisor=8,
      head_channels=0,
  ))
  # Entangled candidates: with a weight set of its own per candidate, one Gumbel path per step trained a tenth of a
  # layer, and the supernet reached 53.5% validation accuracy in 12 epochs (λ 0.03, the pipeline_kws.json before
  # this config); sharing one core per layer, 65.0% in 7 (benchmarks/results/pipeline_kws.json). An α step every
  # second weight step after 2 warm-up epochs makes the search about half as long as the 12 epochs it was.
  c.search.weight_sharing = "entangled"
  c.search.epochs = 7
  c.search.warmup_epochs = 2.0
  c.search.arch_every = 2
  c.search.batch_size = 64
  c.cost.lam = 0.1  # entangled: λ = 0.03 derives a 4.4 M-MAC network, dearer than DS-CNN; 0.1 one of 1.9-2.5 M

  c.retrain.epochs = 10
  c.retrain.max_shift = 0  # pixel shifts make no sense on MFCCs; the embedded set is time-shifted when made
  c.retrain.flip = False
  c.retrain.qat_epochs = 3
  c.baselines = ("dscnn",)  # MLPerf Tiny's reference; add "mobilenetv2_0.35" (about 4 more minutes)
  return c
