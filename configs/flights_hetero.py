r"""Groups that differ: a wide and a narrow CTR model codistilling (flights).

Group 0 is the flights model (`configs/flights.py`: 256-128 MLP, embeddings
of 16); group 1 a narrow one (64 units, embeddings of 8) with a bigger
learning rate and its own exchange interval. Only predictions cross between
them: each restores the other by the other's architecture (docs/groups.md).

  python experiments/launch_local.py --config=configs/flights_hetero.py \
      --workdir=/tmp/flights_hetero

or both in one process, the wide group on 6 of 8 (fake) devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
  python -m codistill_jax.main --config=configs/flights_hetero.py:devices=6+2 \
      --workdir=/tmp/flights_hetero

Args (after ':', comma-separated): `quick` (a few steps); `groups=G` (the
groups after the first two are wide ones); `devices=A+B`
(each group's devices in one program; default: an equal share);
`oneway` (big-to-small only: the wide group has alpha 0 and learns from no
one, the narrow one distils from it); `weighting=uniform|freshness|val_loss`.
"""

import os

import ml_collections

from codistill_jax import config_lib

_FLIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "flights.py")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False, groups=2, devices="",
                             oneway=False, weighting="uniform")
  c = config_lib.load(
      f"{_FLIGHTS}:groups={arg.groups}{',quick' if arg.quick else ''}",
      lock=False)
  c.codistill.teacher_weighting = arg.weighting
  # Each group's entry holds only what it sets differently.
  c.group.g0 = ml_collections.ConfigDict()
  c.group.g1 = ml_collections.ConfigDict({
      "model": {"hidden_sizes": (16,) if arg.quick else (64,),
                "embed_dim": 2 if arg.quick else 8},
      "optimizer": {"learning_rate": 4e-3},
      "codistill": {"exchange_every": 10 if arg.quick else 25}})
  if arg.oneway:  # Live big-to-small: the wide group learns from no one.
    c.group.g0.codistill = ml_collections.ConfigDict({"alpha": 0.0})
  if arg.quick:
    c.data.batch_size = 48  # Divides 8, 6 and 2 devices alike.
  if arg.devices:
    sizes = [int(d) for d in str(arg.devices).split("+")]
    if len(sizes) != 2 or min(sizes) < 1:
      raise ValueError(f"devices={arg.devices}: give two counts, e.g. 6+2")
    for g, d in enumerate(sizes):
      c.group[f"g{g}"].devices = d
      # A batch its devices divide, near the shared one.
      c.group[f"g{g}"].data = ml_collections.ConfigDict(
          {"batch_size": c.data.batch_size // d * d})
    c.data.eval_batch_size = 8184 if arg.quick else 4092  # Divides 6 and 2.
  return c
