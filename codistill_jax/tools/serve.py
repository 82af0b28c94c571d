r"""Adds teacher workers to a running Ray cluster, or stops them (a command).

Workers started here are detached: they keep serving after this command
exits, until `--stop` (or `ray.kill`) ends them, so a pool can grow and shrink
while students train. A student finds them when its config describes the same
teacher (checkpoint, model, temperature, target format, teacher_dtype).

  python -m codistill_jax.tools.serve --config=configs/flights.py \
      --config.codistill.teacher_source=service \
      --config.codistill.teacher_checkpoint=/shared/teacher_run \
      --config.codistill.service.address=HEAD_IP:6379 \
      --config.codistill.service.num_workers=2 [--stop]

The cluster must exist (`ray start --head ...`): a local cluster started by
this command would end with it. Checked before anything starts (one `error:`
line, exit code 2): the config, as a student of the service's; an address
(host:port or 'auto') where a cluster answers; at least one worker to start.
"""

import socket

from absl import flags

from codistill_jax import cli
from codistill_jax.errors import ConfigError

_CONFIG = cli.define_config_flag()
_STOP = flags.DEFINE_bool("stop", False,
                          "Stop every worker of this teacher instead.")


def check_address(address: str) -> None:
  """A Ray cluster's head answers at `address` ('host:port'; 'auto' is left
  to Ray, which finds the cluster this machine belongs to)."""
  field = "config.codistill.service.address"
  if not address:
    raise ConfigError(f"serve needs {field}=<running cluster>; '' would start "
                      "a cluster that ends with this command")
  if address == "auto":
    return
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ConfigError(f"{field}={address} must be host:port (the head's GCS "
                      "port, `ray start --head --port=6379`) or 'auto'")
  try:
    socket.create_connection((host.strip("[]"), int(port)),
                             timeout=10).close()
  except OSError as e:
    raise ConfigError(f"{field}={address}: no Ray cluster answers there "
                      f"({e.strerror or e}); start one with `ray start --head "
                      f"--port={port}` or name a running cluster's "
                      "address") from None


def serve(config, stop: bool = False) -> list[str]:
  """Starts (or stops) the workers; returns their names.

  The config is a student's: its fixed-teacher fields (teacher_checkpoint,
  teacher model, temperature, topk, teacher_dtype) and `codistill.service`
  say what the workers serve, checked as for a student of the service
  whatever its own `teacher_source`.
  """
  # Imported here: a machine without Ray (the service extra) gets the
  # validator's one line naming the install, not an ImportError.
  # pylint: disable=g-import-not-at-top
  from codistill_jax import data as data_lib
  from codistill_jax import validate
  # pylint: enable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.codistill.teacher_source = "service"
  validate.validate(config, num_devices=1)
  s = config.codistill.service
  if not stop:
    cli.check_at_least(s.num_workers, "config.codistill.service.num_workers")
  check_address(s.address)
  # pylint: disable=g-import-not-at-top
  import ray
  from codistill_jax.service import pool as pool_lib
  from codistill_jax.service import teacher as teacher_lib
  # pylint: enable=g-import-not-at-top
  datasets = data_lib.get_module(config.data.name).get_datasets(
      config, group=0, num_groups=1, process_index=0, process_count=1)
  spec = teacher_lib.spec_from_config(config, datasets.info,
                                      next(iter(datasets.train(0))))
  try:
    pool_lib.connect(s.address)
  except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
    raise ConfigError(f"config.codistill.service.address={s.address}: cannot "
                      f"join the Ray cluster there ({type(e).__name__}: "
                      f"{' '.join(str(e).split())[:200]}); name a running "
                      "cluster's address, and for a cluster with token "
                      "authentication (Ray's default) set RAY_AUTH_MODE=token "
                      "where its token is (~/.ray/auth_token)") from None
  try:
    if stop:
      names = [a["name"] for a in ray.util.list_named_actors(True)
               if a["namespace"] == pool_lib.NAMESPACE and
               a["name"].startswith(spec.fingerprint() + "/")]
      for name in names:
        ray.kill(ray.get_actor(name, namespace=pool_lib.NAMESPACE))
      return names
    handles = pool_lib.start_workers(spec, s.num_workers, cpus=s.worker_cpus,
                                     gpus=s.worker_gpus, detached=True)
    infos = ray.get([h.ready.remote() for h in handles])
    return [f"{pool_lib.NAMESPACE}/{spec.fingerprint()} pid {i['pid']} on "
            f"{i['device']}" for i in infos]
  finally:
    ray.shutdown()


def main(argv):
  del argv
  names = serve(_CONFIG.value, _STOP.value)
  print(("stopped " if _STOP.value else "serving ") + f"{len(names)} "
        "worker(s):\n  " + "\n  ".join(names))


if __name__ == "__main__":
  cli.run(main, required=("config",))
