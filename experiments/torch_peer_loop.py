r"""The online-distillation loop a PyTorch user would write, for comparison.

Two copies of the 784-512-512-10 MLP (experiments/bench_models/mlp.py's
shapes, PyTorch's default init), each on its own disjoint half of
Fashion-MNIST's training images, batch 128, Adam at 1e-3, in one process
with `torch.set_num_threads(--threads)`. Every `--every` steps each copy
snapshots its peer's weights (a frozen `deepcopy`: the stale teacher), and
its loss is cross-entropy plus KL(teacher || student), as codistill_jax's
main loop computes it. A step is one update of each copy, like one step of
the trainer holding both groups.

  pip install torch==2.13.0   # the CPU wheel; not a dependency of the package
  python experiments/torch_peer_loop.py [--steps=1000] [--threads=2]

Prints (and with --json writes) the steady steps/s: the median over windows
of 50 steps after the first 100.
"""

import copy
import json
import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

_STEPS = flags.DEFINE_integer("steps", 1000, "Steps (each copy updated).")
_THREADS = flags.DEFINE_integer("threads", 2, "torch.set_num_threads.")
_EVERY = flags.DEFINE_integer("every", 50, "Steps between teacher snapshots.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Per copy.")
_PATH = flags.DEFINE_string("path", "/usr/share/datasets/fashion-mnist",
                            "Fashion-MNIST IDX files.")
_JSON = flags.DEFINE_string("json", None, "Also write the result here.")


def images():
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))
  from codistill_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
  x = fashion_mnist.read_idx(os.path.join(_PATH.value,
                                          "train-images-idx3-ubyte.gz"),
                             fashion_mnist._IMAGES_MAGIC)  # pylint: disable=protected-access
  y = fashion_mnist.read_idx(os.path.join(_PATH.value,
                                          "train-labels-idx1-ubyte.gz"),
                             fashion_mnist._LABELS_MAGIC)  # pylint: disable=protected-access
  return x.reshape(len(x), -1).astype(np.float32) / 255.0, y.astype(np.int64)


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(_THREADS.value)
  torch.manual_seed(0)
  x, y = images()
  halves = np.array_split(np.random.default_rng(0).permutation(len(x)), 2)
  models = [nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512),
                          nn.ReLU(), nn.Linear(512, 10)) for _ in range(2)]
  opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]
  teachers = [None, None]
  rng = np.random.default_rng(1)
  # Each copy walks its half in a fresh random order per epoch, as a
  # shuffling DataLoader would (without its worker processes).
  orders = [iter(()), iter(())]

  def next_rows(g):
    rows = next(orders[g], None)
    if rows is None:
      perm = rng.permutation(halves[g])
      orders[g] = iter([perm[i:i + _BATCH.value] for i in
                        range(0, len(perm) - _BATCH.value + 1, _BATCH.value)])
      rows = next(orders[g])
    return rows

  times = []
  for step in range(_STEPS.value):
    t = time.perf_counter()
    if step % _EVERY.value == 0 and step:
      teachers = [copy.deepcopy(models[1]).eval(),
                  copy.deepcopy(models[0]).eval()]
    for g in range(2):
      rows = next_rows(g)
      xb, yb = torch.from_numpy(x[rows]), torch.from_numpy(y[rows])
      logits = models[g](xb)
      loss = nn.functional.cross_entropy(logits, yb)
      if teachers[g] is not None:
        with torch.no_grad():
          target = torch.softmax(teachers[g](xb), -1)
        loss = loss + nn.functional.kl_div(
            torch.log_softmax(logits, -1), target, reduction="batchmean")
      opts[g].zero_grad()
      loss.backward()
      opts[g].step()
    times.append(time.perf_counter() - t)
  windows = [50 / sum(times[i:i + 50]) for i in range(100, len(times) - 49, 50)]
  out = {"steps_per_s": float(np.median(windows)), "threads": _THREADS.value,
         "batch_size": _BATCH.value, "steps": _STEPS.value,
         "torch": torch.__version__}
  print(json.dumps(out))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(out, f)


if __name__ == "__main__":
  app.run(main)
