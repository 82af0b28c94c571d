"""The Ray side: a loopback cluster, teacher worker actors, and discovery.

Discovery uses Ray's own registry of named actors (kept by the GCS) instead of
a separate store with heartbeats: every worker is a named actor in the Ray
namespace `NAMESPACE`, named `<spec fingerprint>/<id>`. The GCS releases a name
as soon as its actor dies (`ray.kill`, a killed process, a lost node), so a
listing is the set of live workers, and every client reads the whole set
itself: no balancer thread that can die, no assignment that can leave a
second student without teachers. Workers that hang are caught by the reader's
per-request timeout.

Workers run only this module's `TeacherWorker`, which Ray pickles by reference
(`codistill_jax.service.pool.TeacherWorker`), so each worker imports the
project from its own installation; requests carry numpy arrays only.
"""

import dataclasses
import logging as pylogging
import os
import time
import uuid
import warnings

from absl import logging
import ray

from codistill_jax.service import teacher as teacher_lib

# Ray namespace of every teacher worker (names carry the spec fingerprint).
NAMESPACE = "codistill_jax_teachers"


# ----------------------------------------------------------------------------
# Cluster.
# ----------------------------------------------------------------------------
def connect(address: str, num_cpus: float | None = None) -> bool:
  """Connects to Ray; returns True if this call started (and owns) it.

  Args:
    address: '' starts a local single-node cluster with every server bound to
      127.0.0.1, the dashboard off and token authentication on (Ray's
      default); otherwise a running cluster's address ('auto', 'host:port').
    num_cpus: logical CPUs of a local cluster (default: this machine's).
  """
  if ray.is_initialized():
    return False
  # Quiet by default (--verbosity=1 brings Ray's INFO and notices back):
  # workers' lines reach our log as plain text, without colour codes.
  verbose = logging.get_verbosity() >= 1
  os.environ.setdefault("RAY_COLOR_PREFIX", "0")
  kwargs = dict(include_dashboard=False, log_to_driver=True,
                logging_level=pylogging.INFO if verbose else pylogging.ERROR)
  with warnings.catch_warnings():
    if not verbose:  # Ray starts its servers with fork; they run no JAX.
      warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called",
                              category=RuntimeWarning)
    if address:
      if address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost"):
        _loopback_mode()  # This driver's own servers on loopback too.
      ray.init(address=address, **kwargs)
      return True
    _loopback_mode()
    ray.init(num_cpus=num_cpus or os.cpu_count(),
             _node_ip_address="127.0.0.1", **kwargs)
  return True


def _loopback_mode() -> None:
  """Makes Ray keep every server of this machine on 127.0.0.1.

  Ray resolves 127.0.0.1 to the machine's routable address unless it is in
  its single-machine (laptop) mode; in that mode the GCS, raylet, object
  manager and worker servers all bind to 127.0.0.1 (tested). The environment
  variable reaches the processes Ray starts; the constant is what this
  process reads (fixed when `ray` was first imported).
  """
  os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
  ray._private.ray_constants.ENABLE_RAY_CLUSTER = False  # pylint: disable=protected-access


def loopback_only() -> bool:
  """True if every node of the connected cluster is on 127.0.0.1."""
  return all(n["NodeManagerAddress"] == "127.0.0.1" for n in ray.nodes()
             if n["Alive"])


# ----------------------------------------------------------------------------
# Workers.
# ----------------------------------------------------------------------------
@ray.remote(max_restarts=0, max_task_retries=0)
class TeacherWorker:
  """A Ray actor serving one `teacher_lib.Teacher` on its own device."""

  def __init__(self, spec: teacher_lib.TeacherSpec):
    self._teacher = teacher_lib.Teacher(spec)
    # Compile now, so that the first request of a student does not wait.
    self._teacher(spec.example_inputs)
    self._teacher.served = 0

  def ready(self) -> dict:
    return self._teacher.describe()

  def predict(self, inputs) -> dict:
    return self._teacher(inputs)


