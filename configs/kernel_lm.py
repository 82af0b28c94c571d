r"""Language model on the Linux kernel docs (the paper's Common Crawl workload).

A decoder-only Transformer over a word vocabulary of `data.vocab_size` built on
the training documents; per-token cross-entropy with padding masked.

  python -m codistill_jax.main --config=configs/kernel_lm.py \
      --workdir=/tmp/lm

Needs `apt-get install -y linux-doc-6.1` (see docs/codistillation.md). Tokenised data is cached
under ~/.cache/codistill_jax after the first run.
Args: `groups=G` (codistillation), `quick` (a few steps on a few documents).
"""

from codistill_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False, groups=1)
  c = config_lib.base_config()
  c.loss = "softmax_xent"

  c.model_name = "transformer"
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.emb_dim = 128
  c.model.mlp_dim = 512
  c.model.dropout_rate = 0.0

  c.data.name = "kernel_docs"
  c.data.path = "/usr/share/doc/linux-doc-6.1/html/_sources"
  c.data.vocab_size = 8192  # Word types kept (8k-32k is realistic).
  c.data.seq_len = 64  # Tokens per training window.
  c.data.cache_dir = ""  # '' = ~/.cache/codistill_jax.
  c.data.max_files = 0  # 0 = all 3,183 documents.
  c.data.batch_size = 32
  c.data.eval_batch_size = 256

  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 2e-3
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 200
  c.optimizer.weight_decay = 0.01
  c.optimizer.grad_clip_norm = 1.0

  c.total_steps = 2000  # ~1 epoch of the 4.1M training tokens; ~15 min CPU.
  c.log_every = 100
  c.eval_every = 500
  c.checkpoint_every = 500

  c.codistill.num_groups = arg.groups  # `:groups=G` for codistillation.
  c.codistill.exchange_every = 50
  c.codistill.burn_in_steps = 200

  if arg.quick:
    c.model.num_layers = 1
    c.model.emb_dim = 32
    c.model.mlp_dim = 64
    c.model.num_heads = 2
    c.data.vocab_size = 512
    c.data.seq_len = 16
    c.data.max_files = 40
    c.data.batch_size = 16
    c.data.eval_batch_size = 64
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


# The LM of the speed study, scaled to a shared 2-core CPU: 1 layer, width 64,
# 2,048 word types, 32-token windows, 400 documents (~0.5M training tokens).
REPRO_SIZE = {"model.num_layers": 1, "model.emb_dim": 64, "model.mlp_dim": 256,
              "model.num_heads": 2, "data.vocab_size": 2048,
              "data.seq_len": 32, "data.max_files": 400}


def sweep(name=None, quick=False):
  """Sweep points as dicts of dotted overrides (`--config.k=v` flags).

  Args:
    name: None: batch sizes of the baseline (experiments/sweep_launch.py).
      'speed': Anil et al.'s speed claim, scaled (REPRO_SIZE, 1000 steps,
      validation every 50): sync at batch B in {8, 16, 32, 64} and 2-way
      codistillation at B per group for B in {8, 16, 32}, so each
      codistilled point has its sync B and sync 2B; also sync 128 and
      codistillation at 64, and for the first seed codistillation at 64 on
      all the data and SPEED_VARIANTS of the codistilled point at B = 16. Codistilled points need
      2 devices: XLA_FLAGS=--xla_force_host_platform_device_count=2.
    quick: the points experiments/repro.py --quick runs on `:quick`.
  """
  if name is None:
    return [{"data.batch_size": b} for b in (16, 32, 64, 128)]
  if name != "speed":
    raise ValueError(f"unknown sweep {name!r}: None or 'speed'")
  if quick:
    common, syncs, codistills, seeds = {"eval_every": 5}, (8, 16), (8,), [0]
  else:
    common = {**REPRO_SIZE, "total_steps": 1000, "eval_every": 50,
              "checkpoint_every": 500, "optimizer.warmup_steps": 50}
    syncs, codistills, seeds = (8, 16, 32, 64), (8, 16, 32), (0, 1)
  codistill = {"codistill.num_groups": 2, "codistill.exchange_blocking": True}
  points = []
  for s in seeds:
    points += [{**common, "data.batch_size": b, "seed": s} for b in syncs]
    points += [{**common, **codistill, "data.batch_size": b, "seed": s}
               for b in codistills]
    if not quick:
      # Closer to where 2B stops helping (~4x the cost of B=32).
      points += [{**common, "data.batch_size": 128, "seed": s},
                 {**common, **codistill, "data.batch_size": 64, "seed": s}]
    if s == seeds[0] and not quick:
      points += [{**common, **codistill, "data.batch_size": 64,
                  "data.partition": "shared", "seed": s}]
      # Why it does not hold: at B = 16, each group on all the data (is half
      # the data to blame?), a weaker pull, a fresher teacher.
      points += [{**common, **codistill, "data.batch_size": 16, **v, "seed": s}
                 for v in SPEED_VARIANTS]
  return points


# Codistillation variants of the speed study (B = 16, first seed).
SPEED_VARIANTS = ({"data.partition": "shared"}, {"codistill.alpha": 0.25},
                  {"codistill.exchange_every": 10})
