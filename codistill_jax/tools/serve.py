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
this command would end with it.
"""

from absl import flags
import ray

from codistill_jax import cli
from codistill_jax import data as data_lib
from codistill_jax import validate
from codistill_jax.errors import ConfigError
from codistill_jax.service import pool as pool_lib
from codistill_jax.service import teacher as teacher_lib

_CONFIG = cli.define_config_flag()
_STOP = flags.DEFINE_bool("stop", False,
                          "Stop every worker of this teacher instead.")


def serve(config, stop: bool = False) -> list[str]:
  """Starts (or stops) the workers; returns their names.

  The config is a student's: its fixed-teacher fields (teacher_checkpoint,
  teacher model, temperature, topk, teacher_dtype) and `codistill.service`
  say what the workers serve, checked as for a student of the service
  whatever its own `teacher_source`.
  """
  config = config.copy_and_resolve_references()
  config.codistill.teacher_source = "service"
  validate.validate(config, num_devices=1)
  s = config.codistill.service
  if not s.address:
    raise ConfigError("serve needs config.codistill.service.address=<running "
                      "cluster>; '' would start a cluster that ends with "
                      "this command")
  datasets = data_lib.get_module(config.data.name).get_datasets(
      config, group=0, num_groups=1, process_index=0, process_count=1)
  spec = teacher_lib.spec_from_config(config, datasets.info,
                                      next(iter(datasets.train(0))))
  pool_lib.connect(s.address)
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
