r"""Fashion-MNIST with the plain MLP of bench_models/mlp.py (benchmarks).

  PYTHONPATH=experiments python -m codistill_jax.main \
      --config=experiments/bench_models/fashion_mlp.py --workdir=/tmp/mlp
"""

import os

import ml_collections

from codistill_jax import config_lib

_FASHION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                        "..", "configs", "fashion_mnist.py")


def get_config(arg=None):
  c = config_lib.load(f"{_FASHION}:{arg or ''}", lock=False)
  c.model_name = "bench_models.mlp"
  c.model = ml_collections.ConfigDict({"hidden": (512, 512)})
  c.data.batch_size = 128
  return c
