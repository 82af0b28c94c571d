"""Parameter exchange through real Orbax checkpoints (exchange.py).

Publishers write into pytest's tmp_path exactly as a peer group would; readers
restore onto a 4-device sub-mesh of the 8 fake CPU devices. Publishers hold
their arrays on the other 4 devices, as a peer group on its own sub-mesh does.
Every published step carries known values (kernel entries = step, bias
entries = -step), so any params a reader holds can be traced to one step.
"""

import glob
import os
import shutil
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from codistill_jax import exchange
from codistill_jax import paths
from codistill_jax import mesh as mesh_lib


def reader_mesh():
  return mesh_lib.make_mesh(jax.devices()[:4])


def writer_mesh():
  return mesh_lib.make_mesh(jax.devices()[4:])


def on_writer(tree):
  """Places a tree of host arrays replicated on the publishing group's mesh."""
  sharding = NamedSharding(writer_mesh(), P())
  return jax.tree.map(lambda x: jax.device_put(np.asarray(x), sharding), tree)


def step_tree(step: int, kernel_shape=(8, 4)):
  """The params a peer publishes at `step`: every entry identifies the step."""
  return {"params": {
      "kernel": np.full(kernel_shape, float(step), np.float32),
      "bias": np.full((4,), -float(step), np.float32)}}


def abstract_of(tree, mesh):
  """ShapeDtypeStructs on `mesh`: 2-D leaves split over 'data', rest replicated."""
  def one(x):
    spec = P(mesh_lib.DATA_AXIS, None) if np.ndim(x) == 2 else P()
    return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                sharding=NamedSharding(mesh, spec))
  return jax.tree.map(one, tree)


def publish(exchange_dir, group, step, params, max_to_keep=3, fmt=None):
  pub = exchange.Publisher(str(exchange_dir), group, max_to_keep=max_to_keep,
                           fmt=fmt)
  try:
    pub.publish(step, on_writer(params))
    pub.wait()
  finally:
    pub.close()


# Both publish formats (exchange.py): one object per step, and Orbax
# checkpoints (what multi-process groups write); tests of what a reader must
# survive run on both.
FORMATS = pytest.mark.parametrize("fmt", ["blob", "orbax"])


def step_dir(exchange_dir, group, step):
  return os.path.join(paths.published_dir(str(exchange_dir), group),
                      str(step))


def array_files(exchange_dir, group, step):
  """The files holding a committed step's arrays: the `<step>.params`
  object, or Orbax's tensorstore (OCDBT) manifests and data files."""
  blob = step_dir(exchange_dir, group, step) + ".params"
  if os.path.exists(blob):
    return [blob]
  item = os.path.join(step_dir(exchange_dir, group, step), "default")
  files = [f for f in glob.glob(os.path.join(item, "**"), recursive=True)
           if os.path.isfile(f) and (
               os.sep + "d" + os.sep in f or f.endswith("manifest.ocdbt"))]
  assert files, f"no array files under {item}"
  return files


def host(tree):
  return jax.tree.map(np.asarray, tree)


def assert_tree_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert np.asarray(g).dtype == np.asarray(w).dtype


def teacher(teachers, i):
  """Slot i of the stacked teacher params, on the host."""
  return jax.tree.map(lambda x: np.asarray(x)[i], teachers.params)


@pytest.fixture
def make_reader():
  """PeerReader factory; closes every reader (joins its thread) at the end."""
  readers = []

  def make(exchange_dir, peers, abstract, **kw):
    r = exchange.PeerReader(str(exchange_dir), peers, abstract, **kw)
    readers.append(r)
    return r

  yield make
  for r in readers:
    r.close()


