r"""The 1B LM with a 256k vocabulary: where sampled distillation pays most.

Built by codistill_jax/lm_configs.py (shapes, dtypes, remat, FSDP rules,
synthetic_lm data). Args: `quick` (toy width, seconds on a CPU), `groups=G`.

  python -m codistill_jax.tools.compile_check --config=configs/lm_1b_256k.py \
      --topology=v5p:4x4x8 --config.codistill.num_groups=2
"""

from codistill_jax import lm_configs


def get_config(arg=None):
  return lm_configs.get_config("1b_256k", arg)
