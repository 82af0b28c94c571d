"""Ahead-of-time compile check (codistill_jax/compile_check.py).

Every config in configs/ (quick variant, 2 groups) is compiled for the 8 fake
CPU devices without running a step, and the per-device figures are checked
against what the layout implies: the stacked teachers and the sharding rules
must show up in the argument bytes, so a check that ignored them would fail.
"""

import glob
import json
import os
import subprocess
import sys

import jax
import pytest

from codistill_jax import compile_check
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
  # Params replicated (the default rule): every device holds all of them
  # once for the student and once for the teacher, plus the optimizer state.
  assert report.argument_bytes >= 2 * 4 * report.params
  assert report.total_bytes >= report.argument_bytes
  assert any("per device total" in line for line in report.lines())


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
      [sys.executable, "-m", "codistill_jax.compile_check", *args], cwd=ROOT,
      env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
      timeout=300)


@pytest.mark.slow
def test_cli_reports_and_enforces_the_budget(tmp_path):
  out = tmp_path / "report.json"
  ok = run_check("--config=configs/flights_codistill.py:quick",
                 "--num_devices=4", "--max_memory_per_device=1GiB",
                 f"--json_out={out}")
  assert ok.returncode == 0, ok.stderr
  assert "groups 2 x 2 devices, 1 stacked teacher(s)" in ok.stdout
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
