"""Llama-shaped LM configs at real sizes (configs/lm_*.py), jax-free.

`get_config(size, arg)` builds the config of one size from `SIZES`: the
llama model plug-in (RMSNorm, rotary positions, SwiGLU, grouped-query
attention, untied output layer), bf16 compute over f32 master params, layers
scanned (one compiled block) and rematerialised, every matrix FSDP-sharded
over its group's devices, the teachers in bf16, on `synthetic_lm` data of the
model's vocabulary and context (a real corpus replaces it with
`--config.data.name=...`). Config args: `quick` (the same architecture
family at toy width, runs in seconds on a CPU), `groups=G`.

  python -m codistill_jax.tools.compile_check --config=configs/lm_1b.py \\
      --topology=v5p:4x4x8 --config.codistill.num_groups=2
"""

from codistill_jax import config_lib

# emb_dim, layers, heads, kv heads, mlp (SwiGLU) width, vocabulary; the
# 1B and 8B follow Llama 3.2 1B and Llama 3 8B at a 32k vocabulary.
SIZES = {
    "125m": dict(emb_dim=768, num_layers=12, num_heads=12, num_kv_heads=12,
                 mlp_dim=2048, vocab_size=32000),
    "1b": dict(emb_dim=2048, num_layers=16, num_heads=32, num_kv_heads=8,
               mlp_dim=8192, vocab_size=32000),
    "8b": dict(emb_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8,
               mlp_dim=14336, vocab_size=32000),
    # Gemma-sized vocabulary on the 1B body: where sampled distillation's
    # K-class output layer saves the most.
    "1b_256k": dict(emb_dim=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                    mlp_dim=8192, vocab_size=256000),
}
# Sequences per group's global batch (1M-2M tokens) and their length.
BATCH = {"125m": 512, "1b": 1024, "8b": 1024, "1b_256k": 1024}
SEQ_LEN = 2048


def get_config(size: str, arg=None):
  if size not in SIZES:
    raise ValueError(f"unknown LM size {size!r}; one of {sorted(SIZES)}")
  arg = config_lib.parse_arg(arg, quick=False, groups=1)
  shape = dict(SIZES[size])
  c = config_lib.base_config()
  c.loss = "softmax_xent"
  c.model_name = "llama"
  vocab = shape.pop("vocab_size")
  c.model.update(shape)
  c.model.dtype = "bfloat16"  # Matmuls; norms, softmax and logits are f32.
  c.model.param_dtype = "float32"  # Master params and optimizer state.
  c.model.scan_layers = True  # One compiled block: fast compiles at depth.
  c.model.remat = "full"  # Recompute each block's activations in backward.
  c.model.attention_impl = None  # XLA's; 'cudnn' for flash attention on GPU.
  # Attention in query blocks of 256: a layer's scores at 1/8 of their
  # [L, L] memory (no flash kernel through XLA on TPU); 0 for all at once.
  c.model.attention_chunk = 256

  c.data.name = "synthetic_lm"
  c.data.vocab_size = vocab
  c.data.seq_len = SEQ_LEN
  c.data.num_train = 4096  # Windows held in memory (the chain repeats).
  c.data.num_eval = 512
  c.data.branching = 8
  c.data.batch_size = BATCH[size]
  c.data.eval_batch_size = 512  # Divisible by up to 512 devices per group.

  # FSDP over 'data' for every matrix and its Adam moments; with
  # sharding.model_axis > 1 also Megatron-style tensor parallelism over
  # 'model': attention heads, the MLP's hidden units, and the output layer's
  # input width. (Leading scanned-layers axes are left whole.) The
  # embedding and the output layer split their *vocabulary* over 'data':
  # split along the width, XLA carried that split into the activations and
  # gathered the whole batch on every chip (a 2-layer 125M on v5e:4x4: 133 GB
  # of temporaries per chip instead of 14 GB; the quick LM at a 32k
  # vocabulary: 1.06 GB instead of 38 MB; tests/test_compile_check.py).
  c.sharding.rules = (
      (".*embed/embedding", ("data", None)),
      (".*attn/(query|key|value)/kernel", ("data", "model", None)),
      (".*attn/out/kernel", ("model", None, "data")),
      (".*mlp/(gate|up)/kernel", ("data", "model")),
      (".*mlp/down/kernel", ("model", "data")),
      (".*head/kernel", ("model", "data")),
      (".*", "fsdp"))
  c.sharding.fsdp_min_size = 2**16

  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 3e-4
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 2000
  c.optimizer.weight_decay = 0.1
  c.optimizer.b2 = 0.95
  c.optimizer.grad_clip_norm = 1.0

  c.total_steps = 100_000
  c.log_every = 100
  c.eval_every = 2000
  c.eval_max_batches = 16
  c.checkpoint_every = 2000

  c.codistill.num_groups = arg.groups
  c.codistill.exchange_every = 500
  c.codistill.burn_in_steps = 2000
  c.codistill.teacher_dtype = "bfloat16"

  if arg.quick:
    c.model.update(emb_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   mlp_dim=64)
    c.model.dtype = "float32"  # CPUs run bf16 matmuls slowly.
    c.data.vocab_size = 256
    c.data.seq_len = 16
    c.data.num_train = 512
    c.data.num_eval = 32
    c.data.batch_size = 16
    c.data.eval_batch_size = 16
    c.sharding.fsdp_min_size = 2**10
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 3
    c.total_steps = 10
    c.log_every = 5
    c.eval_every = 10
    c.eval_max_batches = 0
    c.checkpoint_every = 5
    c.codistill.exchange_every = 3
    c.codistill.burn_in_steps = 3
  return c
