"""Input pipelines: one module per source, all with the same small protocol.

A data module `codistill_jax/data/<name>.py` (selected by `config.data.name`)
defines

  get_datasets(config, *, group, num_groups, process_index, process_count)
      -> common.Datasets

and, optionally, `check(config)` which raises `errors.ConfigError` (naming the
field or file and the fix, e.g. the install command) before anything is
compiled or written.

`Datasets.train(start_step)` yields this host's share of group `group`'s global
batch `config.data.batch_size` for steps start_step, start_step + 1, ...: the
batch at step s depends only on (config.seed, group, s), so a resumed run sees
exactly the batches an uninterrupted one would. `Datasets.evals[split]()` yields
finite, padded batches (every host the same number). Every batch is a dict of
numpy arrays with static shapes:

  'inputs':  array or dict of arrays, leading dim = per-host batch
  'labels':  int32 [b] (classes), float32 [b] (binary CTR) or int32 [b, L] (LM)
  'weights': float32, same shape as 'labels': 0 for padding examples/tokens
  'index':   int64 [b], the example's index in its split (-1 for padding)

Data modules know no models: `Datasets.info` describes the data (num_classes,
vocab_size, cardinalities, ...) and the trainer passes what a model asks for.
"""

from codistill_jax import plugins

_NOT_SOURCES = ("common", "tokenizer")


def get_module(name: str):
  """Imports `codistill_jax.data.<name>` or raises a ConfigError."""
  return plugins.load("data", name, "config.data.name", _NOT_SOURCES)


def available() -> list[str]:
  return plugins.available("data", _NOT_SOURCES)
