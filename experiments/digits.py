"""The embedded default: search on scikit-learn's handwritten digits (8x8x1, 10 classes) for the default platform.

Sized so that search + derive finishes within 3 minutes on 2 CPU cores (111 s measured with an empty compile
cache), and the whole pipeline within 10 (265 s).
Override any field from the command line, e.g. `--config.cost.lam=0.3 --config.search.relaxation=softmax`.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "digits"
  c.seed = 0  # initialisation and batch order
  c.data_seed = 0  # the validation split, kept apart from `seed` so seed sweeps share one split
  c.dataset = "digits"
  c.data_dir = ""  # only for tfds:<name> datasets
  c.image_size = 0  # 0: keep the dataset's size
  c.channels = 0  # 0: keep; 1 or 3 converts grey/RGB (streamed image datasets: vww, folder:, tfds_stream:)
  c.val_fraction = 0.2  # of the training data, held out for the architecture step

  c.space = ml_collections.ConfigDict(dict(
      stem=dict(channels=16, kernel=3, stride=1),
      stages=[dict(layers=2, channels=16, stride=1), dict(layers=2, channels=32, stride=2)],
      kernels=(3, 5, 7),
      expansions=(1, 3, 6),
      allow_skip=True,
      gate_group=4,  # expanded channels per channel gate
      channel_divisor=4,  # derived channel counts are rounded up to a multiple of this
      head_channels=0,
  ))

  c.search = ml_collections.ConfigDict(dict(
      relaxation="gumbel",  # softmax | gumbel | sigmoid
      weight_sharing="independent",  # independent: own weights per candidate | entangled: a slot's share a core
      epochs=30,
      warmup_epochs=8.0,  # fractional epochs allowed
      batch_size=64,
      max_steps=0,  # > 0 caps the number of steps (smoke tests)
      arch_every=1,  # after the warm-up, an α step every this many weight steps (1: DARTS's alternation)
      second_order=False,
      tau_max=5.0,
      tau_min=0.5,
      zero_one_weight=10.0,  # FairDARTS regulariser, sigmoid relaxation only
  ))
  # lr 0.1: at 0.05 the λ=0 supernet plateaued at 89% validation accuracy in 30 epochs; 0.1 reaches 96.5%.
  c.weights = ml_collections.ConfigDict(dict(optimizer="sgd", lr=0.1, lr_min=1e-3, momentum=0.9,
                                             weight_decay=3e-4, grad_clip=5.0))
  # weight_decay is on α only; the gate logits have their own (0: decay toward logit 0, 83% open, kept every gate
  # of a KWS search open against a cost gradient 7,000 times smaller; see edgenas/optim.py).
  c.arch = ml_collections.ConfigDict(dict(lr=0.05, b1=0.5, b2=0.999, weight_decay=1e-3, gate_weight_decay=0.0))

  c.cost = ml_collections.ConfigDict(dict(
      model="energy",  # energy | latency | macs
      platform="stm32l4r5_tflm",
      penalty="additive",  # none | additive | mnas (CE·(E/T)^β) | target
      lam=0.1,  # the pipeline default: a quarter of λ=0's derived energy (821 vs 3293 µJ), no accuracy lost
      target=0.0,  # cost target T for the mnas/target penalties, in the cost model's unit
      beta=0.6,
      memory_weight=0.0,
      memory_budget=0,  # bytes of peak SRAM; 0 disables the memory hinge
  ))

  # Retraining a derived network (and the baselines) from scratch: edgenas.train / launch/retrain.py.
  c.retrain = ml_collections.ConfigDict(dict(
      epochs=30,
      batch_size=64,
      optimizer="sgd",  # sgd (Nesterov) | adamw
      lr=0.1,
      lr_min_ratio=0.0,  # cosine decays to lr * lr_min_ratio
      momentum=0.9,
      warmup_epochs=2,
      weight_decay=5e-5,  # on conv/dense kernels only
      label_smoothing=0.1,
      ema_decay=0.0,  # EMA of the weights for evaluation and export; 0 = off
      max_shift=1,  # random shifts of up to this many pixels
      flip=True,  # only used when the dataset is flip-invariant (digits is not)
      use_val=True,  # train on train + the search's validation split
      qat_epochs=5,  # the last epochs run quantization-aware (int8 fake quant); 0 = off
      qat_lr=5e-4,  # QAT fine-tunes with BN frozen: a far smaller rate, cosine-decayed to 0
      platforms=(),  # platforms priced in report.json; empty: cost.platform
  ))
  c.baselines = ("mobilenetv2_1.0", "mobilenetv2_0.35", "dscnn")

  c.checkpoint_every = 100
  c.keep_checkpoints = 3
  c.log_every = 50
  return c
