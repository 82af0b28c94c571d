"""The teacher service on a local Ray cluster on loopback (EDL-Dist).

One cluster (2 logical CPUs, workers of 0.5 CPU each) serves every test of
this module. Batches carry example ids so that loss, duplication and order
are checked sample by sample, and every target is compared with the
in-process teacher's on the same batch.
"""

import dataclasses
import importlib.util
import ipaddress
import os
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

ray = pytest.importorskip("ray")

# pylint: disable=g-import-not-at-top,wrong-import-position
import codistill_jax
from codistill_jax import data as data_lib
from codistill_jax import losses
from codistill_jax import mesh as mesh_lib
from codistill_jax import metrics as metrics_lib
from codistill_jax import build
from codistill_jax import teachers as teachers_lib
from codistill_jax import train
from codistill_jax.service import pool as pool_lib
from codistill_jax.service import reader as reader_lib
from codistill_jax.errors import ConfigError
from codistill_jax.service import teacher as teacher_lib
from tests.test_train import ROOT
from tests.test_train import load_config
# pylint: enable=g-import-not-at-top,wrong-import-position

WORKER_CPUS = 0.5  # Up to 4 workers on the 2 logical CPUs of the cluster.
TOL = dict(rtol=1e-5, atol=1e-6)  # Service vs in-process targets.


@pytest.fixture(scope="module")
def cluster():
  owned = pool_lib.connect("", num_cpus=2)
  yield
  if owned:
    ray.shutdown()


@pytest.fixture(scope="module")
def flights(tmp_path_factory):
  """A trained flights teacher, its spec, and an iterator of id'd batches."""
  root = tmp_path_factory.mktemp("service")
  config = load_config("flights")
  config.total_steps = 10
  train.train_and_evaluate(config, str(root / "teacher"))
  config.codistill.teacher_checkpoint = str(root / "teacher")
  config.codistill.temperature = 2.0
  datasets = data_lib.get_module("flights").get_datasets(
      config, group=0, num_groups=1, process_index=0, process_count=1)
  example = next(iter(datasets.train(0)))
  spec = teacher_lib.TeacherSpec(
      checkpoint=str(root / "teacher" / "group_0" / "checkpoints" / "10"),
      model_name="ctr_mlp", model_kwargs=config.model.to_dict(),
      info={k: datasets.info[k] for k in ("cardinalities", "num_dense")},
      example_inputs=jax.tree.map(lambda x: x[:1] * 0, example["inputs"]),
      temperature=2.0, binary=True)
  return config, datasets, spec


def id_batches(datasets, n):
  """`n` training batches, each with 'id': its examples' global positions."""
  it = datasets.train(0)
  for step in range(n):
    batch = next(it)
    size = len(batch["labels"])
    yield {**batch, "id": np.arange(step * size, (step + 1) * size)}


def in_process_targets(config, datasets, batches):
  """The trainer's in-process teacher (teachers.FromCheckpoint) on `batches`."""
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  setup = build.build(config, datasets, mesh)
  apply_fn = build.teacher_model(config, datasets.info).apply
  teachers = teachers_lib.FromCheckpoint(teachers_lib.Context(
      config, group=0, setup=setup, datasets=datasets, params=None,
      storage=None, total_steps=config.total_steps, shared={})).teachers
  cd = config.codistill

  @jax.jit
  def target(inputs):
    logits = apply_fn(jax.tree.map(lambda x: x[0], teachers.params), inputs,
                      train=False)[None]
    return losses.teacher_targets(logits, teachers.weights, cd.temperature,
                                  config.loss == "sigmoid_xent")[0]

  return [np.asarray(target(b["inputs"])) for b in batches]


@pytest.fixture(scope="module")
def expected(flights):
  config, datasets, _ = flights
  return in_process_targets(config, datasets, list(id_batches(datasets, 60)))


@pytest.fixture
def workers(cluster, flights):
  """Starts workers on demand; kills whatever is left at the end."""
  del cluster
  started = []

  def start(n):
    handles = pool_lib.start_workers(flights[2], n, cpus=WORKER_CPUS)
    ray.get([h.ready.remote() for h in handles])
    started.extend(handles)
    return handles

  yield start
  for h in started:
    ray.kill(h)
  # Names are released asynchronously; the next test starts from none.
  deadline = time.time() + 10
  while time.time() < deadline and ray.util.list_named_actors(
      all_namespaces=True):
    time.sleep(0.05)


