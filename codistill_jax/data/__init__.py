"""Input pipelines: one module per source, all with the same small protocol.

A data module (selected by `config.data.name`: a module of this package or a
dotted module path of your own) defines

  get_datasets(config, *, group, num_groups, process_index, process_count)
      -> pipeline.Datasets

and, optionally, `check(config)`, which raises `errors.ConfigError` (naming
the field or file and the fix, e.g. the install command) before anything is
compiled or written, and `RANGES` ({field: '> 0', ...}) for its numeric
`config.data` fields.

`Datasets.train(start_step)` yields this host's share of group `group`'s global
batch `config.data.batch_size` for steps start_step, start_step + 1, ...: the
batch at step s depends only on (config.seed, group, s), so a resumed run sees
exactly the batches an uninterrupted one would. `Datasets.evals[split]()` yields
finite, padded batches (every host the same number); the trainer evaluates the
first split during training and all of them at the end. Every batch is a dict
of numpy arrays with static shapes:

  'inputs':  array or dict of arrays, leading dim = per-host batch
  'labels':  int32 [b] (classes), float32 [b] (binary CTR) or int32 [b, L] (LM)
  'weights': float32, same shape as 'labels': 0 for padding examples/tokens
  'index':   int64 [b], the example's index in its split (-1 for padding)

Data modules know no models: `Datasets.info` describes the data (num_classes,
vocab_size, cardinalities, ...) and the trainer passes what a model asks for.
Shared helpers live beside them: `order` (splits, shards, batch order),
`pipeline` (`assemble`, `Datasets`), `sources` (caches, tfds), `lm` (the LM
window layout), `tokenizer`.
"""

from codistill_jax import config_lib
from codistill_jax import plugins

_NOT_SOURCES = ("order", "pipeline", "sources", "lm", "tokenizer", "corpus",
                "spm")


def get_module(name: str):
  """The data module `name` (see plugins.load) or a ConfigError."""
  return plugins.load("data", name, "config.data.name", _NOT_SOURCES,
                      required=("get_datasets",))


def available() -> list[str]:
  return plugins.available("data", _NOT_SOURCES)


def check_config(config) -> None:
  """config.data: the module exists, its fields are in range, its check()."""
  # pylint: disable-next=g-import-not-at-top
  from codistill_jax.data import order
  module = get_module(config.data.name)
  config_lib.check_choice(config, "data.partition", order.PARTITION_MODES)
  config_lib.check_ranges(config.data, getattr(module, "RANGES", {}),
                          "config.data")
  if hasattr(module, "check"):
    module.check(config)
