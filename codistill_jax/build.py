"""From a config to the pieces a run computes with, built once (no compute).

The model, the optimizer, the abstract state laid out on a group's mesh, the
fixed teacher's model, the distillation term, and the jitted train / eval /
predict steps. `train_step(config, setup, layout)` is the one train-step
builder: the trainer, `tools/compile_check` (which lowers the very same jitted
step ahead of time) and every experiment build their step with it, so they
cannot drift apart; `tools/churn`, the teacher service and the target store
build their models here too.
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from codistill_jax import averaging
from codistill_jax import checkpoint as ckpt_lib
from codistill_jax import distill as distill_lib
from codistill_jax import losses
from codistill_jax import mesh as mesh_lib
from codistill_jax import metrics as metrics_lib
from codistill_jax import models as models_lib
from codistill_jax import noise_scale
from codistill_jax import optim
from codistill_jax import sampling
from codistill_jax import step as step_lib
from codistill_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Setup:
  """A group's model, optimizer and abstract state, sharded on its mesh."""
  model: Any
  tx: Any
  lr_fn: Callable
  init_fn: Callable  # rng -> TrainState; jit it with out_shardings.
  abstract: Any  # TrainState of ShapeDtypeStructs carrying the shardings.
  state_sharding: Any
  info: Any  # The dataset's info (vocab_size, unigram counts, ...).
  example: Any  # One-example zeros of the inputs (for init).
  mesh: Any


def example_inputs(batch) -> Any:
  """One-example zeros with the batch's per-example shapes (for init)."""
  return jax.tree.map(lambda x: np.zeros((1,) + x.shape[1:], x.dtype),
                      batch["inputs"])


def with_shardings(abstract, shardings):
  """ShapeDtypeStructs of `abstract` carrying `shardings` (a matching tree,
  or one sharding for every leaf)."""
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, abstract)
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)


def build(config: ml_collections.ConfigDict, datasets, mesh) -> Setup:
  """Model, optimizer and state layout for `config` on `mesh` (no compute)."""
  model = models_lib.build(config.model_name, config.model.to_dict(),
                           datasets.info)
  tx, lr_fn = optim.make_optimizer(config.optimizer, config.total_steps)
  if averaging.enabled(config):  # The anchor and outer state in opt_state.
    tx = averaging.with_outer(tx, averaging.make_outer_tx(config.codistill))
  example = example_inputs(next(iter(datasets.train(0))))
  init_fn = functools.partial(step_lib.init_state, model, tx,
                              example_inputs=example)
  abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  state_sharding = mesh_lib.tree_shardings(
      mesh, abstract, config.sharding.rules, config.sharding.fsdp_min_size)
  return Setup(model, tx, lr_fn, init_fn,
               with_shardings(abstract, state_sharding), state_sharding,
               datasets.info, example, mesh)


# ----------------------------------------------------------------------------
# Teachers.
# ----------------------------------------------------------------------------
def teacher_spec(config: ml_collections.ConfigDict,
                 checkpoint: str = "") -> tuple[str, dict]:
  """(model name, kwargs) of a fixed teacher: the one answer to "which model".

  A fixed teacher (two-phase distillation, the service, stored targets) is,
  in this order: `codistill.teacher_model_name` / `teacher_model` when named
  (in a config file); the architecture in the config.json of the run its
  checkpoint belongs to (a teacher run dir is enough); else the student's.
  Peers are copies of their own groups and never ask.

  Args:
    config: the student's config.
    checkpoint: the teacher's run, checkpoints or step dir (default:
      `codistill.teacher_checkpoint`).
  """
  cd = config.codistill
  if cd.teacher_model_name:
    return cd.teacher_model_name, cd.teacher_model.to_dict()
  checkpoint = checkpoint or cd.teacher_checkpoint
  run = (ckpt_lib.run_config_of(checkpoint)
         if checkpoint and "://" not in checkpoint else None)
  if run and run.get("model_name"):
    # JSON has no tuples; the models' Sequence fields take tuples.
    kwargs = {k: tuple(v) if isinstance(v, list) else v
              for k, v in (run.get("model") or {}).items()}
    return run["model_name"], kwargs
  return config.model_name, config.model.to_dict()


def teacher_model(config: ml_collections.ConfigDict, info,
                  checkpoint: str = "") -> Any:
  """The fixed teacher's Flax module (see `teacher_spec`)."""
  name, kwargs = teacher_spec(config, checkpoint)
  return models_lib.build(name, kwargs, info)