def make_reader(spec, batches, **kwargs):
  kwargs = {"depth": 4, "timeout_s": 30.0, "retries": 3, **kwargs}
  return reader_lib.TargetReader(batches, pool_lib.Pool(spec.fingerprint()),
                                 **kwargs)


def check_stream(out, expected):
  """No sample lost or duplicated, in order, and every target right."""
  ids = np.concatenate([b["id"] for b in out])
  np.testing.assert_array_equal(ids, np.arange(len(ids)))
  assert len(out) == len(expected)
  for b, want in zip(out, expected):
    np.testing.assert_allclose(b["teacher"]["probs"], want, **TOL)


# ---------------------------------------------------------------------------
# Targets.
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_targets_equal_the_in_process_teacher(flights, expected, workers):
  config, datasets, spec = flights
  workers(2)
  out = list(make_reader(spec, id_batches(datasets, 8)))
  check_stream(out, expected[:8])
  # The loss consumes these: float32 P(y=1) per example, no other key.
  assert set(out[0]["teacher"]) == {"probs"}
  assert out[0]["teacher"]["probs"].dtype == np.float32
  assert out[0]["teacher"]["probs"].shape == out[0]["labels"].shape
  del config


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory, small_data):
  """A trained Fashion-MNIST (softmax) teacher: (config, its step dir)."""
  root = tmp_path_factory.mktemp("fmnist")
  config = load_config("fashion_mnist")
  for flag in small_data["fashion_mnist"]:  # '--config.data.path=...'.
    key, value = flag[len("--config.data."):].split("=")
    config.data[key] = type(config.data[key])(value)
  config.total_steps = 5
  train.train_and_evaluate(config, str(root / "teacher"))
  config.codistill.teacher_checkpoint = str(root / "teacher")
  return config, str(root / "teacher" / "group_0" / "checkpoints" / "5")


@pytest.mark.slow
def test_sparse_topk_target_of_a_softmax_teacher(fmnist, cluster):
  del cluster
  config, step_dir = fmnist
  datasets = data_lib.get_module("fashion_mnist").get_datasets(
      config, group=0, num_groups=1, process_index=0, process_count=1)
  batches = [next(iter(datasets.train(s))) for s in range(2)]
  want = in_process_targets(config, datasets, batches)
  for k in (0, 3):
    spec = teacher_lib.TeacherSpec(
        checkpoint=step_dir,
        model_name="cnn", model_kwargs=config.model.to_dict(),
        info={"num_classes": datasets.info["num_classes"]},
        example_inputs=batches[0]["inputs"][:1] * 0, topk=k)
    handles = pool_lib.start_workers(spec, 1, cpus=WORKER_CPUS)
    try:
      out = list(make_reader(spec, iter(batches)))
    finally:
      ray.kill(handles[0])
    for b, probs in zip(out, want):
      if k == 0:
        np.testing.assert_allclose(b["teacher"]["probs"], probs, **TOL)
        continue
      ids, top = b["teacher"]["topk_ids"], b["teacher"]["topk_probs"]
      assert ids.dtype == np.int32 and ids.shape == probs.shape[:-1] + (k,)
      np.testing.assert_allclose(
          top, np.take_along_axis(probs, ids, -1), **TOL)
      np.testing.assert_allclose(top, -np.sort(-probs, -1)[:, :k], **TOL)


# ---------------------------------------------------------------------------
# Faults and elasticity.
# ---------------------------------------------------------------------------
def _busy_worker(reader):
  """Name and handle of a worker with requests of `reader` in flight."""
  for _ in range(200):
    busy = [w for w in reader.pool.workers.values() if w.in_flight]
    if busy:
      return busy[0]
    time.sleep(0.01)
  raise AssertionError("no worker has requests in flight")


@pytest.mark.slow
def test_killed_workers_lose_and_duplicate_no_sample(flights, expected,
                                                     workers):
  _, datasets, spec = flights
  workers(3)
  reader = make_reader(spec, id_batches(datasets, 60), depth=6)
  out, killed = [], []
  for i, batch in enumerate(reader):
    out.append(batch)
    if i in (10, 30):  # Kill a worker that holds requests of ours.
      w = _busy_worker(reader)
      killed.append(w.name)
      if i == 10:
        ray.kill(w.handle)
      else:
        pid = ray.get(w.handle.ready.remote())["pid"]
        os.kill(pid, signal.SIGKILL)
  check_stream(out, expected)
  assert reader.stats["retries"] >= 2  # Each kill lost requests in flight.
  assert set(killed).isdisjoint(reader.pool.workers)
  assert reader.pool.left == 2 and len(reader.pool.workers) == 1


