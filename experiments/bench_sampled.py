r"""Sampled vs full-softmax distillation: output layer + loss + gradient.

The real `step.make_train_step` on a model that is only an output layer: its
"trunk output" is a parameter h [N, d] (so the gradient into the trunk is
computed, as in training), followed by the untied head [d, V]. One peer
teacher (2-way codistillation) of the same shape. For each V and K, side by
side in one run:

  full     teacher head + softmax, student head + softmax, KL + task
           cross-entropy, gradient, SGD update;
  sampled  the same with `codistill.sampled` (K shared classes + each label,
           'dynamic' proposal from `proposal_positions` positions).

Reports the median step time, the speed-up full / sampled, and XLA's
estimate of peak temporary memory of each compiled step
(`memory_analysis().temp_size_in_bytes`).

  python experiments/bench_sampled.py [--vocab=8192,32768,131072] \
      [--num_samples=256,1024] [--positions=2048] [--dim=128]

Writes experiments/results/bench_sampled.json.
"""

import os
import sys

from absl import app
from absl import flags

_VOCAB = flags.DEFINE_list("vocab", ["8192", "32768", "131072"], "V values.")
_K = flags.DEFINE_list("num_samples", ["256", "1024"], "K values.")
_N = flags.DEFINE_integer("positions", 2048, "Positions per batch (32 x 64, "
                          "the kernel_lm default).")
_D = flags.DEFINE_integer("dim", 128, "Hidden size (kernel_lm default).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per measurement.")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_sampled.json",
                           "Output JSON.")


def main(argv):
  del argv
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import bench_lib  # pylint: disable=g-import-not-at-top
  from codistill_jax import distill as distill_lib  # pylint: disable=g-import-not-at-top
  from codistill_jax import losses  # pylint: disable=g-import-not-at-top
  from codistill_jax import sampling  # pylint: disable=g-import-not-at-top
  from codistill_jax import step as step_lib  # pylint: disable=g-import-not-at-top

  n, d = _N.value, _D.value

  class Head(nn.Module):
    """h (a parameter standing in for the trunk's output) -> head."""
    vocab: int

    def setup(self):
      self.h = self.param("h", nn.initializers.normal(1.0), (n, d))
      self.head = nn.Dense(self.vocab)

    def hidden(self, x, train):
      del train
      return self.h + 0 * x[:, None]  # x: [n] dummy inputs.

    def __call__(self, x, train):
      return self.head(self.hidden(x, train))

    @staticmethod
    def output_embedding(params):
      p = params["params"]["head"]
      return p["kernel"], p["bias"]

  results = []
  for vocab in map(int, _VOCAB.value):
    model = Head(vocab)
    x = jnp.zeros((n,), jnp.float32)
    rng = np.random.default_rng(0)
    batch = {"inputs": x,
             "labels": jnp.asarray(rng.integers(0, vocab, n), jnp.int32),
             "weights": jnp.ones((n,), jnp.float32)}
    tx = optax.sgd(1e-3)
    state = step_lib.init_state(model, tx, jax.random.PRNGKey(0), x)
    tparams = model.init(jax.random.PRNGKey(1), x, train=False)
    teachers = step_lib.Teachers(jax.tree.map(lambda a: a[None], tparams),
                                 jnp.ones((1,)))
    loss_fn = step_lib.make_loss_fn(losses.task_loss("softmax_xent"))
    hidden = lambda p, x, train=False, rngs=None, m=model: m.apply(
        p, x, train=train, method="hidden")

    def compiled(num_samples, model=model, hidden=hidden, loss_fn=loss_fn,
                 tx=tx, state=state, batch=batch, teachers=teachers):
      sampled = None
      if num_samples:
        sampled = sampling.SampledHead(
            hidden_fn=hidden, output_embedding=model.output_embedding,
            teacher_hidden_fn=hidden,
            teacher_output_embedding=model.output_embedding,
            num_samples=num_samples)
      alpha = losses.alpha_schedule(1.0, 0)
      distill = (distill_lib.Sampled(sampled, alpha) if sampled else
                 distill_lib.Dense(model.apply, alpha))
      fn = jax.jit(step_lib.make_train_step(model.apply, loss_fn, tx,
                                            distill=distill))
      return fn.lower(state, batch, teachers).compile()

    def timed(step_fn, state=state, batch=batch, teachers=teachers):
      jax.block_until_ready(step_fn(state, batch, teachers))  # Warm up.
      return bench_lib.median_time(lambda: step_fn(state, batch, teachers),
                                   _STEPS.value)

    full = compiled(0)
    full_mem = full.memory_analysis().temp_size_in_bytes
    for k in map(int, _K.value):
      samp = compiled(k)
      # Interleave so that drift on a shared machine hits both alike.
      t_full, t_samp = [], []
      for _ in range(3):
        t_full.append(timed(full))
        t_samp.append(timed(samp))
      row = {
          "vocab": vocab, "num_samples": k, "positions": n, "dim": d,
          "full_ms": 1e3 * float(np.median(t_full)),
          "sampled_ms": 1e3 * float(np.median(t_samp)),
          "full_temp_mib": full_mem / 2**20,
          "sampled_temp_mib": samp.memory_analysis().temp_size_in_bytes /
                              2**20,
      }
      row["speedup"] = row["full_ms"] / row["sampled_ms"]
      row["memory_ratio"] = row["full_temp_mib"] / row["sampled_temp_mib"]
      results.append(row)
      print(f"V={vocab:>6} K={k:>4}: full {row['full_ms']:8.1f} ms "
            f"({row['full_temp_mib']:7.0f} MiB)  sampled "
            f"{row['sampled_ms']:7.1f} ms ({row['sampled_temp_mib']:5.0f} "
            f"MiB)  speed-up {row['speedup']:5.1f}x  memory "
            f"{row['memory_ratio']:5.1f}x", flush=True)
  bench_lib.write_json(_OUT.value, {
      "device": str(jax.devices()[0].device_kind),
      "cpu_count": os.cpu_count(), "results": results})


if __name__ == "__main__":
  app.run(main)
