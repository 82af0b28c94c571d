r"""Llama-shaped LMs at real sizes: 125M, 1B, 8B, and the 1B at a 256k vocabulary.

The llama model plug-in (RMSNorm, rotary positions, SwiGLU, grouped-query
attention, untied output layer), bf16 compute over f32 master params, layers
scanned (one compiled block) and rematerialised, every matrix FSDP-sharded
over its group's devices, the teachers in bf16, on `synthetic_lm` data of the
model's vocabulary and context (a real corpus replaces it with
`--config.data.name=...`). Compile one group's step for a TPU slice:

  python -m codistill_jax.tools.compile_check \
      --config=configs/lm.py:size=1b,groups=2 --topology=v5p:4x4x8

Config args:
  size=125m|1b|8b|1b_256k  the shape (`SIZES`); 125m when not given, the
                           smallest, which fits one accelerator.
  quick                    the same architecture family at toy width, depth,
                           vocabulary and batch (the same for every size):
                           runs in seconds on a CPU.
  groups=G                 codistilling groups (1: the data-parallel baseline).
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


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="125m", quick=False, groups=1)
  if arg.size not in SIZES:
    raise config_lib.ConfigError(
        f"config arg size={arg.size!r} is unknown; known: {list(SIZES)}")
  shape = dict(SIZES[arg.size])
  c = config_lib.base_config()
  c.loss = "softmax_xent"  # Next-token cross-entropy.
  c.model_name = "llama"  # codistill_jax/models/llama.py.
  vocab = shape.pop("vocab_size")
  c.model.update(shape)  # The shape above: width, depth, heads, MLP width.
  c.model.dtype = "bfloat16"  # Matmuls; norms, softmax and logits are f32.
  c.model.param_dtype = "float32"  # Master params and optimizer state.
  c.model.scan_layers = True  # One compiled block: fast compiles at depth.
  c.model.remat = "full"  # Recompute each block's activations in backward.
  c.model.attention_impl = None  # XLA's; 'cudnn' for flash attention on GPU.
  # Attention in query blocks of 256: a layer's scores at 1/8 of their
  # [L, L] memory (no flash kernel through XLA on TPU); 0 for all at once.
  c.model.attention_chunk = 256

  c.data.name = "synthetic_lm"  # A Markov chain of the model's vocabulary.
  c.data.vocab_size = vocab  # The model's output classes.
  c.data.seq_len = SEQ_LEN  # Tokens per window.
  c.data.num_train = 4096  # Windows held in memory (the chain repeats).
  c.data.num_eval = 512  # Held-out windows.
  c.data.branching = 8  # Successors per token: the chain's entropy.
  c.data.batch_size = BATCH[arg.size]  # Per group.
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
  c.sharding.fsdp_min_size = 2**16  # Smaller arrays stay replicated.

  c.optimizer.name = "adamw"  # Decoupled weight decay.
  c.optimizer.learning_rate = 3e-4  # Peak, after the warmup.
  c.optimizer.schedule = "cosine"  # Decays to 0 at total_steps.
  c.optimizer.warmup_steps = 2000  # Linear from 0.
  c.optimizer.weight_decay = 0.1
  c.optimizer.b2 = 0.95  # Adam's second-moment decay, as LLM recipes use.
  c.optimizer.grad_clip_norm = 1.0  # Global norm.

  c.total_steps = 100_000  # At 1M-2M tokens a step: 0.1T-0.2T per group.
  c.log_every = 100  # Train metrics and a progress line.
  c.eval_every = 2000  # Validation eval.
  c.eval_max_batches = 16  # 0 = the whole eval set.
  c.checkpoint_every = 2000  # Own checkpoint.

  c.codistill.num_groups = arg.groups  # G; 1 is the data-parallel baseline.
  c.codistill.exchange_every = 500  # Steps between checkpoint exchanges.
  c.codistill.burn_in_steps = 2000  # No distillation before this step.
  c.codistill.teacher_dtype = "bfloat16"  # Peer params for their forward.

  if arg.quick:
    c.model.update(emb_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   mlp_dim=64)  # Toy width and depth, the same family.
    c.model.dtype = "float32"  # CPUs run bf16 matmuls slowly.
    # A few steps of small windows, every cadence hit at least once: the
    # exchange and burn-in (3), a log and a checkpoint (5), eval (10).
    c.data.vocab_size = 256
    c.data.seq_len = 16
    c.data.num_train = 512
    c.data.num_eval = 32
    c.data.batch_size = 16
    c.data.eval_batch_size = 16
    c.sharding.fsdp_min_size = 2**10  # So that the toy matrices shard too.
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