@pytest.mark.slow
def test_hung_worker_times_out_and_its_batches_go_elsewhere(
    flights, expected, workers):
  _, datasets, spec = flights
  handles = workers(2)
  pid = ray.get(handles[0].ready.remote())["pid"]
  reader = make_reader(spec, id_batches(datasets, 20), timeout_s=2.0)
  out = [next(reader)]
  os.kill(pid, signal.SIGSTOP)
  try:
    out += list(reader)
  finally:
    os.kill(pid, signal.SIGCONT)
  check_stream(out, expected[:20])
  assert reader.stats["timeouts"] >= 1
  assert reader.stats["retries"] >= reader.stats["timeouts"]


@pytest.mark.slow
def test_worker_added_mid_run_takes_load(flights, expected, workers):
  _, datasets, spec = flights
  workers(1)
  reader = make_reader(spec, id_batches(datasets, 40))
  out = [next(reader) for _ in range(10)]
  first = set(reader.stats["served"])
  (new,) = workers(1)
  out += list(reader)
  check_stream(out, expected[:40])
  assert reader.pool.joined == 2
  (new_name,) = set(reader.pool.workers) - first
  # The least loaded worker gets the next request: the newcomer serves a
  # good share of the remaining 30 batches.
  assert reader.stats["served"][new_name] >= 8, reader.stats
  del new


@pytest.mark.slow
def test_two_students_share_the_pool(flights, expected, workers):
  _, datasets, spec = flights
  workers(2)
  readers = [make_reader(spec, id_batches(datasets, 12)) for _ in range(2)]
  outs = [[], []]
  for _ in range(12):  # Interleaved, as two trainers would be.
    for r, out in zip(readers, outs):
      out.append(next(r))
  for r, out in zip(readers, outs):
    check_stream(out, expected[:12])
    assert len(r.stats["served"]) == 2  # Each student used both workers.


# ---------------------------------------------------------------------------
# No worker: fall back, or wait and fail clearly.
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_no_worker_falls_back_to_the_in_process_teacher(flights, expected,
                                                        cluster):
  del cluster
  _, datasets, spec = flights
  reader = make_reader(spec, id_batches(datasets, 5), no_worker="fallback",
                       fallback=lambda: teacher_lib.Teacher(spec))
  out = list(reader)
  check_stream(out, expected[:5])
  assert reader.stats["fallback_batches"] == 5


@pytest.mark.slow
def test_no_worker_wait_times_out_with_a_clear_error(flights, cluster):
  del cluster
  _, datasets, spec = flights
  reader = make_reader(spec, id_batches(datasets, 5), wait_timeout_s=1.0)
  t = time.time()
  with pytest.raises(reader_lib.NoTeacherError,
                     match="no teacher worker alive.*no_worker='fallback'"):
    next(reader)
  assert 1.0 <= time.time() - t < 10


@pytest.mark.slow
def test_workers_of_another_teacher_are_never_used(flights, workers):
  _, datasets, spec = flights
  workers(1)
  other = teacher_lib.TeacherSpec(**{**spec.__dict__, "temperature": 1.0})
  assert other.fingerprint() != spec.fingerprint()
  reader = make_reader(other, id_batches(datasets, 2), wait_timeout_s=0.5)
  with pytest.raises(reader_lib.NoTeacherError):
    next(reader)


# ---------------------------------------------------------------------------
# Security: loopback only.
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_local_cluster_listens_on_loopback_only(cluster, workers):
  del cluster
  workers(1)
  assert pool_lib.loopback_only()
  assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
  psutil = pytest.importorskip("psutil")
  ours = {p.pid for p in psutil.Process().children(recursive=True)}
  listening = [c for c in psutil.net_connections("inet")
               if c.status == psutil.CONN_LISTEN and c.pid in ours]
  assert listening
  assert all(_is_loopback(c.laddr.ip) for c in listening), listening


