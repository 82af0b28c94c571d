r"""Stored teacher targets: run a trained teacher once, train from its files.

  python -m codistill_jax.tools.store_targets --config=configs/kernel_lm.py \
      --teacher=/tmp/teacher_run --out=/shared/targets/lm_top64 \
      --config.codistill.topk=64 [--config.codistill.temperature=2]

then train with `--config.codistill.teacher_source=stored
--config.codistill.stored_targets=/shared/targets/lm_top64` (and the same
topk and temperature): the teacher never runs in training.

The teacher (`--teacher`, a run dir or step dir; its architecture is
`build.teacher_model(config)`: `codistill.teacher_model_name` /
`teacher_model`, or the student's) runs over the whole training split in
order (`Datasets.train_scan`) and its targets are written one row per
training example, by the example's index in the split, so any group, shard,
batch size or resumed step reads the targets of exactly its own examples:

  manifest.json   what the targets are of: the teacher (step dir, model,
                  a fingerprint of its params), the data (the config.data
                  fields that define the split, its size, a hash of its
                  first examples), the format, the arrays
  topk_ids.npy, topk_probs.npy   with codistill.topk = k > 0: the k largest
                  probabilities at temperature T; the rest of the mass is the
                  tail bucket the loss keeps (1 - sum), which MaxText's
                  offline top-k logits and torchdistill's cached outputs drop
  probs.npy       with topk = 0: the full distribution (small outputs only)

A store is written into `OUT.tmp-<pid>` and renamed when complete, so a store
that exists is whole, and an existing one is never overwritten. Plain `.npy`
files are random access (read through memory maps) and need no extra
dependency.
"""

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from codistill_jax import build
from codistill_jax import checkpoint as ckpt_lib
from codistill_jax import distill
from codistill_jax import mesh as mesh_lib
from codistill_jax.errors import ConfigError

FORMAT_VERSION = 1
# config.data fields that do not change which examples make up the training
# split or what their inputs are.
_NOT_IDENTITY = ("batch_size", "eval_batch_size", "partition", "cache_dir")
# Examples whose inputs and labels are hashed into the data identity.
_HASHED_EXAMPLES = 64


def data_identity(config, datasets) -> dict:
  """What a store's rows are rows of: the split's fields and a content hash."""
  fields = {k: v for k, v in json.loads(config.data.to_json_best_effort(
      )).items() if k not in _NOT_IDENTITY}
  digest, seen = hashlib.sha256(), 0
  for batch in datasets.train_scan():
    keep = batch["index"] >= 0
    for leaf in jax.tree.leaves((batch["inputs"], batch["labels"])):
      digest.update(np.ascontiguousarray(np.asarray(leaf)[keep][
          :_HASHED_EXAMPLES - seen]).tobytes())
    seen += int(keep.sum())
    if seen >= _HASHED_EXAMPLES:
      break
  return {"fields": fields,
          "num_train_examples": int(datasets.info["num_train_examples"]),
          "content_sha256": digest.hexdigest()}


def target_format(config) -> dict:
  cd = config.codistill
  return {"topk": int(cd.topk), "temperature": float(cd.temperature),
          "binary": config.loss == "sigmoid_xent",
          "teacher_dtype": cd.teacher_dtype}


