r"""Llama-shaped 1B LM (Llama 3.2 1B's shape at a 32k vocabulary).

Built by codistill_jax/lm_configs.py (shapes, dtypes, remat, FSDP rules,
synthetic_lm data). Args: `quick` (toy width, seconds on a CPU), `groups=G`.

  python -m codistill_jax.tools.compile_check --config=configs/lm_1b.py \
      --topology=v5p:4x4x8 --config.codistill.num_groups=2
"""

from codistill_jax import lm_configs


def get_config(arg=None):
  return lm_configs.get_config("1b", arg)
