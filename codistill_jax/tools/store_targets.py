r"""Writes a trained teacher's targets once, for `teacher_source='stored'`.

Runs the teacher over the training split of `--config`'s data and writes its
probabilities (or top-k, with `config.codistill.topk`) by example index into
`--out`, atomically (target_store.py says what is in a store).

  python -m codistill_jax.tools.store_targets --config=configs/flights.py:quick \
      --teacher=/tmp/teacher_run --out=/tmp/targets

Checked before the teacher runs or anything is written (one `error:` line,
exit code 2): `--out` does not exist yet (a store is never overwritten) and
can be created; `--teacher` holds a committed checkpoint of a model that
predicts this config's outputs (the same checks as a student's
`teacher_checkpoint`); the config is valid for this machine's devices.
"""

import os

from absl import flags

from codistill_jax import cli


def check(config, teacher: str, out: str) -> None:
  """Raises ConfigError for anything `target_store.write` would trip on."""
  cli.check_output(out, "--out", directory=True, new=True)
  cli.check_dir(teacher, "--teacher", "run, checkpoints or step directory")
  # Imported here: the checks above do not pay for JAX.
  # pylint: disable=g-import-not-at-top
  import jax
  from codistill_jax import checkpoint as ckpt_lib
  from codistill_jax import validate
  # pylint: enable=g-import-not-at-top
  ckpt_lib.find_step_dir(teacher, "--teacher")
  # The store's teacher is checked as a student's fixed teacher would be;
  # its task and output space `target_store.write` checks before it writes.
  as_student = config.copy_and_resolve_references()
  as_student.codistill.teacher_source = "checkpoint"
  as_student.codistill.teacher_checkpoint = teacher
  validate.validate(as_student, num_devices=jax.device_count(),
                    num_groups_here=1)


def main(argv) -> None:
  del argv
  check(_CONFIG.value, _TEACHER.value, _OUT.value)
  from codistill_jax import target_store  # pylint: disable=g-import-not-at-top
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
  cli.run(main, required=("config", "teacher", "out"),
          output="--out")
