"""The storage owner's pieces on their own: writer locks, checksums, run
identity, metrics files (storage.py, checkpoint.py, metrics.py)."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codistill_jax import checkpoint
from codistill_jax import mesh as mesh_lib
from codistill_jax import metrics
from codistill_jax import storage
from codistill_jax.errors import ConfigError
from tests.test_train import load_config


def _lock(tmp_path):
  return storage.WriterLock(str(tmp_path / "group_0" / "writer.lock"), 0,
                            str(tmp_path))


def _write_record(lock, **record):
  os.makedirs(os.path.dirname(lock.path), exist_ok=True)
  with open(lock.path, "w") as f:
    json.dump({"since": "then", **record}, f)


def test_writer_lock_is_exclusive_and_released(tmp_path):
  lock = _lock(tmp_path)
  lock.acquire()
  record = json.load(open(lock.path))
  assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
  lock.release()
  assert not os.path.exists(lock.path)


def test_writer_lock_refuses_a_live_holder_naming_it(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", "import time; "
                             "time.sleep(60)"])
  try:
    time.sleep(0.2)
    lock = _lock(tmp_path)
    _write_record(lock, host=socket.gethostname(), pid=holder.pid,
                  pid_start=storage._proc_start(holder.pid))  # pylint: disable=protected-access
    with pytest.raises(ConfigError, match=rf"is being written by pid "
                       rf"{holder.pid} on {socket.gethostname()}"):
      lock.check()
    with pytest.raises(ConfigError, match="stop that run first"):
      lock.acquire()
    assert json.load(open(lock.path))["pid"] == holder.pid  # Untouched.
  finally:
    holder.kill()
    holder.wait()
  # The holder is gone (same host, its pid dead): the lock is taken over.
  lock.acquire()
  assert json.load(open(lock.path))["pid"] == os.getpid()
  lock.release()


def test_writer_lock_of_another_host_is_stale_only_without_heartbeat(
    tmp_path):
  lock = _lock(tmp_path)
  _write_record(lock, host="elsewhere", pid=1, pid_start="1")
  with pytest.raises(ConfigError, match="pid 1 on elsewhere"):
    lock.acquire()
  old = time.time() - storage.WriterLock.STALE_S - 5
  os.utime(lock.path, (old, old))  # No heartbeat for longer than STALE_S.
  lock.acquire()
  assert json.load(open(lock.path))["pid"] == os.getpid()
  lock.release()


def test_a_reused_pid_is_not_mistaken_for_the_holder(tmp_path):
  lock = _lock(tmp_path)
  # Our parent is alive, but the record's start time is another process's.
  _write_record(lock, host=socket.gethostname(), pid=os.getppid(),
                pid_start="1")
  lock.acquire()
  lock.release()


def test_checksum_sees_every_single_bit_flip_and_ignores_sharding():
  rng = np.random.default_rng(0)
  tree = {"w": rng.normal(size=(16, 8)).astype(np.float32),
          "b": rng.normal(size=(8,)).astype(jnp.bfloat16),
          "step": np.array(7, np.int32)}
  base = np.asarray(checkpoint.checksum(tree))
  words = tree["w"].view(np.uint32).copy()
  for position in rng.choice(words.size, 40, replace=False):
    for bit in (0, 13, 31):
      flipped = words.copy().reshape(-1)
      flipped[position] ^= np.uint32(1 << bit)
      other = {**tree, "w": flipped.view(np.float32).reshape(16, 8)}
      assert not np.array_equal(np.asarray(checkpoint.checksum(other)), base)
  swapped = {**tree, "w": tree["w"][::-1]}
  assert not np.array_equal(np.asarray(checkpoint.checksum(swapped)), base)
  mesh = mesh_lib.make_mesh(jax.devices())
  sharded = {**tree, "w": jax.device_put(tree["w"], jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(mesh_lib.DATA_AXIS)))}
  np.testing.assert_array_equal(np.asarray(checkpoint.checksum(sharded)),
                                base)


def test_run_identity_separates_runs_but_not_how_they_are_watched():
  a = load_config("flights_codistill")
  b = a.copy_and_resolve_references()
  b.log_every, b.codistill.exchange_dir = 1, "/elsewhere"
  assert checkpoint.run_identity(a) == checkpoint.run_identity(b)
  assert checkpoint.run_identity(a).startswith("flights-ctr_mlp-seed0-")
  b.seed = 1
  assert checkpoint.run_identity(a) != checkpoint.run_identity(b)
  b.seed, b.model.hidden_sizes = 0, (8,)
  assert checkpoint.run_identity(a) != checkpoint.run_identity(b)


def test_metrics_file_survives_a_torn_last_line(tmp_path, caplog):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(1, {"loss": 1.0})
  writer.write(2, {"loss": 0.5})
  writer.close()
  path = str(tmp_path / "metrics.jsonl")
  with open(path, "a") as f:
    f.write('{"step": 3, "lo')  # A writer killed mid-line.
  assert [r["step"] for r in metrics.read_jsonl(path)] == [1, 2]
  assert "torn last line" in caplog.text
  writer = metrics.MetricWriter(str(tmp_path))  # A resumed run appends.
  writer.write(3, {"loss": 0.25})
  writer.close()
  assert [r["step"] for r in metrics.read_jsonl(path)] == [1, 2, 3]
  with open(path, "a") as f:
    f.write("garbage\n")
    f.write('{"step": 4}\n')
  with pytest.raises(ValueError, match="metrics.jsonl:4 is not a JSON line"):
    metrics.read_jsonl(path)


def test_window_means_leave_out_teacher_metrics_until_a_teacher_is_held():
  stacked = {"loss": np.array([1.0, 2.0, 3.0]),
             "peer_agreement": np.array([1.0, 0.5, 0.7]),
             "distill_loss": np.array([0.0, 0.4, 0.2]),
             "teacher_held": np.array([0.0, 1.0, 1.0])}
  out = metrics.window_means(stacked)
  assert out == {"loss": 2.0, "peer_agreement": 0.6,
                 "distill_loss": pytest.approx(0.3)}
  none = metrics.window_means({**stacked, "teacher_held": np.zeros(3)})
  assert set(none) == {"loss"}


def test_progress_lines_say_done_total_and_eta(caplog):
  caplog.set_level("INFO")
  progress = metrics.Progress("eval validation", 40, every_s=0.0)
  for _ in range(10):
    progress.tick()
  lines = [r.getMessage() for r in caplog.records if "eval validation" in
           r.getMessage()]
  assert lines[-1].startswith("eval validation: 10/40 batches (25%), ETA ")


@pytest.mark.parametrize("fmt,looks_like", [
    ("auto", "10.params"), ("blob", "10.params"), ("orbax", "10")])
def test_exchange_format_chooses_what_a_publish_writes(tmp_path, fmt,
                                                       looks_like):
  from codistill_jax import exchange  # pylint: disable=g-import-not-at-top
  config = load_config("flights_codistill")
  config.codistill.exchange_format = fmt
  store = storage.Storage(str(tmp_path), str(tmp_path / "x"), [0], run="r1")
  store.open(publishing=[0], config=config)
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  try:
    store.publish(0, 10, params, final=True, blocking=True)
  finally:
    store.close()
  (published,) = [os.path.join(d, "published") for d, _, _ in
                  os.walk(tmp_path / "x") if os.path.isdir(
                      os.path.join(d, "published"))]
  names = set(os.listdir(published))
  assert looks_like in names and ({"10", "10.params"} - {looks_like}).isdisjoint(
      names), names
  assert exchange.published_steps(published) == [10]


@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="torch is not installed: nothing to keep out")
def test_the_metric_writer_keeps_torch_out_of_the_process(tmp_path):
  # tensorboardX imports torch when it can; torch and XLA in one process
  # abort together at exit after a signal.
  code = ("import sys; from codistill_jax import metrics; "
          f"metrics.MetricWriter({str(tmp_path)!r}).close(); "
          "assert 'torch' not in sys.modules, 'torch was imported'; "
          "import torch")  # And torch still imports afterwards.
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("content", [
    "", "{", "[1, 2]", '{"host": "h"}', '{"host": "h", "pid": "x"}',
    '{"host": 3, "pid": 3}', "\x00\x00\x00"])
def test_an_empty_or_unparsable_lock_names_nobody_and_is_taken_over(
    tmp_path, content, caplog):
  """The stated rule: no live writer leaves such a file (locks are created
  whole), so it is taken over with a warning naming it; once a traceback,
  or a refusal of 'pid ? on ?' until it aged."""
  lock = _lock(tmp_path)
  os.makedirs(os.path.dirname(lock.path))
  with open(lock.path, "w") as f:
    f.write(content)
  lock.check()  # No holder to name.
  with caplog.at_level("WARNING"):
    lock.acquire()
  assert json.load(open(lock.path))["pid"] == os.getpid()
  assert "empty or unparsable" in caplog.text
  lock.release()


def test_a_lock_is_never_seen_half_written(tmp_path):
  """It is written aside and linked into place: a reader racing the writer
  finds no lock or a whole one."""
  lock = _lock(tmp_path)
  lock.acquire()
  assert sorted(os.listdir(os.path.dirname(lock.path))) == ["writer.lock"]
  assert json.load(open(lock.path))["pid"] == os.getpid()
  lock.release()
  assert os.listdir(os.path.dirname(lock.path)) == []


@pytest.fixture
def full_disk(tmp_path):
  """A 1 MiB tmpfs filled to the last byte; skipped where mount fails."""
  path = tmp_path / "full"
  path.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
                            str(path)], capture_output=True)
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr!r}")
  (path / "group_0").mkdir()
  with open(path / "filler", "wb", buffering=0) as f:
    try:
      while True:
        f.write(b"\0" * 4096)
    except OSError:
      pass
  yield path
  subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_at_the_lock_is_one_line_and_blocks_no_rerun(full_disk):
  lock = storage.WriterLock(str(full_disk / "group_0" / "writer.lock"), 0,
                            str(full_disk))
  with pytest.raises(ConfigError, match="cannot write .*writer.lock: No space "
                     "left on device; free space"):
    lock.acquire()
  assert os.listdir(full_disk / "group_0") == []  # Nothing left behind.
  os.remove(full_disk / "filler")  # Space again: the same command works.
  lock.acquire()
  lock.release()


@pytest.mark.slow
def test_a_run_started_on_a_full_disk_is_one_line_and_leaves_no_lock(
    full_disk):
  from tests.test_train import ROOT  # pylint: disable=g-import-not-at-top
  workdir = str(full_disk / "run")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  cmd = [sys.executable, "-m", "codistill_jax.main",
         "--config=configs/flights.py:quick", f"--workdir={workdir}",
         "--config.total_steps=5"]
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert result.returncode == 2, result.stderr[-3000:]
  assert len(errors) == 1 and "No space left on device" in errors[0], errors
  assert "Traceback" not in result.stderr
  left = [os.path.relpath(os.path.join(d, f), workdir)
          for d, _, fs in os.walk(workdir) for f in fs]
  assert not [f for f in left if "lock" in f], left
  os.remove(full_disk / "filler")  # Space again: the same command runs.
  again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
