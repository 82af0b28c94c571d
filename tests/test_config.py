"""Config validation by class: every numeric field has a range, and each range
is enforced with a message naming the field; config files that do not load.

Runs in-process on every config file of the repository (and its `:quick`
variant), so a new field without a declared range fails here.
"""

import glob
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest

from codistill_jax import config_lib
from codistill_jax import data as data_lib
from codistill_jax import models as models_lib
from codistill_jax import validate
from codistill_jax.errors import ConfigError
from tests.test_train import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
VARIANTS = [(path, arg) for path in CONFIGS for arg in ("", "quick")]
IDS = [f"{os.path.basename(p)[:-3]}{':' + a if a else ''}" for p, a in VARIANTS]


def _ranges(config) -> dict[str, str]:
  """{dotted field: range} of every field the config's owners declare."""
  out = dict(config_lib.RANGES)
  model = models_lib.get_module(config.model_name)
  out.update({f"model.{k}": v for k, v in getattr(model, "RANGES", {}).items()})
  data = data_lib.get_module(config.data.name)
  out.update({f"data.{k}": v for k, v in getattr(data, "RANGES", {}).items()})
  # A group's own fields (config.group.g<i>) have the ranges of the fields
  # they set, its model's for its model fields.
  for key in config.get("group", {}):
    own = config_lib.group_config(config, int(key[1:]))
    theirs = _ranges(own) if own is not config else out
    out.update({f"group.{key}.{k}": v for k, v in theirs.items()})
  return out


@pytest.mark.parametrize("path,arg", VARIANTS, ids=IDS)
def test_every_numeric_field_declares_a_range(path, arg):
  config = config_lib.load(f"{path}:{arg}" if arg else path)
  ranges = _ranges(config)
  missing = [f for f in config_lib.numeric_fields(config) if f not in ranges]
  assert not missing, (f"numeric fields without a range (declare one next "
                       f"to the field, in config_lib.RANGES or the model's "
                       f"or data module's RANGES): {missing}")


def _violations(spec: str, like):
  """Values just outside `spec` (of the type of `like`)."""
  step = 1 if isinstance(like, int) and not isinstance(like, bool) else 1e-3
  m = config_lib._COMPARISON.fullmatch(spec)  # pylint: disable=protected-access
  if m:
    bound = config_lib._number(m.group(2))  # pylint: disable=protected-access
    out = {">": [bound], ">=": [bound - step], "<": [bound],
           "<=": [bound + step]}[m.group(1)]
  else:
    m = config_lib._INTERVAL.fullmatch(spec)  # pylint: disable=protected-access
    lo, hi = (config_lib._number(m.group(i)) for i in (2, 3))  # pylint: disable=protected-access
    out = [lo if m.group(1) == "(" else lo - step,
           hi if m.group(4) == ")" else hi + step]
  out.append(float("nan")) if isinstance(like, float) else None
  return [type(like)(v) if isinstance(like, int) and math.isfinite(v) else v
          for v in out if math.isfinite(v) or isinstance(like, float)]


@pytest.mark.parametrize("path,arg", VARIANTS, ids=IDS)
def test_every_range_is_enforced_naming_the_field(path, arg):
  base = config_lib.load(f"{path}:{arg}" if arg else path, lock=False)
  checked = 0
  for field, spec in _ranges(base).items():
    value = config_lib.get_field(base, field)
    if value is config_lib._MISSING:  # pylint: disable=protected-access
      continue
    like = value[0] if isinstance(value, (tuple, list)) else value
    for bad in _violations(spec, like):
      config = base.copy_and_resolve_references()
      bad_value = ((bad,) + tuple(value[1:]) if isinstance(value, tuple)
                   else bad)
      config_lib.apply_overrides(config, {field: bad_value})
      with pytest.raises(ConfigError, match=rf"config\.{field}=") as e:
        validate.validate(config, num_devices=1, num_groups_here=1)
      assert "\n" not in str(e.value)
      checked += 1
  assert checked >= 20


@pytest.mark.parametrize("body,words", [
    ("def get_config(:\n", "not valid Python (line 1"),
    ("import no_such_module_xyz\n", "missing"),
    ("def get_config(arg=None):\n  raise RuntimeError('boom')\n",
     "raised RuntimeError: boom"),
    ("def get_config(arg=None):\n  return None\n", "returned NoneType"),
    ("def get_config(arg=None):\n  return {'seed': 0}\n", "returned dict"),
    ("x = 1\n", "defines no get_config"),
])
def test_config_files_that_do_not_load_are_one_line(tmp_path, body, words):
  path = tmp_path / "bad_config.py"
  path.write_text(body)
  with pytest.raises(ConfigError, match="--config could not be loaded|"
                     "get_config") as e:
    config_lib.load(str(path))
  assert words in str(e.value) and "\n" not in str(e.value)