def _is_loopback(ip: str) -> bool:
  addr = ipaddress.ip_address(ip)
  return addr.is_loopback or bool(
      getattr(addr, "ipv4_mapped", None) and addr.ipv4_mapped.is_loopback)


# ---------------------------------------------------------------------------
# The trainer: teacher_source='service'.
# ---------------------------------------------------------------------------
def student_config(teacher_dir, teacher_model, source, **service):
  config = load_config("flights")
  config.total_steps, config.log_every = 60, 1
  config.eval_every = config.checkpoint_every = 60
  cd = config.codistill
  cd.teacher_source, cd.teacher_checkpoint = source, teacher_dir
  cd.teacher_model_name = "ctr_mlp"
  cd.teacher_model.unlock()
  cd.teacher_model.update(teacher_model)
  cd.burn_in_steps, cd.temperature = 0, 2.0
  cd.service.worker_cpus = WORKER_CPUS
  for k, v in service.items():
    cd.service[k] = v
  return config


def train_rows(config, workdir):
  final = train.train_and_evaluate(config, workdir)
  rows = [r for r in metrics_lib.read_jsonl(
      os.path.join(workdir, "group_0", "metrics.jsonl")) if "loss" in r]
  return final, rows


@pytest.mark.slow
def test_two_phase_run_through_the_service_matches_in_process_and_survives(
    tmp_path, cluster, monkeypatch):
  del cluster
  teacher = load_config("flights")
  teacher.model.hidden_sizes, teacher.total_steps = (24, 8), 10
  train.train_and_evaluate(teacher, str(tmp_path / "teacher"))
  args = (str(tmp_path / "teacher"), teacher.model.to_dict())
  want_final, want = train_rows(student_config(*args, "checkpoint"),
                                str(tmp_path / "in_process"))

  # The same run through the service, while workers are killed and added:
  # the data iterator (read ahead by the service's reader) does it when the
  # reader draws given batches, so it happens mid-run with requests in
  # flight.
  real = data_lib.get_module("flights")
  events = []

  def get_datasets(config, **kwargs):
    ds = real.get_datasets(config, **kwargs)

    def chaos(start):
      for s, batch in enumerate(ds.train(start), start):
        names = sorted(a["name"] for a in ray.util.list_named_actors(
            all_namespaces=True))
        if s == 15:  # SIGKILL the process of one worker.
          actor = ray.get_actor(names[0], namespace=pool_lib.NAMESPACE)
          os.kill(ray.get(actor.ready.remote())["pid"], signal.SIGKILL)
          events.append(("os.kill", names[0]))
        elif s == 25:  # A new worker joins.
          spec = teacher_lib.spec_from_config(config, ds.info, batch)
          (h,) = pool_lib.start_workers(spec, 1, cpus=WORKER_CPUS)
          ray.get(h.ready.remote())
          events.append(("join", None))
        elif s == 40:  # ray.kill another.
          ray.kill(ray.get_actor(names[-1], namespace=pool_lib.NAMESPACE))
          events.append(("ray.kill", names[-1]))
        yield batch

    return dataclasses.replace(ds, train=chaos)

  shim = types.SimpleNamespace(**{**vars(real), "get_datasets": get_datasets})
  monkeypatch.setattr(data_lib, "get_module", lambda name: shim)
  got_final, got = train_rows(
      student_config(*args, "service", num_workers=2, in_flight=4),
      str(tmp_path / "service"))
  assert [e[0] for e in events] == ["os.kill", "join", "ray.kill"]

  # Every step trained on its own batch with the right target: the same
  # numbers as in-process distillation (same loss code; targets agree to
  # float rounding).
  assert [r["step"] for r in got] == [r["step"] for r in want]
  for key in ("loss", "task_loss", "distill_loss", "peer_abs_diff"):
    np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want],
                               rtol=1e-5, atol=1e-6, err_msg=key)
  for key, value in want_final[0].items():
    assert got_final[0][key] == pytest.approx(value, rel=1e-5), key
  assert all(r["alpha"] == 1.0 and r["distill_loss"] > 0 for r in got)
  last = got[-1]
  assert last["service/workers_left"] == 2
  assert last["service/workers_joined"] == 3
  assert last["service/workers"] == 1
  assert last["service/fallback_batches"] == 0
  # The run's own workers are stopped at the end.
  deadline = time.time() + 10
  while time.time() < deadline and ray.util.list_named_actors(
      all_namespaces=True):
    time.sleep(0.05)
  assert not ray.util.list_named_actors(all_namespaces=True)


