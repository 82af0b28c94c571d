"""Every reader verifies what it reads: own, init and teacher checkpoints.

Damage to any one file of a saved step (each file in turn, truncated or with
a flipped bit) must either fall back where there is a fallback (the group's
previous own step), or stop with one ConfigError naming the path; it is never
used silently. Whatever Orbax or tensorstore raise is mapped at the read.
"""

import glob
import json
import os
import shutil

import jax
import pytest

from codistill_jax import build
from codistill_jax import checkpoint as ckpt_lib
from codistill_jax import config_lib
from codistill_jax import data as data_lib
from codistill_jax import mesh as mesh_lib
from codistill_jax import paths
from codistill_jax import storage as storage_lib
from codistill_jax import train
from codistill_jax.errors import ConfigError
from tests.test_train import assert_trees_equal, load_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 1-group flights run with own steps 10, 20, 30; and its setup."""
  config = load_config("flights")
  config.total_steps, config.checkpoint_every = 30, 10
  config.log_every, config.eval_every = 10, 30
  workdir = str(tmp_path_factory.mktemp("readers") / "run")
  train.train_and_evaluate(config, workdir)
  datasets = data_lib.get_module(config.data.name).get_datasets(
      config, group=0, num_groups=1, process_index=0, process_count=1)
  setup = build.build(config, datasets,
                      mesh_lib.make_mesh(jax.devices()[:1]))
  good = ckpt_lib.restore_state(paths.checkpoints_dir(workdir, 0), 30,
                                setup.abstract)
  return config, workdir, setup, good


def _files(step_dir):
  return sorted(f for f in glob.glob(os.path.join(step_dir, "**"),
                                     recursive=True) if os.path.isfile(f))


def truncate(path):
  os.truncate(path, os.path.getsize(path) // 2)


def flip_bit(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x10]))


def _damaged_copies(run, tmp_path, damage):
  """Yields (copy of the run, the file damaged): each file of the newest
  own step in turn, damaged in its own copy of the run."""
  _, workdir, _, _ = run
  step = os.path.join(paths.checkpoints_dir(workdir, 0), "30")
  files = [os.path.relpath(f, workdir) for f in _files(step)
           if os.path.getsize(f) > 1]
  assert len(files) >= 4, files  # Metadata, and the arrays' files.
  for i, rel in enumerate(files):
    copy = str(tmp_path / f"run{i}")
    shutil.copytree(workdir, copy)
    damage(os.path.join(copy, rel))
    yield copy, rel


@pytest.mark.slow
@pytest.mark.parametrize("damage", [truncate, flip_bit])
def test_a_damaged_own_step_falls_back_to_the_one_before(run, tmp_path,
                                                         damage):
  _, _, setup, good = run
  fell_back = 0
  for copy, what in _damaged_copies(run, tmp_path, damage):
    store = storage_lib.Storage(copy, copy, [0])
    step, state = store.resume(0, setup.abstract)
    # Either the damage was caught and the step before was taken, or what
    # was read is exactly what was saved (a byte that does not matter).
    assert step in (20, 30), (what, step)
    if step == 30:
      assert_trees_equal(state, good)
    fell_back += step == 20
  assert fell_back  # The arrays' own files at least are verified.


@pytest.mark.slow
@pytest.mark.parametrize("damage", [truncate, flip_bit])
def test_a_damaged_init_or_teacher_checkpoint_is_named(run, tmp_path, damage):
  _, _, setup, good = run
  field = "config.codistill.teacher_checkpoint"
  refused = 0
  for copy, what in _damaged_copies(run, tmp_path, damage):
    try:
      params = ckpt_lib.restore_params(copy, setup.abstract.params,
                                       field=field)
    except ConfigError as e:
      assert str(e).startswith(f"{field}={copy!r}"), (what, e)
      assert "corrupt" in str(e) or "unreadable" in str(e), (what, e)
      refused += 1
      continue
    assert_trees_equal(params, good.params)  # Exactly what was saved.
  assert refused


@pytest.mark.slow
def test_params_checksum_is_saved_and_checked(run, tmp_path):
  _, workdir, setup, good = run
  step_dir = os.path.join(paths.checkpoints_dir(workdir, 0), "30")
  meta = ckpt_lib.step_metadata(step_dir)
  assert meta["params_checksum"] == jax.device_get(
      ckpt_lib.checksum(good.params)).tolist()
  # A checksum that does not match the values is refused by name.
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  path = os.path.join(paths.checkpoints_dir(copy, 0), "30",
                      "_CHECKPOINT_METADATA")
  with open(path) as f:
    saved = json.load(f)
  saved["custom_metadata"]["params_checksum"][0] ^= 1
  with open(path, "w") as f:
    json.dump(saved, f)
  with pytest.raises(ConfigError, match="do not match the checksum"):
    ckpt_lib.restore_params(copy, setup.abstract.params)


# ----------------------------------------------------------------------------
# A teacher of another task.
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
  """A 2-step run of the quick llama LM (synthetic tokens)."""
  config = load_config("lm", "size=125m,quick")
  config.total_steps, config.checkpoint_every, config.eval_every = 4, 4, 4
  workdir = str(tmp_path_factory.mktemp("lm") / "run")
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.mark.slow
@pytest.mark.parametrize("student,words", [
    ("flights", "is a run of another task (loss 'softmax_xent'"),
    ("fashion_mnist", "cannot run on this run's inputs"),
])
def test_a_teacher_of_another_task_is_named(lm_run, run, tmp_path, student,
                                            words, small_data):
  config = load_config(student)
  for flag in small_data.get(student, []):
    config_lib.apply_overrides(config, [flag])
  cd = config.codistill
  cd.teacher_source, cd.teacher_checkpoint = "checkpoint", lm_run
  workdir = str(tmp_path / "student")
  with pytest.raises(ConfigError) as e:
    train.train_and_evaluate(config, workdir)
  assert str(e.value).startswith(
      f"config.codistill.teacher_checkpoint={lm_run}"), e.value
  assert words in str(e.value), e.value
  assert not os.path.exists(workdir)  # Refused before the first write.