# 1. -------------------------------------------------------------------------
def test_publish_then_read_stacks_params_on_the_readers_mesh(tmp_path,
                                                             make_reader):
  params = host(nn.Dense(4).init(jax.random.PRNGKey(0), jnp.ones((1, 8))))
  publish(tmp_path, 0, 7, params)
  mesh = reader_mesh()
  abstract = abstract_of(params, mesh)
  reader = make_reader(tmp_path, [0], abstract)
  reader.refresh(block=True)
  t = reader.teachers()

  np.testing.assert_array_equal(np.asarray(t.weights), [1.0])
  assert_tree_equal(t.params, jax.tree.map(lambda x: x[None], params))
  assert reader.slots[0].step == 7 and reader.slots[0].failures == 0
  # Laid out on the reader's own sub-mesh: the leading (teacher) axis is
  # unsplit, the rest follows the abstract target's spec.
  reader_devices = set(jax.devices()[:4])
  for leaf, want in zip(jax.tree.leaves(t.params), jax.tree.leaves(abstract)):
    assert leaf.sharding.device_set == reader_devices
    expected = NamedSharding(mesh, P(None, *want.sharding.spec))
    assert leaf.sharding.is_equivalent_to(expected, leaf.ndim), leaf.sharding
  kernel = t.params["params"]["kernel"]
  assert {s.data.shape for s in kernel.addressable_shards} == {(1, 2, 4)}
  assert t.weights.sharding.device_set == reader_devices
  assert reader.staleness(10) == {"staleness/group_0": 3,
                                  "restore_failures/group_0": 0}
  assert reader.staleness(7)["staleness/group_0"] == 0


# 2. -------------------------------------------------------------------------
def test_slot_of_a_peer_that_has_not_published_has_weight_zero(tmp_path,
                                                               make_reader):
  abstract = abstract_of(step_tree(0), reader_mesh())
  reader = make_reader(tmp_path, [1, 2], abstract)
  reader.refresh(block=True)
  t = reader.teachers()
  np.testing.assert_array_equal(np.asarray(t.weights), [0.0, 0.0])
  for leaf, want in zip(jax.tree.leaves(t.params), jax.tree.leaves(abstract)):
    assert leaf.shape == (2, *want.shape)
    np.testing.assert_array_equal(np.asarray(leaf), 0)
  assert reader.staleness(5) == {"restore_failures/group_1": 0,
                                 "restore_failures/group_2": 0}

  publish(tmp_path, 1, 3, step_tree(3))
  reader.refresh(block=True)
  t = reader.teachers()
  np.testing.assert_array_equal(np.asarray(t.weights), [1.0, 0.0])
  assert_tree_equal(teacher(t, 0), step_tree(3))
  assert_tree_equal(teacher(t, 1), step_tree(0))  # Zeros in the empty slot.
  assert reader.staleness(5) == {"staleness/group_1": 2,
                                 "restore_failures/group_1": 0,
                                 "restore_failures/group_2": 0}

  publish(tmp_path, 2, 4, step_tree(4))
  reader.refresh(block=True)
  t = reader.teachers()
  np.testing.assert_array_equal(np.asarray(t.weights), [1.0, 1.0])
  assert_tree_equal(teacher(t, 0), step_tree(3))
  assert_tree_equal(teacher(t, 1), step_tree(4))
  assert reader.staleness(5)["staleness/group_2"] == 1


# 3. -------------------------------------------------------------------------
def test_newer_step_replaces_older_and_same_step_is_not_reloaded(tmp_path,
                                                                 make_reader):
  reader = make_reader(tmp_path, [0], abstract_of(step_tree(0), reader_mesh()))
  publish(tmp_path, 0, 1, step_tree(1))
  reader.refresh(block=True)
  first = reader.teachers()
  held = reader.slots[0].params
  assert reader.slots[0].step == 1
  assert reader.teachers() is first  # Nothing changed: no re-stacking.

  # No new step: the held step is neither re-read nor re-stacked. Its files
  # are made unreadable first, so a re-read would show up as a failure.
  for f in array_files(tmp_path, 0, 1):
    with open(f, "wb") as fh:
      fh.write(b"garbage")
  reader.refresh(block=True)
  assert reader.slots[0].step == 1
  assert reader.slots[0].params is held
  assert reader.slots[0].failures == 0 and reader.slots[0].last_error == ""
  assert reader.teachers() is first

  # Newer steps replace it; the newest committed one wins.
  publish(tmp_path, 0, 2, step_tree(2))
  publish(tmp_path, 0, 3, step_tree(3))
  reader.refresh(block=True)
  assert reader.slots[0].step == 3
  second = reader.teachers()
  assert second is not first
  assert_tree_equal(teacher(second, 0), step_tree(3))
  assert reader.teachers() is second
  assert reader.staleness(3) == {"staleness/group_0": 0,
                                 "restore_failures/group_0": 0}


