"""Command-line entry point: flags in, one call to `train.train_and_evaluate`.

  python -m codistill_jax.main --config=configs/flights.py[:quick] \
      --workdir=/tmp/run [--config.a.b=value ...]

Bad input (unknown or mistyped config fields, a bad config file, a batch that
the devices do not divide, missing data, a workdir of another run, a
`--groups` index the config does not have, a `--compilation_cache` that is a
file) ends with a one-line `error: ...` message and exit code 2, before
anything is compiled or written (`cli.run`); with `--coordinator_address`,
before this process joins the job.
"""

import os

from absl import flags

from codistill_jax import cli

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, logs and TensorBoard events.")
_GROUPS = flags.DEFINE_list(
    "groups", None, "Groups this job runs, e.g. '0' or '0,1' (default: all "
    "config.codistill.num_groups). Other groups are separate jobs that share "
    "the exchange directory.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for a multi-process "
    "JAX job (jax.distributed), or 'auto' to take it and the process count and "
    "id from the cluster (SLURM, Cloud TPU VMs, ...); unset for one process.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in this JAX job (with "
    "--coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in the JAX job.")
_PROFILE = flags.DEFINE_string(
    "profile_steps", None, "'a:b': a jax.profiler trace of steps a..b-1 into "
    "WORKDIR/profile, for TensorBoard's profile plugin (the monitor extra).")
_CACHE = flags.DEFINE_string(
    "compilation_cache", cli.DEFAULT_COMPILATION_CACHE, "JAX's persistent "
    "compilation cache: a rerun skips compiling ('' turns it off).")


def main(argv):
  del argv
  config, workdir = _CONFIG.value, _WORKDIR.value
  groups = cli.parse_groups(_GROUPS.value)
  n = config.codistill.num_groups
  top = max(n, config.codistill.max_groups)  # Groups that may join too.
  for g in groups or ():
    cli.check_group(g, top, "--groups",
                    f"the config (config.codistill.num_groups={n}"
                    + (f", max_groups={top}" if top > n else "") + ")")
  profile = cli.parse_steps(_PROFILE.value, "--profile_steps")
  if flags.FLAGS["compilation_cache"].present and _CACHE.value:
    cli.check_output(os.path.expanduser(_CACHE.value), "--compilation_cache",
                     directory=True)
  # Imported here so that `--help` and flag errors do not pay for jax.
  # pylint: disable=g-import-not-at-top
  from codistill_jax import checkpoint
  from codistill_jax import train
  from codistill_jax import validate
  # pylint: enable=g-import-not-at-top
  if _COORDINATOR.value:
    # Joining a multi-process job waits for every process, so everything
    # but the device count is checked first: a 'data' axis of one device
    # divides any batch. The trainer checks again with the real devices.
    here = len(groups or range(config.codistill.num_groups))
    validate.validate(config, num_devices=here * config.sharding.model_axis,
                      num_groups_here=here)
    checkpoint.check_workdir(workdir, config)
  cli.init_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                       _PROCESS_ID.value)
  cli.enable_compilation_cache(_CACHE.value)
  train.train_and_evaluate(config, workdir, groups=groups,
                           profile_steps=profile)


def run():
  cli.run(main, required=("config", "workdir"))


if __name__ == "__main__":
  run()
