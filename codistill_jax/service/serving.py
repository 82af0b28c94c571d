"""The teacher service of one job: `start(config, ...)` -> `Service`."""

import math
import os
from typing import Iterator

import ml_collections
import ray

from codistill_jax.errors import ConfigError
from codistill_jax.service import pool as pool_lib
from codistill_jax.service import reader as reader_lib
from codistill_jax.service import teacher as teacher_lib

# The names a user of the service needs.
NoTeacherError = reader_lib.NoTeacherError
TeacherRequestError = reader_lib.TeacherRequestError
TargetReader = reader_lib.TargetReader
Teacher = teacher_lib.Teacher
TeacherSpec = teacher_lib.TeacherSpec


class Service:
  """A run's view of the pool: workers it started plus any that join."""

  def __init__(self, spec: teacher_lib.TeacherSpec,
               settings: ml_collections.ConfigDict):
    """Connects (or starts a loopback cluster) and starts `num_workers`.

    Args:
      spec: the teacher.
      settings: `config.codistill.service`.
    """
    self.spec, self.settings = spec, settings
    # A local cluster offers at least the CPUs the workers reserve.
    cpus = max(os.cpu_count() or 1,
               math.ceil(settings.num_workers * settings.worker_cpus))
    self.owns_cluster = pool_lib.connect(settings.address, num_cpus=cpus)
    self.workers = pool_lib.start_workers(
        spec, settings.num_workers, cpus=settings.worker_cpus,
        gpus=settings.worker_gpus)
    if self.workers:  # Load and compile before the student needs targets.
      refs = [w.ready.remote() for w in self.workers]
      done, _ = ray.wait(refs, num_returns=len(refs),
                         timeout=settings.wait_timeout_s)
      errors = []
      for ref in done:
        try:
          ray.get(ref)
        except ray.exceptions.RayError as e:
          errors.append(e)
      if errors and len(errors) == len(refs):
        # Every worker failed the same way (a bad checkpoint, say): say so
        # now rather than after wait_timeout_s without teachers.
        self.close()
        cause = getattr(errors[0], "cause", None)
        if isinstance(cause, ConfigError):
          raise cause
        raise RuntimeError(f"every teacher worker failed to start: "
                           f"{errors[0]}")

  def reader(self, batches: Iterator[dict]) -> reader_lib.TargetReader:
    s = self.settings
    return reader_lib.TargetReader(
        batches, pool_lib.Pool(self.spec.fingerprint()),
        depth=s.in_flight, timeout_s=s.request_timeout_s, retries=s.retries,
        no_worker=s.no_worker, wait_timeout_s=s.wait_timeout_s,
        fallback=lambda: teacher_lib.Teacher(self.spec))

  def close(self) -> None:
    """Stops the workers this run started, and a cluster it started."""
    for w in self.workers:
      ray.kill(w)
    self.workers = []
    if self.owns_cluster:
      ray.shutdown()
      self.owns_cluster = False


def start(config: ml_collections.ConfigDict, info: dict,
          example_batch: dict) -> Service:
  """The service of `config.codistill` for a dataset with `info`."""
  spec = teacher_lib.spec_from_config(config, info, example_batch)
  return Service(spec, config.codistill.service)
