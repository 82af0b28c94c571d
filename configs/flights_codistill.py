r"""2-way codistillation on the flights CTR workload (the main job).

Two groups, each on its own device(s) and disjoint half of the training rows,
publish their params every 50 steps and distil towards each other after a
200-step burn-in. On this CPU machine run each group as its own process:

  python experiments/launch_local.py --config=configs/flights_codistill.py \
      --workdir=/tmp/flights_codistill

or both in one process on 2 (fake) devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=2 \
  python -m codistill_jax.main --config=configs/flights_codistill.py \
      --workdir=/tmp/flights_codistill

Watch `staleness/group_*`, `distill_loss` and `alpha` in
WORKDIR/group_*/metrics.jsonl or TensorBoard. Args as configs/flights.py
(`quick`, `groups=G`; the default here is groups=2).
"""

import os

from codistill_jax import config_lib

_FLIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "flights.py")


def get_config(arg=None):
  c = config_lib.load(
      f"{_FLIGHTS}:{','.join(filter(None, ['groups=2', arg]))}", lock=False)
  # One process per group runs free: keep each teacher within two exchange
  # intervals of its student (experiments/bench_staleness.py: without it the
  # groups drift up to ~500 steps apart in 1000).
  # (A reference: it follows --config.codistill.exchange_every.)
  c.codistill.max_staleness = c.codistill.get_ref("exchange_every") * 2
  return c


def sweep():
  return [{"seed": s} for s in range(3)]
