r"""Writes a trained teacher's targets once, for `teacher_source='stored'`.

Runs the teacher over the training split of `--config`'s data and writes its
probabilities (or top-k, with `config.codistill.topk`) by example index into
`--out`, atomically (target_store.py says what is in a store).

  python -m codistill_jax.tools.store_targets --config=configs/flights.py:quick \
      --teacher=/tmp/teacher_run --out=/tmp/targets
"""

import os

from absl import flags

from codistill_jax import cli
from codistill_jax import target_store


def main(argv) -> None:
  del argv
  manifest = target_store.write(_CONFIG.value, _TEACHER.value, _OUT.value)
  arrays = ", ".join(f"{k} {tuple(v['shape'])} {v['dtype']}"
                     for k, v in manifest["arrays"].items())
  size = sum(os.path.getsize(os.path.join(_OUT.value, f))
             for f in os.listdir(_OUT.value))
  print(f"wrote {_OUT.value}: {arrays}; {size / 2**20:.1f} MiB; teacher "
        f"{manifest['teacher']['step_dir']}")


if __name__ == "__main__":
  _CONFIG = cli.define_config_flag()
  _TEACHER = flags.DEFINE_string(
      "teacher", None, "The trained teacher: a run dir, checkpoints dir or "
      "step dir.")
  _OUT = flags.DEFINE_string("out", None, "The store directory to create.")
  cli.run(main, required=("config", "teacher", "out"))
