"""Bad-input matrix: malformed flags, configs, data and checkpoints via the CLI.

Every case runs the real command (`python -m codistill_jax.main ...`, 8 fake
CPU devices) as a subprocess and must end with exit code 2, exactly one
`error: ...` line naming the problem, no traceback, and nothing written: a
fresh workdir is never created, an existing one is left byte for byte as it
was. The cases run a few at a time in a module fixture (each is mostly Python
and JAX start-up); the parametrized tests then check one case each. The
other commands' table is tests/test_commands.py (it borrows `files`).
"""

import concurrent.futures
import glob
import gzip
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from codistill_jax import train
from tests.test_train import ROOT, load_config

pytestmark = pytest.mark.slow

FLIGHTS = "configs/flights.py:quick"

# (id, config file or None for no --config, extra args, words the error line
#  must contain). '{x}' fields are filled from the `files` fixture.
CASES = [
    # Flags.
    ("no_config", None, [], "--config is required"),
    ("no_workdir", FLIGHTS, ["--workdir="], "--workdir is required"),
    ("config_file_missing", "configs/nope.py", [], "--config could not be"),
    ("config_arg_unknown", "configs/flights.py:quikc", [], "quikc"),
    ("config_arg_bad_value", "configs/flights.py:groups=two", [], "groups"),
    ("lm_size_unknown", "configs/lm.py:size=2b", [],
     "size='2b' is unknown; known: ['125m', '1b', '8b', '1b_256k']"),
    ("unknown_field", FLIGHTS, ["--config.totl_steps=5"], "totl_steps"),
    ("wrong_type", FLIGHTS, ["--config.total_steps=abc"], "total_steps"),
    ("unknown_flag", FLIGHTS, ["--stepz=3"], "stepz"),
    ("positional_arg", FLIGHTS, ["extra"], "unexpected arguments"),
    ("groups_not_indices", FLIGHTS, ["--groups=a"], "--groups"),
    ("groups_out_of_range", FLIGHTS, ["--groups=5"], "--groups"),
    ("coordinator_alone", FLIGHTS, ["--coordinator_address=localhost:1234"],
     "--num_processes"),
    ("profile_steps_backwards", FLIGHTS, ["--profile_steps=5:3"],
     "--profile_steps"),
    ("profile_steps_not_a_range", FLIGHTS, ["--profile_steps=10"],
     "--profile_steps"),
    ("profile_steps_past_the_end", FLIGHTS, ["--profile_steps=5:999999"],
     "--profile_steps"),
    # Config values.
    ("batch_not_divisible", FLIGHTS, ["--config.data.batch_size=12"],
     "batch_size"),
    ("groups_not_dividing_devices", FLIGHTS,
     ["--config.codistill.num_groups=3"], "num_groups"),
    ("total_steps_zero", FLIGHTS, ["--config.total_steps=0"], "total_steps"),
    ("exchange_format_unknown", "configs/flights_codistill.py:quick",
     ["--config.codistill.exchange_format=zip"], "exchange_format"),
    ("model_axis_not_dividing_devices", FLIGHTS,
     ["--config.sharding.model_axis=3"], "config.sharding.model_axis=3"),
    ("model_axis_not_dividing_heads", "configs/lm.py:quick",
     ["--config.sharding.model_axis=8"], "config.sharding.model_axis=8"),
    ("attention_chunk_not_dividing", "configs/lm.py:quick",
     ["--config.model.attention_chunk=5"], "config.model.attention_chunk=5"),
    ("rule_naming_an_unknown_axis", FLIGHTS,
     ["--config.sharding.rules=((\".*\", (\"tensor\",)),)"],
     "config.sharding.rules"),
    ("microbatches_zero", FLIGHTS, ["--config.microbatches=0"],
     "microbatches"),
    ("microbatches_not_dividing", FLIGHTS, ["--config.microbatches=7"],
     "config.microbatches"),
    ("method_unknown", FLIGHTS, ["--config.codistill.method=avg"],
     "config.codistill.method='avg'"),
    ("outer_optimizer_unknown", FLIGHTS,
     ["--config.codistill.method=average", "--config.codistill.num_groups=2",
      "--config.codistill.averaging.outer_optimizer=adam"],
     "config.codistill.averaging.outer_optimizer"),
    ("outer_momentum_one", FLIGHTS,
     ["--config.codistill.averaging.outer_momentum=1.0"],
     "config.codistill.averaging.outer_momentum"),
    ("noise_scale_pieces_not_dividing", FLIGHTS,
     ["--config.noise_scale.every=5", "--config.noise_scale.pieces=7"],
     "config.noise_scale.pieces=7"),
    ("noise_scale_every_negative", FLIGHTS, ["--config.noise_scale.every=-1"],
     "config.noise_scale.every"),
    ("english_source_unknown", "configs/english_lm.py:quick",
     ["--config.data.sources=kernel_docs,nope"], "unknown source 'nope'"),
    ("model_unknown", FLIGHTS, ["--config.model_name=nope"], "model_name"),
    ("model_field_wrong_type", FLIGHTS, ["--config.model.dropout_rate=high"],
     "dropout_rate"),
    ("data_module_unknown", FLIGHTS, ["--config.data.name=nope"], "data.name"),
    ("optimizer_unknown", FLIGHTS, ["--config.optimizer.name=adagrad"],
     "optimizer.name"),
    ("schedule_unknown", FLIGHTS, ["--config.optimizer.schedule=exponential"],
     "schedule"),
    ("learning_rate_negative", FLIGHTS,
     ["--config.optimizer.learning_rate=-0.1"], "learning_rate"),
    ("loss_unknown", FLIGHTS, ["--config.loss=hinge"], "config.loss"),
    ("keep_checkpoints_too_few", FLIGHTS, ["--config.keep_checkpoints=1"],
     "keep_checkpoints"),
    ("partition_unknown", FLIGHTS, ["--config.data.partition=random"],
     "partition"),
    ("exchange_every_zero", FLIGHTS, ["--config.codistill.exchange_every=0"],
     "exchange_every"),
    ("divergence_unknown", FLIGHTS, ["--config.codistill.divergence=js"],
     "divergence"),
    ("temperature_zero", FLIGHTS, ["--config.codistill.temperature=0.0"],
     "temperature"),
    ("teacher_checkpoint_unset", FLIGHTS,
     ["--config.codistill.teacher_source=checkpoint"], "teacher_checkpoint"),
    ("teacher_checkpoint_missing", FLIGHTS,
     ["--config.codistill.teacher_source=checkpoint",
      "--config.codistill.teacher_checkpoint=/nonexistent/run"],
     "teacher_checkpoint"),
    # Data paths and files.
    ("flights_csv_missing", FLIGHTS,
     ["--config.data.path=/nonexistent/flights.csv"], "data.path"),
    ("flights_csv_wrong_columns", FLIGHTS,
     ["--config.data.path={wrong_columns_csv}"], "data.path"),
    ("flights_csv_binary", FLIGHTS, ["--config.data.path={binary_csv}"],
     "data.path"),
    ("fashion_mnist_dir_empty", "configs/fashion_mnist.py:quick",
     ["--config.data.path={empty_dir}"], "data.path"),
    ("fashion_mnist_not_idx", "configs/fashion_mnist.py:quick",
     ["--config.data.path={bad_idx_dir}"], "data.path"),
    ("kernel_docs_missing", "configs/kernel_lm.py:quick",
     ["--config.data.path=/nonexistent/docs"], "data.path"),
    # Checkpoints.
    ("init_checkpoint_missing", FLIGHTS,
     ["--config.init_checkpoint=/nonexistent/run"], "init_checkpoint"),
    ("init_checkpoint_empty_dir", FLIGHTS,
     ["--config.init_checkpoint={empty_dir}"], "init_checkpoint"),
    ("init_checkpoint_other_architecture", FLIGHTS,
     ["--config.init_checkpoint={other_arch_run}"], "architecture"),
    ("workdir_of_another_config", FLIGHTS,
     ["--workdir={other_arch_run}"], "another config (differs in "
     "model.hidden_sizes"),
    ("own_checkpoint_corrupt", FLIGHTS,
     ["--workdir={corrupt_run}", "--config.model.hidden_sizes=(7,)",
      "--config.total_steps=2"],
     "corrupt"),
    ("init_checkpoint_corrupt", FLIGHTS,
     ["--config.init_checkpoint={truncated_run}"], "unreadable or corrupt"),
    # Config files that do not load.
    ("config_file_syntax_error", "{syntax_config}", [], "not valid Python"),
    ("config_file_not_python", "{yaml_config}", [], "not a .py file"),
    ("config_file_raises", "{raising_config}", [], "raised RuntimeError"),
    ("config_file_returns_dict", "{dict_config}", [], "not a ConfigDict"),
    ("config_file_imports_missing", "{missing_import_config}", [],
     "imports a module that is missing"),
    # Numbers out of their range, one per class of range (every range is
    # enforced in-process by tests/test_config.py).
    ("seed_beyond_64_bits", FLIGHTS, ["--config.seed=99999999999999999999"],
     "config.seed="),
    ("warmup_longer_than_run", FLIGHTS,
     ["--config.optimizer.warmup_steps=50"], "warmup_steps"),
    ("burn_in_longer_than_run", "configs/flights_codistill.py:quick",
     ["--config.codistill.burn_in_steps=50"], "burn_in_steps"),
    ("clip_norm_negative", FLIGHTS, ["--config.optimizer.grad_clip_norm=-1.0"],
     "grad_clip_norm"),
    ("adam_beta_one", FLIGHTS, ["--config.optimizer.b2=1.0"], "b2"),
    ("dropout_one", FLIGHTS, ["--config.model.dropout_rate=1.0"],
     "dropout_rate"),
    ("width_zero", FLIGHTS, ["--config.model.embed_dim=0"], "embed_dim"),
    ("temperature_absurd", FLIGHTS, ["--config.codistill.temperature=1e6"],
     "temperature"),
    # Paths.
    ("workdir_dangling_symlink", FLIGHTS, ["--workdir={dangling_link}"],
     "dangling symlink"),
    ("workdir_symlink_loop", FLIGHTS, ["--workdir={loop_link}"],
     "symlink loop"),
    ("config_json_empty", FLIGHTS, ["--workdir={empty_config_json_run}"],
     "config.json (the run's identity) is unreadable"),
    ("config_json_truncated", FLIGHTS,
     ["--workdir={truncated_config_json_run}"],
     "config.json (the run's identity) is unreadable"),
    ("exchange_dir_is_a_file", FLIGHTS,
     ["--config.codistill.exchange_dir={a_file}"],
     "config.codistill.exchange_dir="),
    ("gs_without_the_gcs_filesystem", FLIGHTS,
     ["--config.codistill.exchange_dir=gs://some-bucket/x"],
     "pip install -e .[gcs]"),
    # Process and platform flags.
    ("num_processes_alone", FLIGHTS, ["--num_processes=2"],
     "--coordinator_address"),
    ("process_id_out_of_range", FLIGHTS,
     ["--coordinator_address=127.0.0.1:1234", "--num_processes=2",
      "--process_id=5"], "--process_id=5"),
    ("absent_platform", FLIGHTS, [], "JAX_PLATFORMS='tpu'",
     {"JAX_PLATFORMS": "tpu"}),
    # Bad config with a coordinator: refused before joining the job (which
    # would wait for process 0 for ever).
    ("bad_config_before_joining", FLIGHTS,
     ["--coordinator_address=127.0.0.1:1", "--num_processes=2",
      "--process_id=1", "--config.total_steps=0"], "config.total_steps=0"),
    ("workdir_is_a_file", FLIGHTS, ["--workdir={a_file}"],
     "cannot be written (Not a directory)"),
    ("compilation_cache_is_a_file", FLIGHTS,
     ["--compilation_cache={a_file}"], "--compilation_cache="),
]


