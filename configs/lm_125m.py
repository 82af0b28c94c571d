r"""Llama-shaped 125M-class LM (12 layers, width 768, 32k vocabulary).

Built by codistill_jax/lm_configs.py (shapes, dtypes, remat, FSDP rules,
synthetic_lm data). Args: `quick` (toy width, seconds on a CPU), `groups=G`.

  python -m codistill_jax.tools.compile_check --config=configs/lm_125m.py \
      --topology=v5p:4x4x8 --config.codistill.num_groups=2
"""

from codistill_jax import lm_configs


def get_config(arg=None):
  return lm_configs.get_config("125m", arg)
