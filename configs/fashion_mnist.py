r"""Image classification on Fashion-MNIST (the paper's ImageNet workload).

  python -m codistill_jax.main --config=configs/fashion_mnist.py \
      --workdir=/tmp/fmnist

Needs `apt-get install -y dataset-fashion-mnist` (see docs/codistillation.md).
Args: `groups=G` (codistillation), `quick` (a few steps), `resnet` (small
GroupNorm ResNet instead of the CNN).
"""

import ml_collections

from codistill_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False, resnet=False, groups=1)
  c = config_lib.base_config()
  c.loss = "softmax_xent"

  if arg.resnet:
    c.model_name = "resnet"
    c.model.stage_sizes = (1, 1, 1)
    c.model.width = 16
  else:
    c.model_name = "cnn"
    c.model.features = (32, 64)  # Channels of the two conv blocks.
    c.model.hidden = 128  # Dense layer before the classifier.
    c.model.dropout_rate = 0.1

  c.data.name = "fashion_mnist"
  c.data.path = "/usr/share/datasets/fashion-mnist"  # IDX .gz files.
  c.data.validation_size = 5000  # Held out of the 60k training images.
  c.data.batch_size = 128
  c.data.eval_batch_size = 1000

  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 2e-3
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 1e-4

  c.total_steps = 2000  # ~4.7 epochs of 55k images.
  c.log_every = 100
  c.eval_every = 1000
  c.checkpoint_every = 1000

  c.codistill.num_groups = arg.groups  # `:groups=G` for codistillation.
  c.codistill.exchange_every = 50
  c.codistill.burn_in_steps = 100

  if arg.quick:
    c.model_name = "cnn"
    c.model = ml_collections.ConfigDict(
        {"features": (8,), "hidden": 16, "dropout_rate": 0.1})
    c.data.batch_size = 32
    c.data.eval_batch_size = 1000
    c.optimizer.warmup_steps = 0
    c.total_steps = 10
    # Distils within the quick run's steps: exchange at 3, 6, 9; alpha > 0
    # from step 3 once a peer's params are held.
    c.codistill.exchange_every = 3
    c.codistill.burn_in_steps = 3
    c.log_every = 5
    c.eval_every = 10
    c.checkpoint_every = 5
  return c


def sweep(name=None, quick=False):
  """Sweep points as dicts of dotted overrides (`--config.k=v` flags).

  Args:
    name: None: weight decay of the baseline (experiments/sweep_launch.py).
      'wd': Sodhani et al.'s comparison at equal steps, scaled to CPU: sync
      at batch 2B = 128 vs 2-way codistillation at B = 64 per group, each at
      weight decay 0, 1e-4 (this config's) and 0.1 (adamw's decay is
      multiplied by the learning rate, so 1e-4 barely acts in 600 steps).
      Plus sync at batch B (3 seeds, decay 1e-4).
      'wd_long': the same at 2400 steps (first seed, decay 0 and 0.1).
      Codistilled points need 2 devices: XLA_FLAGS=
      --xla_force_host_platform_device_count=2.
    quick: the points experiments/repro.py --quick runs on `:quick`.
  """
  if name is None:
    return [{"optimizer.weight_decay": wd} for wd in (0.0, 1e-5, 1e-4)]
  if name not in ("wd", "wd_long"):
    raise ValueError(f"unknown sweep {name!r}: None, 'wd' or 'wd_long'")
  b = 16 if quick else 64
  sync = {"data.batch_size": 2 * b}
  codistill = {"data.batch_size": b, "codistill.num_groups": 2,
               "codistill.exchange_blocking": True}
  steps = {} if quick else {"total_steps": 600, "eval_every": 200,
                            "checkpoint_every": 600}
  decays = (0.1,) if quick else (0.0, 1e-4, 0.1)
  seeds = range(1) if quick else range(3)
  if name == "wd_long":
    # Does weight decay bind, and the gap close, when trained 4x longer
    # (~5 epochs of sync)? First seed; adamw decay 0.1 vs none.
    if quick:  # Nothing the 'wd' smoke test does not cover already.
      return []
    long = {"total_steps": 2400, "eval_every": 400, "checkpoint_every": 1200}
    return [{**long, **method, "optimizer.weight_decay": wd, "seed": 0}
            for method, wd in ((sync, 0.1), (codistill, 0.0),
                               (codistill, 0.1), (sync, 0.0))]
  points = [{**steps, **method, "optimizer.weight_decay": wd, "seed": s}
            for s in seeds for wd in decays for method in (sync, codistill)]
  if not quick:
    # Sync at B (one group's batch): what is the peer worth to a group?
    points += [{**steps, "data.batch_size": b, "optimizer.weight_decay": 1e-4,
                "seed": s} for s in seeds]
  return points