def fixed_teacher(config: ml_collections.ConfigDict, info, example,
                  sharding, checkpoint: str = "",
                  field: str = "config.codistill.teacher_checkpoint"):
  """(module, abstract params on `sharding`) of the fixed teacher, checked
  to predict this run's outputs before anything is read.

  A teacher of another task (an LM run named as the teacher of a CTR model)
  is a ConfigError naming `field`: its run's loss differs, it cannot run on
  this run's inputs, or it predicts another number of classes.

  Args:
    config: the student's config.
    info: the student's dataset info.
    example: one example of the student's inputs (`example_inputs`).
    sharding: where the params go.
    checkpoint: the teacher's path (default: codistill.teacher_checkpoint).
    field: names the path in errors.
  """
  checkpoint = checkpoint or config.codistill.teacher_checkpoint
  name, _ = teacher_spec(config, checkpoint)
  where = f"{field}={checkpoint}"
  run = (ckpt_lib.run_config_of(checkpoint)
         if checkpoint and "://" not in checkpoint else None)
  if run and run.get("loss", config.loss) != config.loss:
    raise ConfigError(
        f"{where} is a run of another task (loss {run.get('loss')!r}, data "
        f"{(run.get('data') or {}).get('name')!r}); the teacher must predict "
        f"this run's outputs (loss {config.loss!r}, data "
        f"{config.data.name!r}): name a teacher run of this task")
  try:
    teacher = teacher_model(config, info, checkpoint)
    params = abstract_params(teacher, example, sharding)
    logits = jax.eval_shape(lambda p: teacher.apply(p, example, train=False),
                            params)
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(
        f"{where}: its model {name!r} cannot run on this run's inputs "
        f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        f"); name a teacher run of this task") from None
  student = jax.eval_shape(
      lambda: models_lib.build(config.model_name, config.model.to_dict(),
                               info).init_with_output(
                                   jax.random.PRNGKey(0), example,
                                   train=False)[0])
  if logits.shape != student.shape:
    raise ConfigError(
        f"{where}: its model {name!r} predicts outputs of shape "
        f"{logits.shape[1:]}, the student {student.shape[1:]}; name a "
        "teacher of this run's output space")
  return teacher, params


def abstract_params(model, example, sharding) -> Any:
  """`model`'s params as ShapeDtypeStructs on `sharding` (no compute)."""
  params = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), example, train=False))
  return with_shardings(params, sharding)


