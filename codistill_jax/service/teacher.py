"""One teacher: a trained checkpoint and a jitted predict, no Ray.

`Teacher(spec)` is what every service worker runs on its own device, and what
the trainer runs in-process when the service has no live worker and
`config.codistill.service.no_worker='fallback'`. Both compute exactly the
target of in-process distillation from `teacher_source='checkpoint'`: logits
of the restored params (cast to `teacher_dtype`) at temperature T, as
probabilities, in float32.

`TeacherSpec` is plain data (numbers, strings, small numpy arrays), so a
worker on another node receives a description to load, never code.
"""

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from codistill_jax import build
from codistill_jax import checkpoint as ckpt_lib
from codistill_jax import distill
from codistill_jax import models as models_lib
from codistill_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
  """Everything a worker needs to load a teacher (picklable plain data)."""
  checkpoint: str  # A committed step dir (resolved once, shared storage).
  model_name: str  # Module in codistill_jax/models/.
  model_kwargs: dict  # kwargs of its Model.
  info: dict  # The dataset info entries the Model takes (num_classes, ...).
  example_inputs: Any  # One-example zeros with the batch's input shapes.
  temperature: float = 1.0  # Targets are probabilities at this T.
  binary: bool = False  # One sigmoid logit per example: probs = P(y=1).
  topk: int = 0  # > 0: sparse {'topk_ids', 'topk_probs'}; 0: {'probs'}.
  dtype: str = "float32"  # Params cast to this (config.teacher_dtype).

  def fingerprint(self) -> str:
    """Short hash of what the targets depend on: workers of another teacher,
    temperature or target format never serve this student."""
    shapes = jax.tree.map(lambda x: [list(x.shape), str(x.dtype)],
                          self.example_inputs)
    key = json.dumps([self.checkpoint, self.model_name, self.model_kwargs,
                      self.info, shapes, self.temperature, self.binary,
                      self.topk, self.dtype], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def spec_from_config(config: ml_collections.ConfigDict, info: dict,
                     example_batch: dict) -> TeacherSpec:
  """The teacher of `config.codistill` (the one `build.teacher_spec`)."""
  cd = config.codistill
  name, kwargs = build.teacher_spec(config)
  fields = {f.name for f in dataclasses.fields(models_lib.get_module(
      name).Model)}
  example = jax.tree.map(lambda x: np.zeros((1,) + x.shape[1:], x.dtype),
                         example_batch["inputs"])
  spec = TeacherSpec(
      checkpoint=ckpt_lib.find_step_dir(
          cd.teacher_checkpoint, "config.codistill.teacher_checkpoint"),
      model_name=name, model_kwargs=kwargs,
      info={k: v for k, v in info.items() if k in fields and k not in kwargs},
      example_inputs=example, temperature=float(cd.temperature),
      binary=config.loss == "sigmoid_xent",
      topk=int(cd.topk), dtype=cd.teacher_dtype)
  # A checkpoint of another architecture fails here, in the trainer, at
  # start-up (metadata only), not later in every worker.
  model = models_lib.build(spec.model_name, spec.model_kwargs, spec.info)
  problem = ckpt_lib.mismatch(
      os.path.join(spec.checkpoint, "default"),
      jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), example,
                                        train=False)), prefix="params")
  if problem:
    raise ConfigError(
        f"config.codistill.teacher_checkpoint={cd.teacher_checkpoint!r} "
        f"holds another architecture than teacher_model_name/teacher_model "
        f"({problem})")
  return spec


class Teacher:
  """A teacher restored onto one device; `teacher(inputs)` -> numpy target."""

  def __init__(self, spec: TeacherSpec, device=None):
    self.spec = spec
    self.device = device or jax.local_devices()[0]
    model = models_lib.build(spec.model_name, spec.model_kwargs, spec.info)
    sharding = jax.sharding.SingleDeviceSharding(self.device)
    abstract = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), spec.example_inputs, train=False))
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
        abstract)
    params = ckpt_lib.restore_params(spec.checkpoint, abstract)
    dtype = jnp.dtype(spec.dtype)
    self._params = jax.tree.map(lambda x: x.astype(dtype), params)
    self._predict = jax.jit(distill.target_fn(model.apply, spec.temperature,
                                       spec.binary, spec.topk))
    self.served = 0  # Batches answered (the service's per-worker load).

  def __call__(self, inputs) -> dict[str, np.ndarray]:
    x = jax.device_put(inputs, self.device)
    out = jax.device_get(self._predict(self._params, x))
    self.served += 1
    return out

  def describe(self) -> dict:
    return {"pid": os.getpid(), "device": str(self.device),
            "fingerprint": self.spec.fingerprint(), "served": self.served}