# 4. -------------------------------------------------------------------------
@FORMATS
@pytest.mark.parametrize("block", [True, False])
def test_reader_only_ever_holds_committed_steps_of_a_concurrent_writer(
    tmp_path, make_reader, block, fmt):
  """block=False is the training loop's pattern: teachers() runs while the
  background thread restores."""
  num_steps = 30
  writer_errors = []

  def writer():
    pub = exchange.Publisher(str(tmp_path), 0, max_to_keep=3, fmt=fmt)
    try:
      for s in range(1, num_steps + 1):
        pub.publish(s, on_writer(step_tree(s)))
      pub.wait()
    except BaseException as e:  # pylint: disable=broad-except
      writer_errors.append(e)
    finally:
      pub.close()

  reader = make_reader(tmp_path, [0], abstract_of(step_tree(0), reader_mesh()))
  published = paths.published_dir(str(tmp_path), 0)
  thread = threading.Thread(target=writer)
  thread.start()
  seen_steps, saw_uncommitted, last = set(), False, 0
  try:
    while thread.is_alive():
      if os.path.isdir(published):
        saw_uncommitted |= any(".orbax-checkpoint-tmp" in n or
                               n.endswith(".__lock")
                               for n in os.listdir(published))
      reader.refresh(block=block)  # Must never raise.
      t = reader.teachers()
      held = teacher(t, 0)
      if float(t.weights[0]) == 0.0:
        assert last == 0  # Once a teacher is held it is never dropped.
        assert_tree_equal(held, step_tree(0))
      else:
        np.testing.assert_array_equal(np.asarray(t.weights), [1.0])
        step = float(held["params"]["kernel"][0, 0])
        assert step.is_integer() and 1 <= step <= num_steps, step
        step = int(step)
        # Exactly the tree published at that step: no partial or mixed tree.
        assert_tree_equal(held, step_tree(step))
        assert step >= last
        if block:
          assert reader.slots[0].step == step
        last = step
        seen_steps.add(step)
      if not block:
        time.sleep(0.002)
  finally:
    thread.join()
  assert not writer_errors, writer_errors
  reader.refresh(block=True)  # Waits for one that may still be running...
  reader.refresh(block=True)  # ...then reads what is committed now.
  assert reader.slots[0].step == num_steps
  assert_tree_equal(teacher(reader.teachers(), 0), step_tree(num_steps))
  assert reader.slots[0].failures == 0, reader.slots[0].last_error
  # The race was exercised: it followed several steps while they were
  # written, max_to_keep deleted old ones, and (Orbax's many files take
  # long enough to see) uncommitted saves were on disk while it read.
  assert saw_uncommitted or fmt == "blob"
  assert len(seen_steps) >= 3, seen_steps
  assert exchange.published_steps(published) == list(
      range(num_steps - 2, num_steps + 1))