# ---------------------------------------------------------------------------
# Configuration.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,match", [
    ("service.no_worker", "retry", "no_worker"),
    ("service.in_flight", 0, "in_flight"),
    ("service.request_timeout_s", 0.0, "request_timeout_s"),
    ("service.retries", -1, "retries"),
    ("topk", 5, "softmax"),
    ("divergence", "mse", "probabilities, not logits"),
    ("teacher_checkpoint", "", "teacher_checkpoint"),
])
def test_bad_service_config_is_a_clear_error(tmp_path, field, value, match):
  config = student_config(str(tmp_path), {}, "service")
  node = config.codistill
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ConfigError, match=match):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_without_ray_the_error_names_the_extra(tmp_path, monkeypatch):
  config = student_config(str(tmp_path), {}, "service")
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
      None if name == "ray" else real_find_spec(name, *a)))
  with pytest.raises(ConfigError, match=r"pip install -e \.\[service\]"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  # And where the trainer imports the service, lazily.
  monkeypatch.setitem(sys.modules, "ray", None)
  for name in [m for m in sys.modules if m.startswith("codistill_jax.service")]:
    monkeypatch.delitem(sys.modules, name)
  monkeypatch.delattr(codistill_jax, "service")
  with pytest.raises(ConfigError, match=r"pip install -e \.\[service\]"):
    teachers_lib.FromService(teachers_lib.Context(
        config, group=0, setup=None, datasets=None, params=None, storage=None,
        total_steps=config.total_steps, shared={}))


@pytest.mark.slow
def test_sparse_topk_run_through_the_service_matches_in_process(
    fmnist, cluster, tmp_path):
  del cluster
  config = fmnist[0].copy_and_resolve_references()  # The fixture is shared.
  cd = config.codistill
  cd.topk, cd.burn_in_steps, cd.temperature = 3, 0, 2.0
  config.total_steps, config.log_every = 8, 1
  config.eval_every = config.checkpoint_every = 8
  cd.service.num_workers, cd.service.worker_cpus = 1, WORKER_CPUS
  rows = {}
  for source in ("checkpoint", "service"):
    cd.teacher_source = source
    rows[source] = train_rows(config, str(tmp_path / source))[1]
  for key in ("loss", "distill_loss", "peer_agreement"):
    np.testing.assert_allclose([r[key] for r in rows["service"]],
                               [r[key] for r in rows["checkpoint"]],
                               rtol=1e-5, atol=1e-6, err_msg=key)
  assert all(r["distill_loss"] > 0 for r in rows["service"])


@pytest.mark.slow
def test_teacher_of_another_architecture_is_refused_at_start(flights,
                                                             tmp_path):
  config = flights[0]
  wrong = {**config.model.to_dict(), "hidden_sizes": (24, 8)}
  student = student_config(config.codistill.teacher_checkpoint, wrong,
                           "service")
  with pytest.raises(ConfigError, match="another architecture"):
    train.train_and_evaluate(student, str(tmp_path / "run"))


@pytest.mark.slow
def test_workers_added_from_another_process_outlive_it(flights, expected,
                                                       cluster):
  del cluster
  config, datasets, spec = flights
  flags = [f"--config={ROOT}/configs/flights.py:quick",
           "--config.codistill.teacher_source=service",
           f"--config.codistill.teacher_checkpoint="
           f"{config.codistill.teacher_checkpoint}",
           "--config.codistill.temperature=2.0",
           "--config.codistill.service.address="
           + ray.get_runtime_context().gcs_address,
           "--config.codistill.service.num_workers=1",
           f"--config.codistill.service.worker_cpus={WORKER_CPUS}"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}

  def serve(*extra):
    result = subprocess.run(
        [sys.executable, "-m", "codistill_jax.tools.serve", *flags, *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout

  assert "serving 1 worker(s)" in serve()
  # The command has exited; its detached worker serves this student.
  reader = make_reader(spec, id_batches(datasets, 6), wait_timeout_s=10)
  check_stream(list(reader), expected[:6])
  assert len(reader.stats["served"]) == 1
  assert "stopped 1 worker(s)" in serve("--stop")
  reader = make_reader(spec, id_batches(datasets, 1), wait_timeout_s=1)
  with pytest.raises(reader_lib.NoTeacherError):
    next(reader)