def start_workers(spec: teacher_lib.TeacherSpec, n: int, *, cpus: float = 1.0,
                  gpus: float = 0.0, detached: bool = False) -> list:
  """Starts `n` workers of `spec` in the pool; returns their handles.

  Non-detached workers die with the process that started them; `detached`
  ones (workers joining a pool from another script) live until killed.
  """
  handles = []
  for _ in range(n):
    name = f"{spec.fingerprint()}/{uuid.uuid4().hex[:8]}"
    handles.append(TeacherWorker.options(
        name=name, namespace=NAMESPACE, num_cpus=cpus, num_gpus=gpus,
        lifetime="detached" if detached else None).remote(spec))
  return handles


# ----------------------------------------------------------------------------
# Discovery.
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Worker:
  """What a client knows about one worker."""
  name: str
  handle: object
  ready_ref: object  # Resolves once the worker has loaded and compiled.
  ready: bool = False
  in_flight: int = 0  # Requests this client has outstanding on it.
  served: int = 0  # Requests it answered for this client.
  bad_until: float = 0.0  # Not used before this time (timed out).


class Pool:
  """The live workers of one teacher, as seen by one client.

  `refresh()` lists the named actors of the teacher's fingerprint: new names
  join (usable once their `ready` call returned), vanished ones leave. It is
  called from the reader's own loop, rate-limited; nothing runs in the
  background.
  """

  def __init__(self, fingerprint: str, refresh_every_s: float = 0.5):
    self.prefix = fingerprint + "/"
    self.refresh_every_s = refresh_every_s
    self.workers: dict[str, Worker] = {}
    self.joined = 0
    self.left = 0
    self.last_error = ""  # Last failure of a worker to start or answer.
    self._gone: set[str] = set()  # Dropped names (never reused: uuid).
    self._last_refresh = -float("inf")

  def refresh(self, force: bool = False) -> None:
    now = time.monotonic()
    if not force and now - self._last_refresh < self.refresh_every_s:
      self._check_ready()
      return
    self._last_refresh = now
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == NAMESPACE and
             a["name"].startswith(self.prefix)}
    for name in sorted(set(self.workers) - names):
      self.drop(name, "left the pool")
    for name in sorted(names - set(self.workers) - self._gone):
      try:
        handle = ray.get_actor(name, namespace=NAMESPACE)
      except ValueError:  # Died between the listing and now.
        continue
      self.workers[name] = Worker(name, handle, handle.ready.remote())
      self.joined += 1
      logging.info("teacher service: worker %s joined", name)
    self._check_ready()

  def _check_ready(self) -> None:
    waiting = {w.ready_ref: w for w in self.workers.values() if not w.ready}
    if not waiting:
      return
    done, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
    for ref in done:
      w = waiting[ref]
      try:
        info = ray.get(ref)
      except ray.exceptions.RayError as e:
        self.last_error = f"worker {w.name} failed to start: {e}"
        logging.error("teacher service: %s", self.last_error)
        self.drop(w.name, "failed to start")
        continue
      w.ready = True
      logging.info("teacher service: worker %s ready (%s)", w.name, info)

  def drop(self, name: str, why: str) -> None:
    self._gone.add(name)
    if self.workers.pop(name, None) is not None:
      self.left += 1
      logging.warning("teacher service: worker %s %s", name, why)

  def usable(self) -> list[Worker]:
    now = time.monotonic()
    return [w for w in self.workers.values() if w.ready and w.bad_until <= now]

  def pick(self, avoid=()) -> Worker | None:
    """The usable worker with the fewest requests of ours in flight (ties:
    the one that served least), preferring workers not in `avoid`."""
    usable = self.usable()
    fresh = [w for w in usable if w.name not in avoid]
    candidates = fresh or usable
    if not candidates:
      return None
    return min(candidates, key=lambda w: (w.in_flight, w.served))
