"""Ahead-of-time compile check (codistill_jax/tools/compile_check.py).

Every config in configs/ (quick variant, 2 groups) is compiled for the 8 fake
CPU devices without running a step, and the per-device figures are checked
against what the layout implies: the stacked teachers and the sharding rules
must show up in the argument bytes, so a check that ignored them would fail.
"""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from codistill_jax.tools import compile_check
from codistill_jax import mesh as mesh_lib
from codistill_jax.errors import ConfigError
from tests.test_train import ROOT, load_config

CONFIGS = sorted(os.path.splitext(os.path.basename(p))[0]
                 for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))


def with_overrides(config, overrides):
  """Applies '--config.a.b=v' strings (the small_data fixture's) in place."""
  for flag in overrides:
    key, value = flag[len("--config."):].split("=", 1)
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value)
  return config


def quick(name, small_data, groups=2):
  arg = "quick" if name == "flights_codistill" else f"quick,groups={groups}"
  config = load_config(name, arg)
  config.codistill.num_groups = groups
  return with_overrides(config, small_data.get(name, []))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_compiles_for_the_fake_devices(name, small_data):
  config = quick(name, small_data)
  report = compile_check.check(config)
  assert report.groups == 2 and report.devices_per_group == 4
  assert report.teachers == 1  # One peer's params, stacked.
  assert report.params > 0 and report.flops > 0
  # The state is donated: its outputs are written into its arguments.
  assert 0 < report.alias_bytes <= report.output_bytes
  if any(s != "replicate" for _, s in config.sharding.rules):
    # FSDP rules (the LM configs): each device holds a share of the state.
    assert report.argument_bytes < 4 * report.params
  else:
    # Params replicated (the default rule): every device holds all of them
    # once for the student and once for the teacher, plus the optimizer
    # state.
    assert report.argument_bytes >= 2 * 4 * report.params
  assert report.total_bytes >= report.argument_bytes
  assert any("per device total" in line for line in report.lines())


@pytest.mark.slow
def test_scanned_layers_cost_no_more_memory_than_unrolled_ones():
  """Scanning the blocks must keep the batch split in the loop's body: XLA
  does not carry the input's sharding into a scan by itself, and without the
  model's activation constraint every device computed the whole batch there
  (scanned 142 MiB of temporaries against 40 MiB unrolled on this shape; a
  16-layer 1B on v5p 4x4x8: 822 GB a chip instead of 12 GB)."""
  temps = {}
  for scan in (True, False):
    config = load_config("lm", "quick")
    config.data.update(seq_len=256, batch_size=32)
    config.model.update(emb_dim=128, mlp_dim=256, scan_layers=scan)
    temps[scan] = compile_check.check(config).temp_bytes
  assert temps[True] <= temps[False], temps


@pytest.mark.slow  # Four compiles and data loads.
def test_teachers_and_sharding_rules_change_the_figures(small_data):
  base = compile_check.check(quick("flights", small_data, groups=2))
  # Four groups: three stacked teachers of float32 params on each device.
  more = compile_check.check(quick("flights", small_data, groups=4))
  assert more.teachers == 3 and more.devices_per_group == 2
  extra = more.argument_bytes - base.argument_bytes
  # Two more teachers (4 bytes a param); the batch per device doubles too.
  assert extra >= 2 * 4 * base.params
  # bfloat16 teachers halve the teachers' bytes.
  half = quick("flights", small_data, groups=4)
  half.codistill.teacher_dtype = "bfloat16"
  half = compile_check.check(half)
  assert more.argument_bytes - half.argument_bytes == pytest.approx(
      3 * 2 * base.params, rel=0.01)
  # FSDP splits the large leaves over the group's 4 devices: the state and
  # the teachers, laid out like it, shrink to about a quarter per device
  # (a replicated teacher alone would leave ~45%).
  fsdp = quick("flights", small_data, groups=2)
  fsdp.sharding.rules = ((".*", "fsdp"),)
  fsdp.sharding.fsdp_min_size = 64
  fsdp = compile_check.check(fsdp)
  assert fsdp.argument_bytes < 0.3 * base.argument_bytes


def test_devices_may_be_a_subset_and_groups_must_divide_them(small_data):
  config = quick("flights", small_data, groups=2)
  report = compile_check.check(config, jax.devices()[:2])
  assert report.devices_per_group == 1
  from codistill_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match="num_groups"):
    compile_check.check(config, jax.devices()[:3])


@pytest.mark.parametrize("text,value", [("16GiB", 16 * 2**30), ("1.5MB", 1.5e6),
                                        ("512", 512), ("2 mib", 2 * 2**20)])