@dataclasses.dataclass
class TargetStore:
  """A written store, opened for reading (memory-mapped arrays)."""
  path: str

  def __post_init__(self):
    manifest = os.path.join(self.path, "manifest.json")
    try:
      with open(manifest) as f:
        self.manifest = json.load(f)
      self.arrays = {name: np.load(os.path.join(self.path, f"{name}.npy"),
                                   mmap_mode="r")
                     for name in self.manifest["arrays"]}
    except (OSError, ValueError, KeyError) as e:
      raise ConfigError(
          f"config.codistill.stored_targets={self.path}: not a readable "
          f"target store ({type(e).__name__}: {e}); write one with `python "
          "-m codistill_jax.tools.store_targets`") from None

  def check(self, config, datasets) -> None:
    """Refuses a config whose data, target format or teacher differ."""
    where = f"config.codistill.stored_targets={self.path}"
    want = target_format(config)
    have = self.manifest["format"]
    for key, value in want.items():
      if have.get(key) != value:
        field = {"topk": "codistill.topk", "temperature":
                 "codistill.temperature", "binary": "loss",
                 "teacher_dtype": "codistill.teacher_dtype"}[key]
        raise ConfigError(f"{where} holds targets with {key}={have.get(key)!r}"
                          f", but config.{field} gives {value!r}; set it to "
                          "the store's value or write a new store")
    identity = data_identity(config, datasets)
    if identity != self.manifest["data"]:
      diff = sorted(k for k in set(identity["fields"]) | set(
          self.manifest["data"]["fields"]) if identity["fields"].get(k) !=
                    self.manifest["data"]["fields"].get(k))
      raise ConfigError(
          f"{where} was written for another data split ("
          f"{'fields ' + ', '.join(diff) if diff else 'other examples'}); "
          "use the store of this data config or write one for it")
    ckpt = config.codistill.teacher_checkpoint
    if ckpt:
      step_dir = ckpt_lib.find_step_dir(ckpt,
                                        "config.codistill.teacher_checkpoint")
      if os.path.realpath(step_dir) != self.manifest["teacher"]["step_dir"]:
        raise ConfigError(
            f"{where} was written for teacher "
            f"{self.manifest['teacher']['step_dir']}, not "
            f"config.codistill.teacher_checkpoint={ckpt}; use its store or "
            "clear teacher_checkpoint")
    name, kwargs = build.teacher_spec(config)
    if config.codistill.teacher_model_name and (
        [name, kwargs] != [self.manifest["teacher"]["model_name"],
                           self.manifest["teacher"]["model_kwargs"]]):
      raise ConfigError(f"{where} was written by a teacher of model "
                        f"{self.manifest['teacher']['model_name']!r}, not "
                        f"config.codistill.teacher_model_name={name!r}")

  def lookup(self, index: np.ndarray) -> dict[str, np.ndarray]:
    """The targets of the examples `index` (-1 = padding: any row)."""
    rows = np.maximum(np.asarray(index), 0)
    return {name: np.asarray(a[rows]) for name, a in self.arrays.items()}


def write(config, teacher_path: str, out: str) -> dict:
  """Runs the teacher over the training split and writes a store at `out`.

  Args:
    config: the student's config (data, loss, codistill.topk/temperature/
      teacher_dtype and the teacher's model fields).
    teacher_path: the teacher's run dir, checkpoints dir or step dir.
    out: the store directory to create (must not exist).

  Returns:
    The manifest.
  """
  # pylint: disable-next=g-import-not-at-top
  from codistill_jax import data as data_lib
  if os.path.exists(out):
    raise ConfigError(f"--out={out} exists; a store is never overwritten: "
                      "remove it or choose a new directory")
  if jax.process_count() > 1:
    raise ConfigError("target_store runs in one process; drop "
                      "--coordinator_address")
  datasets = data_lib.get_module(config.data.name).get_datasets(
      config, group=0, num_groups=1, process_index=0, process_count=1)
  mesh = mesh_lib.make_mesh(jax.devices())
  teacher = build.teacher_model(config, datasets.info, teacher_path)
  example = build.example_inputs(next(iter(datasets.train(0))))
  repl = mesh_lib.replicated(mesh)
  params = ckpt_lib.restore_params(
      teacher_path, build.abstract_params(teacher, example, repl),
      field="--teacher")
  fmt = target_format(config)
  dtype = jnp.dtype(fmt["teacher_dtype"])
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  predict = jax.jit(distill.target_fn(teacher.apply, fmt["temperature"],
                                      fmt["binary"], fmt["topk"]),
                    out_shardings=repl)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  n = int(datasets.info["num_train_examples"])
  tmp = f"{out}.tmp-{os.getpid()}"
  os.makedirs(tmp)
  arrays: dict[str, Any] = {}
  try:
    for batch in datasets.train_scan():
      inputs = mesh_lib.shard_batch(batch["inputs"], batch_sharding)
      targets = jax.device_get(predict(params, inputs))
      keep = batch["index"] >= 0
      for name, value in targets.items():
        if name not in arrays:
          arrays[name] = np.lib.format.open_memmap(
              os.path.join(tmp, f"{name}.npy"), mode="w+", dtype=value.dtype,
              shape=(n, *value.shape[1:]))
        arrays[name][batch["index"][keep]] = value[keep]
    for a in arrays.values():
      a.flush()
    step_dir = ckpt_lib.find_step_dir(teacher_path, "--teacher")
    name, kwargs = build.teacher_spec(config, teacher_path)
    manifest = {
        "version": FORMAT_VERSION,
        "format": fmt,
        "data": data_identity(config, datasets),
        "teacher": {"step_dir": os.path.realpath(step_dir),
                    "model_name": name, "model_kwargs": kwargs,
                    "params_checksum": np.asarray(
                        ckpt_lib.checksum(params)).tolist()},
        "arrays": {k: {"shape": list(a.shape), "dtype": str(a.dtype)}
                   for k, a in arrays.items()},
    }
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
      json.dump(manifest, f, indent=1)
    del arrays
    os.rename(tmp, out)  # Atomic: a store that exists is whole.
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest
