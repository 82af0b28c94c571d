"""Every config field has a rule, and the rule holds for drawn values.

Property-based (hypothesis), on top of tests/test_config.py (which checks that
every numeric field declares a range and that values just outside it are
refused). For every config file at its quick arg, every field found by walking
the ConfigDict (never a hand list) gets values of its declared type drawn
inside and outside its declared range, written as the command line writes them
(`str(value)`), and sent through what `--config.<field>=<text>` goes through:
`config_lib.apply_overrides` and `validate.validate` (not a run).

  numeric (and tuples of numbers): a value in range is accepted, or refused by
    a cross-field rule with a ConfigError naming a config field; a value out of
    range (NaN, inf, -0.0 where 0 is excluded, huge ints, floats or bools for
    ints, ...) is refused with a ConfigError naming the field:
    'config.<field>='.
  bool: 'true'/'false'/'1'/'0' (any case, 'yes'/'no') parse; anything else is
    refused naming the field.
  string: a field whose owner checks it (`config_lib.check_choice`, a module
    name, a path that must exist) refuses a bogus value naming the field; a
    string field that takes anything must be listed in FREE_FORM with why.
  tuple of records (sharding.rules): anything drawn is accepted or refused
    naming the field.

Nothing but a ConfigError ever comes out. A field with no rule (a numeric
field without a range, a string field that takes anything and is not in
FREE_FORM, a field of a kind nothing here knows) fails
`test_every_field_has_a_rule`, naming the field.
"""

import copy
import fnmatch
import functools
import math
import os
import re

from hypothesis import HealthCheck
from hypothesis import Phase
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import pytest

from codistill_jax import config_lib
from codistill_jax import validate
from codistill_jax.errors import ConfigError
from tests.test_config import CONFIGS
from tests.test_config import _ranges

# Each config file at its quick arg (its toy sizes validate like the real ones
# and need only the small data files of conftest's `small_data`).
_ARGS = {"lm": "size=125m,quick"}
# english_lm_hetero is english_lm plus group entries of the kind
# flights_hetero already has: drawing for it again buys nothing but time.
NAMES = [os.path.basename(p)[:-3] for p in CONFIGS
         if not p.endswith("english_lm_hetero.py")]
NUM_DEVICES = 8  # conftest's fake CPU devices.
NUM_GROUPS_HERE = 1  # One group per process, as launch_local.py runs them.

# String fields that take any text, each with why. validate() cannot check
# them (they are checked where they are used, or are opaque): everything else
# of type str must refuse a bogus value. 'a.*' matches every field under a.
FREE_FORM = {
    # Paths of directories that are created or checked when the run starts
    # (checkpoint.check_workdir checks the exchange dir is writable).
    "codistill.exchange_dir": "a directory, created by the run",
    "data.cache_dir": "a directory, created by the run",
    # Read only with teacher_source='stored', and checked there.
    "codistill.stored_targets": "a directory, checked with 'stored'",
    "codistill.service.address": "a Ray cluster's address ('auto', host:port)",
    "data.roots.*": "a corpus source's directory, checked when it is read",
}

# String fields whose owner checks them only when another field makes them
# matter, with the overrides that do (validate reads them then).
CONDITIONAL = {
    # Its choices live in service/reader.py, which needs Ray.
    "codistill.service.no_worker": {
        "codistill.teacher_source": "service",
        "codistill.teacher_checkpoint": os.path.dirname(
            os.path.abspath(config_lib.__file__))},
}

BOGUS = "no-such-choice-xyz"
BOOL_TEXTS = ("true", "false", "1", "0", "True", "False", "TRUE", "yes", "no")

# Each test below draws a value for every field of its kind per example; the
# quick subset budgets ~30 s for this file on a 2-core machine. No shrinking:
# a failure names every field and value that failed in its example.
_FAST = dict(deadline=None, derandomize=True, database=None,
             phases=(Phase.explicit, Phase.generate),
             suppress_health_check=list(HealthCheck))


# ----------------------------------------------------------------------------
# The configs and their fields.
# ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _load(name: str, data_overrides: tuple[str, ...]):
  path = config_lib.config_path(name)
  try:
    config = config_lib.load(f"{path}:{_ARGS.get(name, 'quick')}",
                             data_overrides, lock=False)
  except ConfigError as e:  # A file without a quick variant: as it is.
    if "config arg 'quick' is unknown" not in str(e):
      raise
    config = config_lib.load(path, data_overrides, lock=False)
  return config, _ranges(config)


class _Base(tuple):
  """(config, ranges) of a config file; shown by its name in reports."""

  def __new__(cls, name, config, ranges):
    self = super().__new__(cls, (config, ranges))
    self.name = name
    return self

  def __repr__(self):
    return f"<configs/{self.name}.py>"


@pytest.fixture(name="base")
def fixture_base(request, small_data):
  """(config, ranges) of the test's config file, validated as it is."""
  config, ranges = _load(request.param,
                         tuple(small_data.get(request.param, ())))
  validate.validate(copy.deepcopy(config), num_devices=NUM_DEVICES,
                    num_groups_here=NUM_GROUPS_HERE)
  return _Base(request.param, config, ranges)


def per_config(test):
  return pytest.mark.parametrize("base", NAMES, indirect=True)(test)


def _leaves(node, prefix=""):
  for k, v in node.items():
    if hasattr(v, "keys"):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _kind(field: str, value, ranges) -> str:
  """'bool', 'number', 'numbers' (a tuple), 'text', 'records' or '?'."""
  if isinstance(value, bool):
    return "bool"
  if _is_number(value):
    return "number"
  if isinstance(value, (tuple, list)):
    if field in ranges or (value and all(_is_number(v) for v in value)):
      return "numbers"
    return "records"
  if value is None or isinstance(value, str):  # None: the CLI gives text.
    return "text"
  return "?"


def _fields(base, kind: str) -> list[tuple[str, object]]:
  config, ranges = base
  return [(f, v) for f, v in _leaves(config) if _kind(f, v, ranges) == kind]


def _also(field: str) -> list[str]:
  """The overrides that make validate read `field` (CONDITIONAL)."""
  return [f"{k}={v}" for k, v in CONDITIONAL.get(field, {}).items()]


def _free_form(field: str) -> bool:
  return any(fnmatch.fnmatchcase(field, pattern) for pattern in FREE_FORM)


# ----------------------------------------------------------------------------
# One `--config.<field>=<text>` through parsing and validation.
# ----------------------------------------------------------------------------
def _names(field: str) -> str:
  """A pattern matching a message that names config.<field>."""
  return rf"config\.{re.escape(field)}(?!\w|\.\w)"


def _outcome(config, field: str, text: str, also=()) -> Exception | None:
  """None if accepted; the exception parsing or validation raised."""
  config = copy.deepcopy(config)  # Keeps FieldReferences, as the CLI does.
  try:
    config_lib.apply_overrides(config, [*also, f"{field}={text}"])
    validate.validate(config, num_devices=NUM_DEVICES,
                      num_groups_here=NUM_GROUPS_HERE)
  except Exception as e:  # pylint: disable=broad-except
    return e
  return None


def _problem(field: str, text: str, error, expect_ok: bool,
             expect_name: str | None = None) -> str | None:
  """What is wrong with `error` for `--config.<field>=<text>`, or None.

  Args:
    field: the dotted field.
    text: the value as given on the command line.
    error: what `_outcome` returned.
    expect_ok: the value is valid for the field itself: accepted, or refused
      by a cross-field rule naming some config field.
    expect_name: when refused, the message must match this (default: names
      `field`, 'config.<field>=').
  """
  where = f"--config.{field}={_short(text)}"
  if error is not None and not isinstance(error, ConfigError):
    return f"{where} raised {type(error).__name__}: {error}"
  if expect_ok:
    if error is not None and not re.search(r"config\.\w", str(error)):
      return f"{where} was refused naming no config field: {error}"
    return None
  if error is None:
    return f"{where} was accepted; it is outside the field's rule"
  pattern = expect_name or rf"config\.{re.escape(field)}="
  if not re.search(pattern, str(error)):
    return f"{where} was refused without naming the field: {error}"
  if "\n" in str(error):
    return f"{where}: the message is not one line: {error!r}"
  return None


def _short(text: str) -> str:
  return repr(text if len(text) <= 60 else f"{text[:28]}...{text[-28:]}")


def _check_all(config, cases) -> None:
  """Runs (field, text, expect_ok, expect_name, also) cases; fails listing
  every problem."""
  problems = []
  for field, text, expect_ok, expect_name, also in cases:
    error = _outcome(config, field, text, also)
    problem = _problem(field, text, error, expect_ok, expect_name)
    if problem:
      problems.append(problem)
  assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------
# Every field has a rule.
# ----------------------------------------------------------------------------
@per_config
def test_every_field_has_a_rule(base):
  config, ranges = base
  problems, kinds = [], {}
  for field, value in _leaves(config):
    kind = _kind(field, value, ranges)
    kinds[kind] = kinds.get(kind, 0) + 1
    if kind in ("number", "numbers") and field not in ranges:
      problems.append(f"config.{field}={value!r} has no range: add a range "
                      "to RANGES next to the field (config_lib.RANGES, or "
                      "the model's or data module's RANGES)")
    elif kind == "bool":
      error = _outcome(config, field, "maybe")
      problems.append(_problem(field, "maybe", error, False))
    elif kind == "text" and not _free_form(field):
      error = _outcome(config, field, BOGUS, _also(field))
      if error is None:
        problems.append(
            f"config.{field}={BOGUS!r} is accepted: string fields need a "
            "rule; check it in its owner's check_config (e.g. "
            "config_lib.check_choice), or list it in FREE_FORM of "
            "tests/test_config_fields.py with the reason it takes any text")
      else:
        problems.append(_problem(field, BOGUS, error, False, _names(field)))
    elif kind == "records":
      text = str((BOGUS,))
      problems.append(_problem(field, text, _outcome(config, field, text),
                               False, _names(field)))
    elif kind == "?":
      problems.append(f"config.{field}={value!r} is of a kind "
                      f"({type(value).__name__}) with no rule here: make it "
                      "a number, bool, string or tuple, or teach "
                      "tests/test_config_fields.py its rule")
  problems = [p for p in problems if p]
  assert not problems, "\n".join(problems)
  assert kinds.get("number", 0) >= 40 and kinds.get("text", 0) >= 15, kinds


def test_free_form_lists_only_fields_that_exist(small_data):
  """FREE_FORM and CONDITIONAL do not outlive their fields."""
  fields = {f for name in NAMES for f, _ in _leaves(
      _load(name, tuple(small_data.get(name, ())))[0])}
  stale = [p for p in [*FREE_FORM, *CONDITIONAL]
           if not fnmatch.filter(fields, p)]
  assert not stale, f"no config has these fields any more: {stale}"


# ----------------------------------------------------------------------------
# Numbers: drawn in and out of the declared range.
# ----------------------------------------------------------------------------
def _bounds(spec: str):
  """(lo, lo_inclusive, hi, hi_inclusive) of a range spec (inf: none)."""
  # pylint: disable=protected-access
  m = config_lib._COMPARISON.fullmatch(spec)
  if m:
    op, bound = m.group(1), config_lib._number(m.group(2))
    if op in (">", ">="):
      return bound, op == ">=", math.inf, False
    return -math.inf, False, bound, op == "<="
  m = config_lib._INTERVAL.fullmatch(spec)
  return (config_lib._number(m.group(2)), m.group(1) == "[",
          config_lib._number(m.group(3)), m.group(4) == "]")
  # pylint: enable=protected-access


def _int_bounds(spec: str) -> tuple[int | None, int | None]:
  lo, lo_in, hi, hi_in = _bounds(spec)
  lo_int = (None if lo == -math.inf else
            math.ceil(lo) if lo_in or lo != math.floor(lo) else int(lo) + 1)
  hi_int = (None if hi == math.inf else
            math.floor(hi) if hi_in or hi != math.ceil(hi) else int(hi) - 1)
  return lo_int, hi_int


def _inside(spec: str, is_int: bool):
  """Values of the field's type inside `spec` (ints too for floats)."""
  lo, lo_in, hi, hi_in = _bounds(spec)
  lo_int, hi_int = _int_bounds(spec)
  ints = (st.nothing() if None not in (lo_int, hi_int) and lo_int > hi_int
          else st.integers(lo_int, hi_int))
  edges = [v for v in (lo_int, hi_int, 10**400 if hi_int is None else None)
           if v is not None]
  if is_int:
    return st.one_of(st.sampled_from(edges), ints)
  floats = st.floats(None if lo == -math.inf else lo,
                     None if hi == math.inf else hi,
                     exclude_min=not lo_in and lo != -math.inf,
                     exclude_max=not hi_in and hi != math.inf,
                     allow_nan=False, allow_infinity=False)
  return st.one_of(floats, st.sampled_from([float(e) for e in edges
                                            if abs(e) < 1e300]), ints)


def _outside(spec: str, is_int: bool):
  """Values the field must refuse: outside `spec`, not finite, of the wrong
  type (floats and bools for ints, bools for floats)."""
  lo, lo_in, hi, hi_in = _bounds(spec)
  lo_int, hi_int = _int_bounds(spec)
  # (-0.0 is refused where 0 is, and by int fields; else taken as 0.)
  anywhere = [st.sampled_from([math.nan, math.inf, -math.inf, -0.0]),
              st.sampled_from([True, False])]
  if lo != -math.inf:
    anywhere += [st.integers(max_value=lo_int - 1),
                 st.floats(max_value=lo, exclude_max=lo_in,
                           allow_nan=False, allow_infinity=False),
                 st.just(-(10**400))]
  if hi != math.inf:
    anywhere += [st.integers(min_value=hi_int + 1),
                 st.floats(min_value=hi, exclude_min=hi_in,
                           allow_nan=False, allow_infinity=False),
                 st.just(10**400)]
  if is_int:  # A float is refused even where the number is in range.
    anywhere.append(st.floats(
        lo if lo != -math.inf else None, hi if hi != math.inf else None))
  return st.one_of(anywhere)


def _valid(value, spec: str, is_int: bool) -> bool:
  """The oracle: the field's own rule accepts `value`."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return False
  if is_int and not isinstance(value, int):
    return False
  return (isinstance(value, int) or math.isfinite(value)) and (
      config_lib.in_range(value, spec))


def _number_cases(base, draw, inside: bool):
  config, ranges = base
  cases, tested = [], 0
  for field, value in _fields(base, "number") + _fields(base, "numbers"):
    spec = ranges.get(field)
    if spec is None:
      pytest.fail(f"config.{field} has no range: add a range to RANGES next "
                  "to the field")
    is_tuple = isinstance(value, (tuple, list))
    is_int = all(isinstance(v, int) for v in (value if is_tuple else (value,)))
    element = (_inside if inside else _outside)(spec, is_int)
    if is_tuple:
      good = st.lists(_inside(spec, is_int), max_size=3)
      if inside:
        drawn = tuple(draw(good, label=field))
      else:  # One bad entry among good ones, or no tuple at all.
        entries = draw(good, label=field)
        at = draw(st.integers(0, len(entries)), label=f"{field}[i]")
        drawn = draw(st.one_of(
            st.just(tuple(entries[:at] + [draw(element)] + entries[at:])),
            element), label=f"{field} bad")
      ok = isinstance(drawn, tuple) and all(
          _valid(v, spec, is_int) for v in drawn)
    else:
      drawn = draw(element, label=field)
      ok = _valid(drawn, spec, is_int)
    cases.append((field, str(drawn), ok, None, ()))
    tested += 1
  assert tested >= 40
  return cases


@per_config
@settings(max_examples=4, **_FAST)
@given(data=st.data())
def test_numbers_inside_their_range_are_accepted(base, data):
  _check_all(base[0], _number_cases(base, data.draw, inside=True))


@per_config
@settings(max_examples=5, **_FAST)
@given(data=st.data())
def test_numbers_outside_their_range_are_refused_naming_the_field(base, data):
  _check_all(base[0], _number_cases(base, data.draw, inside=False))


# ----------------------------------------------------------------------------
# Bools, strings and records.
# ----------------------------------------------------------------------------
@per_config
@settings(max_examples=8, **_FAST)
@given(data=st.data())
def test_bools_parse_true_false_and_refuse_anything_else(base, data):
  cases = []
  for field, _ in _fields(base, "bool"):
    good = data.draw(st.sampled_from(BOOL_TEXTS), label=field)
    bad = data.draw(st.text(max_size=6).filter(
        lambda t: t.lower() not in ("true", "false", "1", "0", "yes", "no")),
                    label=f"{field} bad")
    cases += [(field, good, True, None, ()), (field, bad, False, None, ())]
  assert cases
  _check_all(base[0], cases)


@per_config
@settings(max_examples=5, **_FAST)
@given(data=st.data())
def test_strings_outside_their_choices_are_refused(base, data):
  """Checked strings refuse random others ('no-such-' + text: no choice, no
  module, no path there is); free-form ones take any text or refuse it
  naming a config field."""
  cases = []
  for field, _ in _fields(base, "text"):
    if _free_form(field):
      text = data.draw(st.text(max_size=12), label=field)
      cases.append((field, text, True, None, ()))
    else:
      # (No '/' or ':', which could name a path or URL that is there; no
      # line breaks, which a message echoing a path would carry.)
      text = "no-such-" + data.draw(
          st.text(st.characters(exclude_characters="/:\n\r"), max_size=12),
          label=field)
      cases.append((field, text, False, _names(field), _also(field)))
  assert cases
  _check_all(base[0], cases)


def _shaped_like(value):
  """Structures like `value`: its entries, other text, None, numbers."""
  if isinstance(value, (tuple, list)):
    parts = [_shaped_like(v) for v in value[:3]] or [st.none()]
    return st.lists(st.one_of(parts), max_size=3).map(tuple)
  return st.one_of(st.just(value), st.text(max_size=6), st.none(),
                   st.integers(-2, 2))


@per_config
@settings(max_examples=5, **_FAST)
@given(data=st.data())
def test_records_are_taken_or_refused_naming_a_field(base, data):
  cases = []
  for field, value in _fields(base, "records"):
    for _ in range(8):
      drawn = data.draw(_shaped_like(value), label=field)
      cases.append((field, str(drawn), True, None, ()))
  if cases:  # Accepted, or refused naming a config field; no crash.
    _check_all(base[0], cases)