def snapshot(path):
  """{relative path: (size, mtime)} of every file under `path`, and None for
  every directory (a new empty one counts as written too)."""
  out = {}
  for root, dirs, names in os.walk(path):
    for d in dirs:
      out[os.path.relpath(os.path.join(root, d), path)] = None
    for n in names:
      f = os.path.join(root, n)
      st = os.lstat(f)
      out[os.path.relpath(f, path)] = (st.st_size, st.st_mtime_ns)
  return out


def assert_one_error_line(result, words):
  """Exit code 2, no traceback, one `error:` line, holding every word."""
  err = result.stderr
  assert result.returncode == 2, (result.returncode, err[-3000:])
  assert "Traceback" not in err, err[-3000:]
  lines = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, err[-3000:]
  for w in words:
    assert w in lines[0], (w, lines[0])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Malformed data files and runs to point the cases at."""
  root = tmp_path_factory.mktemp("bad_input")
  out = {"empty_dir": str(root / "empty")}
  os.makedirs(out["empty_dir"])
  out["wrong_columns_csv"] = str(root / "wrong.csv")
  with open(out["wrong_columns_csv"], "w") as f:
    f.write("a,b,c\n1,2,3\n4,5,6\n")
  out["binary_csv"] = str(root / "binary.csv")
  with open(out["binary_csv"], "wb") as f:
    f.write(bytes(range(256)) * 64)
  out["bad_idx_dir"] = str(root / "bad_idx")
  os.makedirs(out["bad_idx_dir"])
  from codistill_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
  for name in sum(fashion_mnist.FILES.values(), ()):
    with gzip.open(os.path.join(out["bad_idx_dir"], name), "wb") as f:
      f.write(b"\x00\x00\x08\x03" + b"\x00" * 64)  # Wrong magic for labels.
  # A finished run of another architecture (hidden_sizes (7,)).
  config = load_config("flights")
  config.model.hidden_sizes, config.total_steps = (7,), 2
  config.checkpoint_every = config.eval_every = 2
  out["other_arch_run"] = str(root / "other_arch")
  train.train_and_evaluate(config, out["other_arch_run"])
  # The same run with its newest checkpoint's metadata gone (a torn copy).
  out["corrupt_run"] = str(root / "corrupt")
  shutil.copytree(out["other_arch_run"], out["corrupt_run"])
  os.remove(os.path.join(out["corrupt_run"], "group_0", "checkpoints", "2",
                         "default", "_METADATA"))
  # The same run with its array files cut short (for init_checkpoint).
  out["truncated_run"] = str(root / "truncated")
  shutil.copytree(out["other_arch_run"], out["truncated_run"])
  for f in glob.glob(os.path.join(out["truncated_run"], "**", "d", "*"),
                     recursive=True):
    os.truncate(f, os.path.getsize(f) // 3)
  # Config files that do not load.
  for name, body in [
      ("syntax_config", "def get_config(:\n"),
      ("raising_config", "def get_config(arg=None):\n  raise RuntimeError("
       "'boom')\n"),
      ("dict_config", "def get_config(arg=None):\n  return {'seed': 0}\n"),
      ("missing_import_config", "import no_such_module_xyz\n")]:
    out[name] = str(root / f"{name}.py")
    with open(out[name], "w") as f:
      f.write(body)
  out["yaml_config"] = str(root / "config.yaml")
  with open(out["yaml_config"], "w") as f:
    f.write("seed: 0\n")
  # Workdirs that are links to nowhere, or to themselves.
  out["dangling_link"] = str(root / "dangling")
  os.symlink(str(root / "nowhere"), out["dangling_link"])
  out["loop_link"] = str(root / "loop")
  os.symlink(out["loop_link"], out["loop_link"])
  # Runs whose config.json (their identity) was damaged.
  for name, text in (("empty_config_json_run", ""),
                     ("truncated_config_json_run", '{"seed": 0, "mod')):
    out[name] = str(root / name)
    shutil.copytree(out["other_arch_run"], out[name])
    with open(os.path.join(out[name], "config.json"), "w") as f:
      f.write(text)
  out["a_file"] = str(root / "a_file")
  with open(out["a_file"], "w") as f:
    f.write("not a directory")
  return out


def cli(*args, env=None, module="codistill_jax.main"):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         **(env or {})}
  cmd = ([sys.executable, module] if module.endswith(".py") else
         [sys.executable, "-m", module])
  return subprocess.run([*cmd, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def results(files, tmp_path_factory):
  """Runs every case (three at a time); {id: (result, workdir, before)}."""
  root = tmp_path_factory.mktemp("bad_runs")

  def one(case):
    name, config, args, _, *env = case
    args = [a.format(**files) for a in args]
    workdir = next((a.split("=", 1)[1] for a in args
                    if a.startswith("--workdir=")), None)
    if workdir is None:
      workdir = str(root / name)
      args.append(f"--workdir={workdir}")
    before = snapshot(workdir) if workdir and os.path.exists(workdir) else None
    if config:
      args.insert(0, f"--config={config.format(**files)}")
    return name, (cli(*args, env=env[0] if env else None), workdir, before)

  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    return dict(pool.map(one, CASES))


@pytest.mark.parametrize("name,words", [(c[0], c[3]) for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(results, name,
                                                         words):
  if name == "gs_without_the_gcs_filesystem" and importlib.util.find_spec(
      "gcsfs"):
    pytest.skip("the GCS filesystem is installed here")
  result, workdir, before = results[name]
  assert_one_error_line(result, [words])
  if before is None:
    assert not workdir or not os.path.exists(workdir), os.listdir(workdir)
  else:
    assert snapshot(workdir) == before


def test_matrix_size():
  assert len(CASES) >= 20
  assert len({c[0] for c in CASES}) == len(CASES)