def stacked(abstract: Any, n: int, dtype: Any, sharding) -> step_lib.Teachers:
  """Abstract `Teachers` of `n` stacked copies of `abstract` params.

  Float leaves are cast to `dtype` (config.codistill.teacher_dtype).
  """
  cast = lambda a: (jnp.dtype(dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                    else a.dtype)
  return with_shardings(step_lib.Teachers(
      params=jax.tree.map(lambda a: jax.ShapeDtypeStruct((n, *a.shape),
                                                         cast(a)), abstract),
      weights=jax.ShapeDtypeStruct((n,), np.float32)), sharding)


# ----------------------------------------------------------------------------
# The distillation term and the jitted steps.
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
  """What a group's train step is compiled for, as its teacher source says
  (`teachers.layout`): the step's extra arguments and extra batch entries
  are abstract (ShapeDtypeStructs on the group's mesh)."""
  distills: bool = False  # Whether the step has a distillation term.
  # Flax module of in-process teachers (a tuple of them, one per
  # architecture, with a tuple of stacked Teachers in `args`); None: the
  # targets arrive in the batch.
  teacher: Any = None
  args: tuple = ()  # Abstract extra step arguments, with shardings.
  batch: dict = dataclasses.field(default_factory=dict)  # Extra batch keys.

  @property
  def precomputed(self) -> bool:
    """Whether the targets arrive in `batch['teacher']`."""
    return self.distills and self.teacher is None

  @property
  def arg_shardings(self) -> tuple:
    return tuple(jax.tree.map(lambda a: a.sharding, a) for a in self.args)

  @property
  def num_teachers(self) -> int:
    """Stacked teacher param sets the step takes (0 for targets in batch)."""
    return sum(int(t.weights.shape[0]) for a in self.args
               for t in (a if isinstance(a, tuple) else (a,)))

  @property
  def mixed(self) -> bool:
    """Teachers of several architectures (`teacher` is a tuple of modules)."""
    return isinstance(self.teacher, tuple)


def sampled_head(config, setup: Setup, teacher) -> sampling.SampledHead:
  """The `sampling.SampledHead` of config.codistill.sampled.

  Args:
    config: the experiment config (num_samples > 0).
    setup: the student's.
    teacher: the teachers' Flax module (the student's architecture for
      peers); it provides `hidden` and `output_embedding`.
  """
  sm = config.codistill.sampled
  student = setup.model
  vocab = student.output_embedding(setup.abstract.params)[0].shape[-1]
  if sm.num_samples > vocab:
    raise ConfigError(f"config.codistill.sampled.num_samples={sm.num_samples}"
                      f" exceeds the {vocab} output classes; use at most "
                      f"{vocab}")
  unigram = None
  if sm.proposal == "unigram":
    if "unigram" not in (setup.info or {}):
      raise ConfigError("config.codistill.sampled.proposal='unigram': data "
                        f"{config.data.name!r} gives no class counts; use "
                        "'dynamic'")
    unigram = np.asarray(setup.info["unigram"], np.float32)

  def hidden_fn(module):
    return lambda p, x, train=False, rngs=None: module.apply(
        p, x, train=train, rngs=rngs, method="hidden")

  return sampling.SampledHead(
      hidden_fn=hidden_fn(student), output_embedding=student.output_embedding,
      teacher_hidden_fn=hidden_fn(teacher),
      teacher_output_embedding=teacher.output_embedding,
      num_samples=sm.num_samples, proposal=sm.proposal,
      prior_mix=sm.prior_mix, uniform_mix=sm.uniform_mix,
      proposal_positions=sm.proposal_positions, unigram=unigram,
      task_loss=sm.task_loss)


def distill_term(config, setup: Setup, teacher: Any = None,
                 precomputed: bool = False):
  """The distillation term of `config.codistill` (None: nothing to distil).

  Args:
    config: the experiment config.
    setup: the student's.
    teacher: the Flax module of in-process teachers, or None.
    precomputed: the targets arrive in `batch['teacher']` instead.
  """
  if teacher is None and not precomputed:
    return None
  cd = config.codistill
  alpha = losses.alpha_schedule(cd.alpha, cd.burn_in_steps,
                                cd.alpha_ramp_steps)
  binary = config.loss == "sigmoid_xent"
  if precomputed:
    return distill_lib.Precomputed(alpha, cd.divergence, cd.temperature,
                                   binary, cd.topk_mode)
  if cd.sampled.num_samples:
    return distill_lib.Sampled(sampled_head(config, setup, teacher), alpha,
                               cd.divergence, cd.temperature)
  apply = (tuple(t.apply for t in teacher) if isinstance(teacher, tuple)
           else teacher.apply)
  if cd.topk:
    return distill_lib.TopK(apply, alpha, cd.divergence,
                            cd.temperature, binary, k=cd.topk,
                            topk_mode=cd.topk_mode)
  return distill_lib.Dense(apply, alpha, cd.divergence, cd.temperature,
                           binary)


def train_step(config, setup: Setup, layout: Layout = Layout(),
               task_from: int = 0):
  """THE train step of a group, jitted with its shardings (compiled on first
  use): `step(state, batch, *layout.args) -> (state, metrics)`.

  The trainer, compile_check and every experiment build their step here.

  Args:
    config: the experiment config.
    setup: the group's.
    layout: what its teacher source feeds the step (`teachers.layout`); the
      default is plain training.
    task_from: the task loss counts from this step on (a group that joins a
      running run with `codistill.join_warmup_steps`).
  """
  term = (distill_term(config, setup, layout.teacher, layout.precomputed)
          if layout.distills else None)
  loss_fn = step_lib.make_loss_fn(losses.task_loss(config.loss))
  mesh = setup.mesh
  return jax.jit(
      mesh_lib.traced_on(mesh, step_lib.make_train_step(
          setup.model.apply, loss_fn, setup.tx, setup.lr_fn, term,
          microbatches=config.microbatches, task_from=task_from)),
      in_shardings=(setup.state_sharding, mesh_lib.batch_sharding(mesh),
                    *layout.arg_shardings),
      out_shardings=(setup.state_sharding, mesh_lib.replicated(mesh)),
      donate_argnums=(0,))


def jit_noise_scale(config, setup: Setup):
  """`measure(state, batch) -> metrics` of the gradient noise scale on the
  step's batch and params (`noise_scale.make_noise_scale_fn`), with the
  step's dropout rng."""
  loss_fn = step_lib.make_loss_fn(losses.task_loss(config.loss))
  mesh = setup.mesh
  pieces = config.noise_scale.pieces or max(mesh.shape["data"], 2)
  fn = noise_scale.make_noise_scale_fn(setup.model.apply, loss_fn, pieces)

  def measure(state, batch):
    return fn(state.params, batch, jax.random.fold_in(state.rng, state.step))

  return jax.jit(measure, in_shardings=(setup.state_sharding,
                                        mesh_lib.batch_sharding(mesh)),
                 out_shardings=mesh_lib.replicated(mesh))


def jit_eval_step(config, setup: Setup, predictions: bool = False):
  """`eval_step(params, batch)`: metric sums, or per-example predictions for
  comparing models (ensembles, churn), jitted on the group's mesh."""
  fn = (metrics_lib.predictions_fn(config.loss) if predictions
        else metrics_lib.eval_metrics_fn(config.loss))
  return jax.jit(
      mesh_lib.traced_on(setup.mesh,
                         step_lib.make_eval_step(setup.model.apply, fn)),
      in_shardings=(setup.state_sharding.params,
                    mesh_lib.batch_sharding(setup.mesh)),
      out_shardings=mesh_lib.replicated(setup.mesh))
