"""Finds a model or data module by the name a config gives it.

`codistill_jax/models/<name>.py` and `codistill_jax/data/<name>.py` are
plug-ins selected by `config.model_name` and `config.data.name`; an unknown
name is bad input and gets a ConfigError listing what exists.
"""

import importlib
import pkgutil

from codistill_jax.errors import ConfigError


def available(package: str, exclude: tuple[str, ...] = ()) -> list[str]:
  """Module names in `codistill_jax.<package>` (no private ones)."""
  pkg = importlib.import_module(f"codistill_jax.{package}")
  return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)
                if m.name not in exclude and not m.name.startswith("_"))


def load(package: str, name: str, field: str, exclude: tuple[str, ...] = ()):
  """Imports `codistill_jax.<package>.<name>`; `field` names it in errors."""
  full = f"codistill_jax.{package}.{name}"
  if name in exclude or name.startswith("_") or not name:
    raise ConfigError(f"{field}={name!r} names no module in codistill_jax/{package}/; use one "
                      f"of {available(package, exclude)}")
  try:
    return importlib.import_module(full)
  except ModuleNotFoundError as e:
    if e.name != full:
      raise
    raise ConfigError(f"{field}={name!r} names no module in codistill_jax/{package}/; use one "
                      f"of {available(package, exclude)}") from None
