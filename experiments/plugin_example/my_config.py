r"""A config for the plug-ins of my_plugins/ (not part of codistill_jax).

  PYTHONPATH=experiments/plugin_example python -m codistill_jax.main \
      --config=experiments/plugin_example/my_config.py --workdir=/tmp/mine
"""

from codistill_jax import config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.model_name = "my_plugins.my_model"
  c.model.width = 16
  c.data.name = "my_plugins.my_data"
  c.data.num_examples = 200
  c.data.batch_size = 16
  c.data.eval_batch_size = 20
  c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 12, 4, 6, 12
  return c
