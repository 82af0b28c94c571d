r"""Sampled vs full-softmax distillation: output layer + loss + gradient.

The trainer's own step (`build.train_step`) on a model that is only an output
layer: its
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
  from codistill_jax import build  # pylint: disable=g-import-not-at-top
  from codistill_jax import config_lib  # pylint: disable=g-import-not-at-top
  from codistill_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
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
    # No config file describes this model: a Setup made by hand, on one
    # device, and the step built as the trainer builds its own.
    tx = optax.sgd(1e-3)
    mesh = mesh_lib.make_mesh(jax.devices()[:1])
    repl = mesh_lib.replicated(mesh)
    init_fn = lambda rng, model=model, tx=tx, x=x: step_lib.init_state(
        model, tx, rng, x)
    abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    shardings = jax.tree.map(lambda _: repl, abstract)
    setup = build.Setup(model, tx, lambda step: 1e-3, init_fn,
                        build.with_shardings(abstract, shardings), shardings,
                        {}, x, mesh)
    state = jax.jit(init_fn, out_shardings=shardings)(jax.random.PRNGKey(0))
    tparams = model.init(jax.random.PRNGKey(1), x, train=False)
    teachers = step_lib.Teachers(jax.tree.map(lambda a: a[None], tparams),
                                 jnp.ones((1,)))
    layout = build.Layout(distills=True, teacher=model, args=(
        build.with_shardings(jax.eval_shape(lambda t=teachers: t), repl),))

    def compiled(num_samples, setup=setup, layout=layout, state=state,
                 batch=batch, teachers=teachers):
      config = config_lib.base_config()
      config.loss, config.codistill.num_groups = "softmax_xent", 2
      config.codistill.sampled.num_samples = num_samples
      fn = build.train_step(config, setup, layout)
      return fn.lower(state, batch, teachers).compile()

    def timed(step_fn, state=state, batch=batch, teachers=teachers):
      # The step donates its state: each call takes the one before's.
      holder = [jax.tree.map(jnp.copy, state)]

      def one():
        holder[0], m = step_fn(holder[0], batch, teachers)
        return m["loss"]

      jax.block_until_ready(one())  # Warm up.
      return bench_lib.median_time(one, _STEPS.value)

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