def test_half_written_object_of_a_higher_step_is_ignored(tmp_path,
                                                       make_reader):
  publish(tmp_path, 0, 1, step_tree(1))
  published = paths.published_dir(str(tmp_path), 0)
  whole = open(os.path.join(published, "1.params"), "rb").read()
  # What a writer killed mid-write leaves: tensorstore's temporary key.
  with open(os.path.join(published, "12.params.__lock"), "wb") as f:
    f.write(whole[:len(whole) // 2])
  assert exchange.published_steps(published) == [1]
  reader = make_reader(tmp_path, [0], abstract_of(step_tree(0), reader_mesh()))
  reader.refresh(block=True)
  assert reader.slots[0].step == 1 and reader.slots[0].failures == 0
  # A restarted publisher clears it away.
  exchange.Publisher(str(tmp_path), 0).close()
  assert not os.path.exists(os.path.join(published, "12.params.__lock"))


def test_uncommitted_orbax_tmp_directory_of_a_higher_step_is_ignored(
    tmp_path, make_reader):
  exchange_dir, scratch = tmp_path / "exchange", tmp_path / "scratch"
  publish(exchange_dir, 0, 1, step_tree(1), fmt="orbax")
  publish(scratch, 0, 9, step_tree(9), fmt="orbax")
  published = paths.published_dir(str(exchange_dir), 0)
  # A save of step 9 that wrote everything but was never renamed (orbax's own
  # tmp name), and a half-written step 12 (tmp name with a timestamp).
  complete_tmp = os.path.join(published, "9.orbax-checkpoint-tmp")
  shutil.copytree(step_dir(scratch, 0, 9), complete_tmp)
  partial_tmp = os.path.join(published, "12.orbax-checkpoint-tmp-1712345678")
  shutil.copytree(step_dir(scratch, 0, 9), partial_tmp)
  partial_files = sorted(
      f for f in glob.glob(os.path.join(partial_tmp, "**"), recursive=True)
      if os.path.isfile(f))
  for i, f in enumerate(partial_files):
    if i % 2:
      os.remove(f)
    else:
      os.truncate(f, os.path.getsize(f) // 2)
  assert exchange.published_steps(published) == [1]

  reader = make_reader(exchange_dir, [0],
                       abstract_of(step_tree(0), reader_mesh()))
  reader.refresh(block=True)
  assert reader.slots[0].step == 1
  assert_tree_equal(teacher(reader.teachers(), 0), step_tree(1))
  assert reader.slots[0].failures == 0 and reader.slots[0].last_error == ""

  # Once committed (renamed, as orbax does), the same directory is read.
  os.rename(complete_tmp, os.path.join(published, "9"))
  reader.refresh(block=True)
  assert reader.slots[0].step == 9
  assert_tree_equal(teacher(reader.teachers(), 0), step_tree(9))
  assert reader.slots[0].failures == 0


# 5. -------------------------------------------------------------------------
def big_tree(step):
  """Params with a leaf too large and too random to be inlined or compressed
  away, so its bytes live in their own data file."""
  rng = np.random.RandomState(step)
  return {"params": {"kernel": rng.rand(64, 32).astype(np.float32),
                     "bias": np.full((4,), -float(step), np.float32)}}


def truncate_largest_data_file(exchange_dir, group, step):
  f = max(array_files(exchange_dir, group, step), key=os.path.getsize)
  assert os.path.getsize(f) > 64 * 32 * 4 // 2  # The kernel's data in it.
  os.truncate(f, os.path.getsize(f) // 2)


def overwrite_array_files_with_garbage(exchange_dir, group, step):
  rng = np.random.RandomState(0)
  for f in array_files(exchange_dir, group, step):
    size = os.path.getsize(f)
    with open(f, "wb") as fh:
      fh.write(rng.randint(0, 256, size, dtype=np.uint8).tobytes())


def truncate_array_files_to_nothing(exchange_dir, group, step):
  for f in array_files(exchange_dir, group, step):
    os.truncate(f, 0)


@FORMATS
@pytest.mark.parametrize("corrupt", [truncate_largest_data_file,
                                     overwrite_array_files_with_garbage,
                                     truncate_array_files_to_nothing])
def test_corrupt_peer_checkpoint_keeps_the_previous_teacher(tmp_path,
                                                            make_reader,
                                                            corrupt, fmt):
  reader = make_reader(tmp_path, [0], abstract_of(big_tree(0), reader_mesh()))
  publish(tmp_path, 0, 1, big_tree(1), fmt=fmt)
  reader.refresh(block=True)
  before = reader.teachers()
  publish(tmp_path, 0, 2, big_tree(2), fmt=fmt)
  corrupt(tmp_path, 0, 2)
  assert exchange.published_steps(
      paths.published_dir(str(tmp_path), 0)) == [1, 2]

  reader.refresh(block=True)  # Must not raise.
  slot = reader.slots[0]
  assert slot.step == 1 and slot.failures == 1
  assert slot.last_error.startswith("step 2: "), slot.last_error
  assert reader.staleness(4) == {"staleness/group_0": 3,
                                 "restore_failures/group_0": 1}
  t = reader.teachers()
  assert t is before
  np.testing.assert_array_equal(np.asarray(t.weights), [1.0])
  assert_tree_equal(teacher(t, 0), big_tree(1))

  # A good newer step is taken as soon as it is committed.
  publish(tmp_path, 0, 3, big_tree(3), fmt=fmt)
  reader.refresh(block=True)
  assert reader.slots[0].step == 3
  assert_tree_equal(teacher(reader.teachers(), 0), big_tree(3))


def wider_kernel(step):
  return step_tree(step, kernel_shape=(8, 5))


def without_bias(step):
  return {"params": {"kernel": step_tree(step)["params"]["kernel"]}}


def with_extra_leaf(step):
  tree = step_tree(step)
  tree["params"]["scale"] = np.ones((4,), np.float32)
  return tree


@FORMATS
@pytest.mark.parametrize("other, leaf", [(wider_kernel, "kernel"),
                                         (without_bias, "bias"),
                                         (with_extra_leaf, "scale")])
def test_peer_checkpoint_of_another_architecture_keeps_the_previous_teacher(
    tmp_path, make_reader, other, leaf, fmt):
  reader = make_reader(tmp_path, [0], abstract_of(step_tree(0), reader_mesh()))
  publish(tmp_path, 0, 1, step_tree(1), fmt=fmt)
  reader.refresh(block=True)
  before = reader.teachers()
  publish(tmp_path, 0, 2, other(2), fmt=fmt)

  reader.refresh(block=True)  # Must not raise.
  slot = reader.slots[0]
  assert slot.step == 1 and slot.failures == 1
  assert "another architecture" in slot.last_error, slot.last_error
  assert leaf in slot.last_error, slot.last_error
  assert reader.staleness(2)["restore_failures/group_0"] == 1
  assert reader.teachers() is before
  assert_tree_equal(teacher(before, 0), step_tree(1))
  # Still incompatible on the next refresh: kept again, counted again.
  reader.refresh(block=True)
  assert reader.slots[0].step == 1 and reader.slots[0].failures == 2


def remove_item_dir(exchange_dir, group, step):
  """What a reader sees while max_to_keep's rmtree is deleting the step."""
  shutil.rmtree(os.path.join(step_dir(exchange_dir, group, step), "default"))


@pytest.mark.parametrize("damage,fmt", [
    (remove_item_dir, "orbax"), (overwrite_array_files_with_garbage, "orbax"),
    (overwrite_array_files_with_garbage, "blob")])
def test_unreadable_checkpoint_is_not_reported_as_another_architecture(
    tmp_path, make_reader, damage, fmt):
  reader = make_reader(tmp_path, [0], abstract_of(step_tree(0), reader_mesh()))
  publish(tmp_path, 0, 1, step_tree(1), fmt=fmt)
  reader.refresh(block=True)
  publish(tmp_path, 0, 2, step_tree(2), fmt=fmt)
  damage(tmp_path, 0, 2)
  reader.refresh(block=True)
  assert reader.slots[0].step == 1
  assert "architecture" not in reader.slots[0].last_error, (
      reader.slots[0].last_error)


@FORMATS
def test_bit_flipped_peer_checkpoint_is_not_used_as_teacher(tmp_path,
                                                            make_reader, fmt):
  reader = make_reader(tmp_path, [0], abstract_of(big_tree(0), reader_mesh()))
  publish(tmp_path, 0, 1, big_tree(1), fmt=fmt)
  reader.refresh(block=True)
  publish(tmp_path, 0, 2, big_tree(2), fmt=fmt)
  f = max(array_files(tmp_path, 0, 2), key=os.path.getsize)
  data = bytearray(open(f, "rb").read())
  middle = len(data) // 2
  data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
  with open(f, "wb") as fh:
    fh.write(bytes(data))
  reader.refresh(block=True)
  held = teacher(reader.teachers(), 0)
  want = big_tree(reader.slots[0].step)
  assert_tree_equal(held, want)  # Either step 1 kept or step 2 intact.


# 6. -------------------------------------------------------------------------
def test_teacher_dtype_bfloat16_casts_float_params_only(tmp_path, make_reader):
  def tree(step):
    t = step_tree(step)
    t["params"]["kernel"] += 0.1  # Not exactly representable in bfloat16.
    t["counts"] = np.full((4,), step, np.int32)
    return t

  reader = make_reader(tmp_path, [0, 1], abstract_of(tree(0), reader_mesh()),
                       teacher_dtype=jnp.bfloat16)
  publish(tmp_path, 0, 5, tree(5))
  reader.refresh(block=True)
  t = reader.teachers()
  np.testing.assert_array_equal(np.asarray(t.weights), [1.0, 0.0])
  assert t.params["params"]["kernel"].dtype == jnp.bfloat16
  assert t.params["params"]["bias"].dtype == jnp.bfloat16
  assert t.params["counts"].dtype == jnp.int32
  want = tree(5)
  np.testing.assert_array_equal(
      np.asarray(t.params["params"]["kernel"][0]),
      want["params"]["kernel"].astype(jnp.bfloat16))
  np.testing.assert_array_equal(np.asarray(t.params["counts"][0]),
                                want["counts"])
  np.testing.assert_array_equal(  # The empty slot's zeros are cast too.
      np.asarray(t.params["params"]["kernel"][1], np.float32), 0)


# 7. -------------------------------------------------------------------------
@FORMATS
def test_committed_steps(tmp_path, make_reader, fmt):
  missing = paths.published_dir(str(tmp_path / "nowhere"), 0)
  assert exchange.published_steps(missing) == []
  os.makedirs(tmp_path / "empty")
  assert exchange.published_steps(str(tmp_path / "empty")) == []
  publish(tmp_path, 0, 2, step_tree(2), fmt=fmt)
  publish(tmp_path, 0, 10, step_tree(10), fmt=fmt)
  assert exchange.published_steps(
      paths.published_dir(str(tmp_path), 0)) == [2, 10]  # Numeric order.
  # A reader of an exchange dir that does not exist yet just holds nothing.
  reader = make_reader(tmp_path / "nowhere", [0],
                       abstract_of(step_tree(0), reader_mesh()))
  reader.refresh(block=True)
  np.testing.assert_array_equal(np.asarray(reader.teachers().weights), [0.0])


# 8. -------------------------------------------------------------------------
def test_restarted_publisher_keeps_the_steps_it_replays(tmp_path,
                                                        make_reader):
  """A group killed after publishing step 2 resumes from an older checkpoint
  and replays step 2: the committed step 2 stays, nothing crashes."""
  publish(tmp_path, 0, 1, step_tree(1))
  publish(tmp_path, 0, 2, step_tree(2))
  pub = exchange.Publisher(str(tmp_path), 0)  # The restarted process.
  try:
    assert not pub.publish(2, on_writer(step_tree(20)))  # The replay.
    assert pub.publish(3, on_writer(step_tree(3)))
    pub.wait()
  finally:
    pub.close()
  assert exchange.published_steps(
      paths.published_dir(str(tmp_path), 0)) == [1, 2, 3]
  reader = make_reader(tmp_path, [0], abstract_of(step_tree(0), reader_mesh()))
  reader.refresh(block=True)
  assert_tree_equal(teacher(reader.teachers(), 0), step_tree(3))
  step2 = exchange.PeerReader(str(tmp_path), [0],
                              abstract_of(step_tree(0), reader_mesh()))
  try:
    step2._restore_one(step2.slots[0], only_step=2)  # pylint: disable=protected-access
    assert_tree_equal(jax.tree.map(np.asarray, step2.slots[0].params),
                      step_tree(2))
  finally:
    step2.close()
