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
import zlib

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from codistill_jax import build
from codistill_jax import checkpoint as ckpt_lib
from codistill_jax import distill
from codistill_jax import mesh as mesh_lib
from codistill_jax.errors import ConfigError

# 2: per-chunk CRC32s of every array ("checksums"); version 1 stores (none)
# still load, unverified, with a warning.
FORMAT_VERSION = 2
# Rows per checksummed chunk: a lookup verifies each chunk it touches once.
CHUNK_ROWS = 4096
# What a manifest must hold, with the type of each entry.
_MANIFEST = {"version": int, "format": dict, "data": dict, "teacher": dict,
             "arrays": dict}
_MANIFEST_PARTS = {
    "format": {"topk": int, "temperature": (int, float), "binary": bool,
               "teacher_dtype": str},
    "data": {"fields": dict, "num_train_examples": int,
             "content_sha256": str},
    "teacher": {"step_dir": str, "model_name": str, "model_kwargs": dict},
}
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


def chunk_checksums(array: np.ndarray) -> list[int]:
  """CRC32 of each CHUNK_ROWS rows of `array`'s bytes (as stored)."""
  return [zlib.crc32(np.ascontiguousarray(array[i:i + CHUNK_ROWS]).data)
          for i in range(0, len(array), CHUNK_ROWS)]


@dataclasses.dataclass
class TargetStore:
  """A written store, opened for reading (memory-mapped arrays).

  The manifest is checked for every field it must hold; the arrays for the
  shape and dtype it gives; each chunk of rows against its checksum the
  first time a lookup touches it. Any of them failing is a ConfigError
  naming the store and the file.
  """
  path: str

  def __post_init__(self):
    self.where = f"config.codistill.stored_targets={self.path}"
    manifest = os.path.join(self.path, "manifest.json")
    try:
      with open(manifest) as f:
        self.manifest = json.load(f)
    except (OSError, ValueError) as e:
      raise self._error(f"{manifest} does not read ({type(e).__name__}: "
                        f"{e})") from None
    self._check_manifest(manifest)
    self.arrays = {}
    for name, meta in self.manifest["arrays"].items():
      path = os.path.join(self.path, f"{name}.npy")
      try:
        array = np.load(path, mmap_mode="r")
      except (OSError, ValueError) as e:
        raise self._error(f"{path} does not read ({type(e).__name__}: "
                          f"{e})") from None
      if (list(array.shape) != list(meta.get("shape", [])) or
          str(array.dtype) != meta.get("dtype")):
        raise self._error(f"{path} holds {array.dtype} {list(array.shape)}, "
                          f"the manifest says {meta.get('dtype')} "
                          f"{meta.get('shape')}")
      self.arrays[name] = array
    self.sums = self.manifest.get("checksums")
    if self.sums is None:
      logging.warning("%s: a version %s store without checksums; its rows "
                      "are used unverified (write it again to verify them)",
                      self.where, self.manifest["version"])
    self._verified: dict[str, set[int]] = {n: set() for n in self.arrays}

  def _error(self, what: str) -> ConfigError:
    return ConfigError(f"{self.where}: {what}; write the store again with "
                       "`python -m codistill_jax.tools.store_targets`")

  def _check_manifest(self, path: str) -> None:
    """Every entry the reader uses is there, with its type."""
    def need(node, spec, prefix):
      if not isinstance(node, dict):
        raise self._error(f"{path}: {prefix or 'the manifest'} is not a JSON "
                          "object")
      for key, kind in spec.items():
        if key not in node:
          raise self._error(f"{path} has no {prefix}{key!r}")
        if not isinstance(node[key], kind) or (
            kind is int and isinstance(node[key], bool)):
          raise self._error(f"{path}: {prefix}{key!r} is "
                            f"{node[key]!r}, not a {getattr(kind, '__name__', 'number')}")
    need(self.manifest, _MANIFEST, "")
    version = self.manifest["version"]
    if version > FORMAT_VERSION or version < 1:
      raise self._error(f"{path} is of format version {version}; this "
                        f"version reads 1..{FORMAT_VERSION}")
    for part, spec in _MANIFEST_PARTS.items():
      need(self.manifest[part], spec, f"{part}.")
    sums = self.manifest.get("checksums")
    if version >= 2:
      need(self.manifest, {"checksums": dict}, "")
      need(sums, {"chunk_rows": int, "arrays": dict}, "checksums.")
      if sorted(sums["arrays"]) != sorted(self.manifest["arrays"]):
        raise self._error(f"{path}: checksums.arrays names "
                          f"{sorted(sums['arrays'])}, arrays names "
                          f"{sorted(self.manifest['arrays'])}")

  def _verify(self, rows: np.ndarray) -> None:
    """Checks each chunk of `rows` not checked yet against its checksum."""
    if self.sums is None:
      return
    size = self.sums["chunk_rows"]
    for name, array in self.arrays.items():
      done, want = self._verified[name], self.sums["arrays"][name]
      for c in np.unique(rows // size).tolist():
        if c in done:
          continue
        got = zlib.crc32(np.ascontiguousarray(
            array[c * size:(c + 1) * size]).data)
        if c >= len(want) or got != want[c]:
          raise self._error(
              f"{name}.npy rows {c * size}..{min((c + 1) * size, len(array)) - 1}"
              " do not match the checksum written with them (the file is "
              "damaged)")
        done.add(c)

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
    # The rows decide: the same examples in the same order (their count
    # and content) are the same split, whichever config.data fields differ
    # (a prefetch depth, a cache dir); the fields only explain a mismatch.
    identity, saved = data_identity(config, datasets), self.manifest["data"]
    diff = sorted(k for k in set(identity["fields"]) | set(saved["fields"])
                  if identity["fields"].get(k) != saved["fields"].get(k))
    same_rows = all(identity[k] == saved[k]
                    for k in ("num_train_examples", "content_sha256"))
    if not same_rows:
      raise ConfigError(
          f"{where} was written for another data split ("
          f"{'fields ' + ', '.join(diff) if diff else 'other examples'}); "
          "use the store of this data config or write one for it")
    if diff:
      logging.info("%s: written with other config.data %s, for the same "
                   "examples: used", where, ", ".join(diff))
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
    self._verify(rows)
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
  example = build.example_inputs(next(iter(datasets.train(0))))
  repl = mesh_lib.replicated(mesh)
  teacher, abstract = build.fixed_teacher(config, datasets.info, example,
                                          repl, teacher_path, "--teacher")
  params = ckpt_lib.restore_params(teacher_path, abstract, field="--teacher")
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
        "checksums": {"chunk_rows": CHUNK_ROWS,
                      "arrays": {k: chunk_checksums(a)
                                 for k, a in arrays.items()}},
    }
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
      json.dump(manifest, f, indent=1)
    del arrays
    os.rename(tmp, out)  # Atomic: a store that exists is whole.
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest
