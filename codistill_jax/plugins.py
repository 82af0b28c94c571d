"""Finds a model or data module by the name a config gives it.

`config.model_name` and `config.data.name` name a plug-in: a module of this
package (`codistill_jax/models/<name>.py`, `codistill_jax/data/<name>.py`) or
any importable dotted module path of the user's own (`my_pkg.my_model`), so
bringing a model or a dataset needs no edit inside `codistill_jax/`. An
unknown name is bad input: a ConfigError naming the field and what exists.
"""

import importlib
import pkgutil

from codistill_jax.errors import ConfigError


def available(package: str, exclude: tuple[str, ...] = ()) -> list[str]:
  """Module names in `codistill_jax.<package>` (no private ones)."""
  pkg = importlib.import_module(f"codistill_jax.{package}")
  return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)
                if m.name not in exclude and not m.name.startswith("_"))


def load(package: str, name: str, field: str, exclude: tuple[str, ...] = (),
         required: tuple[str, ...] = ()):
  """Imports the plug-in `name`; `field` names it in errors.

  Args:
    package: 'models' or 'data'.
    name: a module of `codistill_jax.<package>`, or a dotted module path.
    field: the config field that named it, e.g. 'config.model_name'.
    exclude: modules of the package that are not plug-ins (helpers).
    required: attributes the module must define (its protocol).
  """
  dotted = "." in name
  full = name if dotted else f"codistill_jax.{package}.{name}"
  where = ("an importable module (is its package on PYTHONPATH?)" if dotted
           else f"a module in codistill_jax/{package}/; use one of "
           f"{available(package, exclude)} or a dotted path of your own")
  if not dotted and (name in exclude or name.startswith("_") or not name):
    raise ConfigError(f"{field}={name!r} names no plug-in; name {where}")
  try:
    module = importlib.import_module(full)
  except ModuleNotFoundError as e:
    # Only the plug-in itself missing is bad input; a module it imports that
    # is missing is said too, naming that module.
    if e.name and (full == e.name or full.startswith(e.name + ".")):
      raise ConfigError(f"{field}={name!r} is not {where}") from None
    raise ConfigError(f"{field}={name!r}: importing it failed: {e}; install "
                      f"{e.name!r}") from None
  missing = [a for a in required if not hasattr(module, a)]
  if missing:
    raise ConfigError(f"{field}={name!r}: the module defines no "
                      f"{', '.join(missing)} (see codistill_jax/{package}/"
                      "__init__.py for the protocol)")
  return module
