r"""Language model on the Linux kernel docs (the paper's Common Crawl workload).

A decoder-only Transformer over a word vocabulary of `data.vocab_size` built on
the training documents; per-token cross-entropy with padding masked.

  python -m codistill_jax.main --config=configs/kernel_lm.py \
      --workdir=/tmp/lm

Needs `apt-get install -y linux-doc-6.1` (see README). Tokenised data is cached
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
    c.log_every = 5
    c.eval_every = 10
    c.checkpoint_every = 5
  return c


def sweep():
  return [{"data.batch_size": b} for b in (16, 32, 64, 128)]
