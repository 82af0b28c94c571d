r"""Groups that differ on the English corpus: a deep and a shallow llama.

Group 0 is `configs/english_lm.py`'s llama with 4 layers, group 1 the same
width with 1 layer; both read the one SentencePiece tokenizer of the run's
data (the vocabulary is the data's: groups share it by construction).

  python experiments/launch_local.py --config=configs/english_lm_hetero.py \
      --workdir=/tmp/english_lm_hetero

Args: as configs/english_lm.py (`quick`, `groups=G`: the groups after the
first two are the shared 2-layer model), and `oneway` (deep-to-shallow
only: the deep group has alpha 0).
"""

import os

import ml_collections

from codistill_jax import config_lib

_LM = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                   "english_lm.py")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False, groups=2, oneway=False)
  c = config_lib.load(
      f"{_LM}:groups={arg.groups}{',quick' if arg.quick else ''}",
      lock=False)
  c.group.g0 = ml_collections.ConfigDict({"model": {"num_layers": 4}})
  c.group.g1 = ml_collections.ConfigDict({"model": {"num_layers": 1}})
  if arg.oneway:  # Deep to shallow only.
    c.group.g0.codistill = ml_collections.ConfigDict({"alpha": 0.0})
  return c