def test_a_config_that_is_not_a_python_file(tmp_path):
  path = tmp_path / "config.yaml"
  path.write_text("seed: 0\n")
  with pytest.raises(ConfigError, match="not a .py file"):
    config_lib.load(str(path))


def test_overrides_name_unknown_fields_and_parse_types():
  config = config_lib.load(config_lib.config_path("flights") + ":quick",
                           ["total_steps=7", "optimizer.b1=0.5",
                            "model.hidden_sizes=(3, 2)"])
  assert config.total_steps == 7 and config.optimizer.b1 == 0.5
  assert tuple(config.model.hidden_sizes) == (3, 2)
  with pytest.raises(ConfigError, match="unknown config field 'totl_steps'"):
    config_lib.load(config_lib.config_path("flights"), ["totl_steps=7"])
  with pytest.raises(ConfigError, match="config.total_steps='x' is not a int"):
    config_lib.load(config_lib.config_path("flights"), ["total_steps=x"])


def test_loading_a_config_file_imports_no_jax(tmp_path):
  code = textwrap.dedent(f"""
      import sys
      from codistill_jax import config_lib
      for path in {CONFIGS!r}:
        config_lib.load(path + ":quick")
      bad = [m for m in sys.modules if m.split(".")[0] in
             ("jax", "flax", "optax", "orbax", "tensorflow_datasets")]
      assert not bad, bad
      print("ok")
      """)
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
  assert result.stdout.strip() == "ok", result.stderr


# ----------------------------------------------------------------------------
# Settings under which a feature never acts: refused by one rule (and a
# warning for one that acts only in part).
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,field", [
    # Codistillation: teachers first arrive after the run's last step.
    ({"codistill.exchange_every": 200}, "codistill.exchange_every=200"),
    ({"codistill.exchange_every": 500}, "codistill.exchange_every=500"),
    # Averaging: the first average would come after the end.
    ({"codistill.method": "average", "codistill.exchange_every": 201},
     "codistill.exchange_every=201"),
    # One group: nobody to average with, or to wait for.
    ({"codistill.method": "average", "codistill.num_groups": 1},
     "codistill.method='average'"),
    ({"codistill.max_staleness": 50, "codistill.num_groups": 1},
     "codistill.max_staleness=50"),
    ({"codistill.burn_in_steps": 200}, "codistill.burn_in_steps=200"),
    ({"noise_scale.every": 201}, "noise_scale.every=201"),
])
def test_a_feature_that_never_acts_is_refused_naming_the_field(overrides,
                                                               field):
  config = config_lib.load(config_lib.config_path("flights_codistill") +
                           ":quick", {"total_steps": 200, **overrides},
                           lock=False)
  with pytest.raises(ConfigError, match=rf"^config\.{re.escape(field)} never "
                     "acts: "):
    validate.validate(config, num_devices=8)


@pytest.mark.parametrize("overrides", [
    {"codistill.method": "average", "codistill.exchange_every": 200},
    {"codistill.exchange_every": 199},
    {"noise_scale.every": 200},
    # Intervals of what also happens at the end act at the end.
    {"eval_every": 10**6, "checkpoint_every": 10**6, "log_every": 10**6},
])
def test_a_feature_that_acts_once_is_accepted(overrides):
  config = config_lib.load(config_lib.config_path("flights_codistill") +
                           ":quick", {"total_steps": 200, **overrides},
                           lock=False)
  validate.validate(config, num_devices=8)


def test_a_ramp_cut_short_by_the_end_is_one_warning(caplog):
  config = config_lib.load(config_lib.config_path("flights_codistill") +
                           ":quick", {"total_steps": 200,
                                      "codistill.burn_in_steps": 100,
                                      "codistill.alpha_ramp_steps": 200},
                           lock=False)
  with caplog.at_level("WARNING"):
    validate.validate(config, num_devices=8)
  (line,) = [r.getMessage() for r in caplog.records
             if "acts only in part" in r.getMessage()]
  assert line.startswith("config.codistill.alpha_ramp_steps=200 acts only in "
                         "part: alpha reaches only 50%")