def test_parse_bytes(text, value):
  assert compile_check.parse_bytes(text) == value


def run_check(*args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run(
      [sys.executable, "-m", "codistill_jax.tools.compile_check", *args], cwd=ROOT,
      env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
      timeout=300)


@pytest.mark.slow
def test_cli_reports_and_enforces_the_budget(tmp_path):
  out = tmp_path / "report.json"
  ok = run_check("--config=configs/flights_codistill.py:quick",
                 "--num_devices=4", "--max_memory_per_device=1GiB",
                 f"--json_out={out}")
  assert ok.returncode == 0, ok.stderr
  assert "groups 2 x 2 cpu devices, 1 stacked teacher(s)" in ok.stdout
  report = json.loads(out.read_text())
  assert report["total_bytes"] > 0 and report["flops"] > 0

  over = run_check("--config=configs/flights_codistill.py:quick",
                   "--num_devices=4", "--max_memory_per_device=100KiB")
  assert over.returncode == 3, over.stderr
  errors = [l for l in over.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "max_memory_per_device=100KiB" in errors[0]
  assert "Traceback" not in over.stderr

  bad = run_check("--config=configs/flights_codistill.py:quick",
                  "--num_devices=3")
  assert bad.returncode == 2 and "num_groups" in bad.stderr
  assert "Traceback" not in bad.stderr


@pytest.mark.slow  # Four compiles.
def test_sampled_and_service_steps_compile_with_their_own_inputs(small_data,
                                                                 tmp_path):
  """The sampled step compiles (its memory gain shows at large V only:
  experiments/bench_sampled.py); the service's targets arrive as batch
  inputs (dense probabilities or top-k), not as teachers."""
  full = compile_check.check(quick("kernel_lm", small_data))
  sampled = quick("kernel_lm", small_data)
  sampled.codistill.sampled.num_samples = 32
  sampled = compile_check.check(sampled)
  assert sampled.teachers == 1 and sampled.flops != full.flops
  pytest.importorskip("ray")
  service = quick("kernel_lm", small_data, groups=1)
  service.codistill.teacher_source = "service"
  service.codistill.teacher_checkpoint = str(tmp_path)  # Never read here.
  dense = compile_check.check(service)
  assert dense.teachers == 0
  service.codistill.topk = 4
  sparse = compile_check.check(service)
  # [b, L, V] float32 probabilities vs [b, L, 4] int32 ids + probabilities.
  from codistill_jax.data import kernel_docs  # pylint: disable=g-import-not-at-top
  vocab = kernel_docs.load(service)[1].vocab_size
  b, length = service.data.batch_size // 8, service.data.seq_len
  assert dense.argument_bytes - sparse.argument_bytes == pytest.approx(
      b * length * (vocab - 8) * 4, rel=0.05)


# ---------------------------------------------------------------------------
# TPU slices that are not attached (libtpu's compile-only client).
# ---------------------------------------------------------------------------
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e .[tpu]); it installs "
    "from PyPI on x86-64 Linux only")


def _slice(name):
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  return topologies.get_topology_desc(topology_name=name,
                                      platform="tpu").devices


@needs_libtpu
@pytest.mark.parametrize("name,groups,block", [
    ("v5e:4x4", 2, (4, 2, 1)), ("v5e:4x4", 4, (4, 1, 1)),
    ("v5e:4x4", 8, (2, 1, 1)), ("v6e:8x8", 4, (8, 2, 1)),
    ("v5p:2x2x4", 2, (2, 2, 2)), ("v5p:2x2x4", 8, (2, 1, 1))])
def test_a_slice_is_carved_into_equal_blocks(name, groups, block):
  devices = _slice(name)
  carved = mesh_lib.slice_groups(groups, devices)
  assert sorted(d.id for g in carved for d in g) == sorted(
      d.id for d in devices)  # Disjoint and complete.
  for group in carved:
    coords = np.array([d.coords for d in group])
    assert tuple(coords.max(0) - coords.min(0) + 1) == block
    assert len({tuple(c) for c in coords}) == len(group)  # One per chip.


