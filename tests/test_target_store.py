"""Stored teacher targets (target_store.py, teachers.FromStore).

A teacher runs once over the training split; a student trained from its
files must equal one trained with the same teacher in-process, with the same
target format, and a store refuses data or a teacher it was not written for.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from codistill_jax import metrics
from codistill_jax import paths
from codistill_jax import target_store
from codistill_jax import train
from codistill_jax.errors import ConfigError
from tests.test_train import ROOT, load_config, restore_params


def _teacher(tmp_path, name, overrides=()):
  config = load_config(name)
  for flag in overrides:
    field, value = flag.removeprefix("--config.").split("=", 1)
    node = config
    *parents, leaf = field.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value)
  config.total_steps = 6
  workdir = str(tmp_path / f"teacher_{name}")
  train.train_and_evaluate(config, workdir)
  return config, workdir


def _student(config, teacher_dir, source, workdir, store=""):
  cd = config.codistill
  cd.teacher_source, cd.teacher_checkpoint = source, teacher_dir
  cd.stored_targets, cd.burn_in_steps = store, 0
  config.total_steps, config.log_every, config.seed = 8, 1, 3
  train.train_and_evaluate(config, workdir)
  return [r for r in metrics.read_jsonl(paths.metrics_file(workdir, 0))
          if "distill_loss" in r]


def _assert_same_training(tmp_path, config, teacher_dir, store):
  rows_in = _student(config.copy_and_resolve_references(), teacher_dir,
                     "checkpoint", str(tmp_path / "in_process"))
  rows_st = _student(config.copy_and_resolve_references(), "", "stored",
                     str(tmp_path / "stored"), store)
  assert len(rows_in) == len(rows_st) == 8
  assert all(r["distill_loss"] > 0 for r in rows_st)
  np.testing.assert_allclose([r["distill_loss"] for r in rows_st],
                             [r["distill_loss"] for r in rows_in], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(restore_params(str(tmp_path / "stored"), 8)),
                  jax.tree.leaves(restore_params(str(tmp_path / "in_process"),
                                                 8))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_stored_dense_targets_train_like_the_in_process_teacher(tmp_path):
  config, teacher_dir = _teacher(tmp_path, "flights")
  store = str(tmp_path / "store")
  manifest = target_store.write(config, teacher_dir, store)
  n = manifest["data"]["num_train_examples"]
  assert manifest["arrays"] == {"probs": {"shape": [n], "dtype": "float32"}}
  assert not [d for d in os.listdir(tmp_path) if ".tmp-" in d]
  _assert_same_training(tmp_path, config, teacher_dir, store)


@pytest.mark.slow
def test_stored_topk_targets_keep_the_tail_and_match(tmp_path, small_data):
  config, teacher_dir = _teacher(tmp_path, "fashion_mnist",
                                 small_data["fashion_mnist"])
  config.codistill.topk = 3
  store = str(tmp_path / "store")
  target_store.write(config, teacher_dir, store)
  opened = target_store.TargetStore(store)
  rows = opened.lookup(np.arange(5))
  assert rows["topk_ids"].shape == rows["topk_probs"].shape == (5, 3)
  # Probabilities of the top 3 of 10 classes: a tail mass is left over.
  total = rows["topk_probs"].sum(-1)
  assert np.all(total < 1) and np.all(total > 0)
  _assert_same_training(tmp_path, config, teacher_dir, store)


@pytest.mark.slow
def test_store_refuses_other_data_format_teacher_and_overwrite(tmp_path):
  config, teacher_dir = _teacher(tmp_path, "flights")
  store = str(tmp_path / "store")
  target_store.write(config, teacher_dir, store)
  with pytest.raises(ConfigError, match="exists"):
    target_store.write(config, teacher_dir, store)

  def student(**changes):
    c = config.copy_and_resolve_references()
    c.codistill.teacher_source, c.codistill.stored_targets = "stored", store
    for k, v in changes.items():
      node = c
      *parents, leaf = k.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = v
    return c

  with pytest.raises(ConfigError, match="another data split.*split_seed"):
    train.train_and_evaluate(student(**{"data.split_seed": 1}),
                             str(tmp_path / "a"))
  with pytest.raises(ConfigError, match="temperature"):
    train.train_and_evaluate(student(**{"codistill.temperature": 2.0}),
                             str(tmp_path / "b"))
  other_config, other_teacher = config, str(tmp_path / "other_teacher")
  train.train_and_evaluate(other_config, other_teacher)
  with pytest.raises(ConfigError, match="written for teacher"):
    train.train_and_evaluate(
        student(**{"codistill.teacher_checkpoint": other_teacher}),
        str(tmp_path / "c"))
  # Nothing was written for the refused runs.
  assert not any((tmp_path / d).exists() for d in "abc")


@pytest.mark.slow
def test_target_store_command(tmp_path):
  config, teacher_dir = _teacher(tmp_path, "flights")
  del config
  out = str(tmp_path / "store")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  cmd = [sys.executable, "-m", "codistill_jax.tools.store_targets",
         "--config=configs/flights.py:quick", f"--teacher={teacher_dir}",
         f"--out={out}"]
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(f"wrote {out}: probs (")
  again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
  assert again.returncode == 2
  assert again.stderr.strip().splitlines()[-1].startswith("error: --out=")


@pytest.mark.slow
@pytest.mark.parametrize("named", [True, False])
def test_a_store_is_written_by_the_teachers_architecture(tmp_path, named):
  """With the default teacher_source ('peers'), `store_targets` once ran
  the teacher as the student's architecture, ignoring teacher_model_name
  and the teacher run's own config (a checkpoint of a wider teacher could
  not even be restored)."""
  teacher = load_config("flights")
  teacher.model.hidden_sizes, teacher.total_steps = (48, 16), 2
  teacher_dir = str(tmp_path / "wide_teacher")
  train.train_and_evaluate(teacher, teacher_dir)
  config = load_config("flights")  # The student: hidden_sizes (32,).
  assert config.codistill.teacher_source == "peers"
  if named:
    config.codistill.teacher_model_name = "ctr_mlp"
    with config.codistill.teacher_model.ignore_type():
      config.codistill.teacher_model.update(
          load_config("flights").model.to_dict())
      config.codistill.teacher_model.hidden_sizes = (48, 16)
  manifest = target_store.write(config, teacher_dir, str(tmp_path / "store"))
  assert manifest["teacher"]["model_name"] == "ctr_mlp"
  assert tuple(manifest["teacher"]["model_kwargs"]["hidden_sizes"]) == (48,
                                                                        16)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  """A flights teacher and its dense store (module-wide; copy to damage)."""
  tmp = tmp_path_factory.mktemp("store")
  config, teacher_dir = _teacher(tmp, "flights")
  store = str(tmp / "store")
  target_store.write(config, teacher_dir, store)
  return config, store


def _copy(written, tmp_path):
  out = str(tmp_path / "store")
  shutil.copytree(written[1], out)
  return out


def _flip(path, offset):
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.slow
@pytest.mark.parametrize("where", [0.3, 0.999])
def test_a_damaged_store_is_named_not_trained_on(written, tmp_path, where):
  """One flipped bit in the rows: once a NaN error that blamed alpha and the
  temperature (or silently wrong targets); now the lookup names the file."""
  store = _copy(written, tmp_path)
  path = os.path.join(store, "probs.npy")
  _flip(path, int(os.path.getsize(path) * where))
  opened = target_store.TargetStore(store)
  n = len(opened.arrays["probs"])
  with pytest.raises(ConfigError, match=r"stored_targets=.*probs\.npy rows "
                     r"\d+\.\.\d+ do not match the checksum"):
    for start in range(0, n, 1000):
      opened.lookup(np.arange(start, min(start + 1000, n)))


@pytest.mark.slow
@pytest.mark.parametrize("damage,words", [
    (lambda m: m.pop("data"), "has no 'data'"),
    (lambda m: m["data"].pop("num_train_examples"),
     "has no data.'num_train_examples'"),
    (lambda m: m["format"].update(topk="3"), "format.'topk' is '3'"),
    (lambda m: m.pop("checksums"), "has no 'checksums'"),
    (lambda m: m["arrays"]["probs"].update(shape=[7]), "the manifest says"),
    (lambda m: m.update(version=99), "format version 99"),
])
def test_a_manifest_missing_or_mistyping_a_field_is_named(written, tmp_path,
                                                          damage, words):
  store = _copy(written, tmp_path)
  path = os.path.join(store, "manifest.json")
  with open(path) as f:
    manifest = json.load(f)
  damage(manifest)
  with open(path, "w") as f:
    json.dump(manifest, f)
  with pytest.raises(ConfigError) as e:
    target_store.TargetStore(store)
  assert str(e.value).startswith(f"config.codistill.stored_targets={store}")
  assert words in str(e.value), e.value


@pytest.mark.slow
def test_a_data_field_that_does_not_change_the_rows_is_not_refused(
    written, tmp_path):
  config, store = written
  config = config.copy_and_resolve_references()
  config.data.prefetch = 0  # Written with -1: the same examples.
  config.codistill.teacher_source, config.codistill.stored_targets = (
      "stored", store)
  config.total_steps, config.codistill.burn_in_steps = 2, 0
  train.train_and_evaluate(config, str(tmp_path / "run"))