@needs_libtpu
def test_groups_of_unequal_size_take_blocks_of_the_slice_in_order():
  devices = _slice("v5e:4x4")
  carved = mesh_lib.slice_groups(3, devices, sizes=[8, 4, 4])
  assert [len(g) for g in carved] == [8, 4, 4]
  assert sorted(d.id for g in carved for d in g) == sorted(
      d.id for d in devices)
  for group, block in zip(carved, [(4, 2, 1), (4, 1, 1), (4, 1, 1)]):
    coords = np.array([d.coords for d in group])
    assert tuple(coords.max(0) - coords.min(0) + 1) == block
  # 6 chips after nothing are a row and a half: no block.
  with pytest.raises(ConfigError, match=r"group 0's 6 devices \(config.group"
                     r".g0.devices\) are not a block of the 4x4x1 slice"):
    mesh_lib.slice_groups(2, devices, sizes=[6, 10])


@needs_libtpu
def test_a_group_count_the_slice_cannot_hold_names_the_ones_it_can():
  with pytest.raises(ConfigError, match=r"num_groups=3 .*use one of "
                     r"\[1, 2, 4, 8, 16\]"):
    mesh_lib.slice_groups(3, _slice("v5e:4x4"))


@needs_libtpu
@pytest.mark.slow  # One TPU compile in a subprocess (libtpu may abort one).
def test_a_codistilled_lm_compiles_for_a_tpu_slice(tmp_path):
  out = tmp_path / "report.json"
  # v5e:4x4 is where G = 2 used to fail (a group interleaving two hosts'
  # chips); the quick LM codistils, so the exchange is reported too.
  result = run_check("--config=configs/lm.py:quick,groups=2",
                     "--topology=v5e:4x4", "--storage_bandwidth=100MB",
                     f"--json_out={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["groups"] == 2 and report["devices_per_group"] == 8
  assert report["device_kind"].startswith("TPU v5")
  assert report["step_s"] > 0 and 0 < report["mfu"] < 1
  assert report["per_chip_per_s"] > 0 and report["fits"] is True
  assert report["publish_bytes"] == 4 * report["params"]  # float32 params.
  assert "estimated step" in result.stdout
  assert "at 0.1 GB/s" in result.stdout


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("shape,whole_batch_bytes", [
    # At a 32k vocabulary the whole batch's logits (64 x 128 x 32000 f32 =
    # 1.05 GB) were a chip's temporaries while the embedding and output
    # layer were split along their width; split along the vocabulary a chip
    # holds its 4 rows' share (4.9 MB).
    (["--config.data.vocab_size=32000", "--config.data.seq_len=128"],
     64 * 128 * 32000 * 4),
    # Scanned blocks without the activation constraint computed the whole
    # batch in the loop's body: one layer's attention scores for the batch
    # (64 x 4 heads x 512^2 f32 = 268 MB); 723 MiB of temporaries, 8.6 MiB
    # with it.
    (["--config.data.seq_len=512", "--config.model.emb_dim=256",
      "--config.model.mlp_dim=512", "--config.model.num_layers=4"],
     64 * 4 * 512 * 512 * 4),
])
def test_lm_activations_stay_split_over_the_batch_on_a_tpu_slice(
    tmp_path, shape, whole_batch_bytes):
  """The LM must not let XLA gather the batch on every chip of a slice: a
  chip's temporaries stay under 1/8 of what the whole batch would need."""
  out = tmp_path / "report.json"
  result = run_check("--config=configs/lm.py:quick",
                     "--topology=v5e:4x4", "--config.data.batch_size=64",
                     *shape, f"--json_out={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(out.read_text())["temp_bytes"] < whole_batch_bytes / 8


@needs_libtpu
@pytest.mark.slow
def test_nowindowed_einsum_compiles_without_loops(tmp_path):
  """The step-time compiles of tpu_table pass --nowindowed_einsum: libtpu
  must accept the options, and the unrolled program then has no loop whose
  body the estimate would count once."""
  out = tmp_path / "report.json"
  result = run_check("--config=configs/lm.py:quick,groups=2",
                     "--topology=v5e:2x2", "--config.model.scan_layers=False",
                     "--nowindowed_einsum", f"--json_out={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["while_loops"] == 0 and report["step_s"] > 0


@needs_libtpu
@pytest.mark.slow
def test_v5e_step_estimate_counts_uncosted_calls_as_free(tmp_path):
  """On v5e the compiler's `optimal_seconds` counts -1 s for every
  ConcatBitcast call (this shape has several): uncorrected, the estimate is
  negative; corrected it must be at least the step's FLOPs at peak."""
  out = tmp_path / "report.json"
  result = run_check("--config=configs/lm.py:quick",
                     "--topology=v5e:4x4", "--config.model.num_layers=1",
                     "--config.model.scan_layers=False",
                     "--config.model.emb_dim=256", "--config.model.mlp_dim=512",
                     "--config.data.seq_len=256", "--config.data.batch_size=64",
                     "--config.data.vocab_size=32000", f"--json_out={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["uncosted_ops"] > 0  # The case this test is about.
  assert report["step_s"] >= report["flops"] / report["peak_flops"]
  assert 0 < report["mfu"] < 1
  assert "counted as free" in result.stdout


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("args,words", [
    (["--topology=v9z:1x1"], "--topology=v9z:1x1"),
    (["--topology=v5e:4x4", "--config.codistill.num_groups=3"],
     "num_groups=3"),
    (["--topology=v5e:2x2", "--storage_bandwidth=fast"],
     "--storage_bandwidth"),
    # A step the chips cannot hold: the compiler's own figures, one line.
    (["--topology=v5e:2x2", "--config.data.batch_size=256",
      "--config.data.seq_len=4096", "--config.data.vocab_size=128000"],
     "does not fit on 2 TPU v5"),
])
def test_bad_topology_input_is_one_line(args, words):
  result = run_check("--config=configs/lm.py:quick,groups=2", *args)
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and words in errors[0], errors
  assert "Traceback" not in result.stderr


@needs_libtpu
@pytest.mark.slow
def test_tpu_table_rows_ratios_and_sampled_cut(tmp_path):
  """experiments/tpu_table.py at toy size: one row per (config, slice, G),
  the G-way step over the 1-group one beside its floor, and the sampled
  rows' cut computed from their own temporaries."""
  out = tmp_path / "table.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
      [sys.executable, "experiments/tpu_table.py", "--configs=lm_125m:quick",
       "--topologies=v5e:2x2", "--groups=1,2",
       "--sampled=lm_1b_256k:quick@v5e:2x2", "--num_samples=16",
       f"--out={out}"], cwd=ROOT, env={**env, "JAX_PLATFORMS": "cpu"},
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  table = json.loads(out.read_text())
  one, two = table["rows"]
  assert (one["groups"], two["groups"]) == (1, 2)
  assert one["devices_per_group"] == 4 and two["devices_per_group"] == 2
  assert all(r["fits"] and r["step_s_whole"] > 0 and 0 < r["mfu_whole"] < 1
             for r in (one, two))
  # Per token per chip: a 2-way group has half the chips and the same batch.
  assert two["over_one_group"] == pytest.approx(
      two["step_s_whole"] / one["step_s_whole"] / 2)
  assert two["floor"] == pytest.approx(4 / 3)
  full, sampled = table["sampled"]
  assert (full["num_samples"], sampled["num_samples"]) == (0, 16)
  assert sampled["temp_cut"] == pytest.approx(
      full["temp_bytes"] / sampled["temp_bytes"])
  markdown = (tmp_path / "table.md").read_text()
  assert "| lm_125m:quick | v5e:2x2 | 2 | 2 | yes |" in markdown
  assert "sampled, K = 16" in markdown
  # --from_json re-derives an earlier run's table without compiling.
  again = tmp_path / "again.json"
  result = subprocess.run(
      [sys.executable, "experiments/tpu_table.py", f"--from_json={out}",
       f"--out={again}"], cwd=ROOT, env={**env, "JAX_PLATFORMS": "cpu"},
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(again.read_text()) == table
  # --pod_batch: the 2 groups split the slice's batch, a chip's work stays.
  pod = tmp_path / "pod.json"
  result = subprocess.run(
      [sys.executable, "experiments/tpu_table.py", "--configs=lm_125m:quick",
       "--topologies=v5e:2x2", "--groups=1,2", "--sampled=", "--pod_batch",
       f"--out={pod}"], cwd=ROOT, env={**env, "JAX_PLATFORMS": "cpu"},
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  one_pod, two_pod = json.loads(pod.read_text())["rows"]
  assert one_pod["per_step"] == one["per_step"] == 2 * two_pod["per_step"]
  assert two_pod["pod_batch"] and two_pod["over_one_group"] == pytest.approx(
      two_pod["step_s_whole"] / one_pod["step_s_whole"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["distill", "average"])
def test_every_source_that_publishes_reports_its_bytes(small_data, method):
  # Parameter averaging publishes its params every exchange like
  # codistillation does; the report once said 0 bytes for it.
  config = quick("flights", small_data)
  config.codistill.method = method
  report = compile_check.check(config, jax.devices()[:4])
  assert report.publish_bytes == 4 * report.params  # float32 params.


@pytest.mark.slow
def test_a_source_that_does_not_publish_reports_no_bytes(small_data):
  config = quick("flights", small_data, groups=1)
  report = compile_check.check(config, jax.devices()[:4])
  assert report.publish_bytes == 0
