"""The English corpus LM module: subword tokens, packed windows, caches."""

import os

import numpy as np
import pytest

from codistill_jax import metrics
from codistill_jax import train
from codistill_jax.data import english
from codistill_jax.data import spm
from codistill_jax.errors import ConfigError
from tests import datagen
from tests.test_train import load_config


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory):
  return datagen.write_rst_docs(str(tmp_path_factory.mktemp("docs")),
                                n_docs=60)


def _config(docs_dir, cache, **data):
  config = load_config("english_lm")
  config.data.roots = {"kernel_docs": docs_dir}
  config.data.cache_dir = str(cache)
  config.data.max_docs = 0
  config.data.vocab_size = 400
  for k, v in data.items():
    config.data[k] = v
  return config


def _datasets(config, group=0, num_groups=1):
  return english.get_datasets(config, group=group, num_groups=num_groups,
                              process_index=0, process_count=1)


def test_windows_are_packed_without_padding(docs_dir, tmp_path):
  config = _config(docs_dir, tmp_path)
  windows, tok = english.load(config)
  split = english.split(english.documents(config), config.data.split_seed)
  assert {k: len(v) for k, v in split.items()} == {
      "train": 58, "validation": 1, "test": 1}
  for name, w in windows.items():
    assert w.shape[1] == config.data.seq_len + 1
    assert not (w == spm.PAD).any()  # No padding anywhere.
    # Consecutive windows overlap by one id: one stream cut in pieces.
    np.testing.assert_array_equal(w[1:, 0], w[:-1, -1])
  # Every train document ends with EOD in the stream (the tail that does
  # not fill a window is dropped): as many EODs as documents, give or take
  # those in the dropped tail and the leading one.
  eods = int((windows["train"][:, 1:] == spm.EOD).sum())
  assert 58 - 3 <= eods <= 58
  batch = next(iter(_datasets(config).train(0)))
  assert batch["weights"].min() == 1.0  # Every target counts.
  assert tok.vocab_size == config.data.vocab_size


def test_train_stream_is_a_pure_function_of_the_step(docs_dir, tmp_path):
  config = _config(docs_dir, tmp_path)
  ds = _datasets(config)
  stream = iter(ds.train(0))
  batches = [next(stream) for _ in range(4)]
  resumed = next(iter(_datasets(config).train(3)))
  for k in ("inputs", "labels"):
    np.testing.assert_array_equal(batches[3][k], resumed[k])
  # Two groups read disjoint windows.
  a = next(iter(_datasets(config, 0, 2).train(0)))["index"]
  b = next(iter(_datasets(config, 1, 2).train(0)))["index"]
  assert not set(a.tolist()) & set(b.tolist())


def test_tokenizer_and_windows_come_from_the_cache(docs_dir, tmp_path):
  config = _config(docs_dir, tmp_path)
  english.load(config)
  cached = sorted(os.listdir(tmp_path))
  stamps = {f: os.stat(tmp_path / f).st_mtime_ns for f in cached}
  windows, _ = english.load(config)
  assert sorted(os.listdir(tmp_path)) == cached
  assert {f: os.stat(tmp_path / f).st_mtime_ns for f in cached} == stamps
  # Another sequence length re-packs with the same tokenizer.
  other, _ = english.load(_config(docs_dir, tmp_path, seq_len=8))
  assert other["train"].shape[1] == 9
  assert len([f for f in os.listdir(tmp_path) if f.endswith(".model")]) == 1
  assert windows["train"].shape[1] == 17


@pytest.mark.parametrize("data,match", [
    ({"sources": "no_such_source"}, "unknown source 'no_such_source'"),
    ({"roots": {"kernel_docs": "/nonexistent"}},
     "config.data.roots.kernel_docs"),
    ({"vocab_size": 300}, "config.data.vocab_size=300"),
    ({"seq_len": 100000}, "config.data.seq_len"),
])
def test_bad_data_config_is_one_line_before_any_write(docs_dir, tmp_path,
                                                      data, match):
  config = _config(docs_dir, tmp_path / "cache", **data)
  with pytest.raises(ConfigError, match=match):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_english_lm_trains_and_codistils(docs_dir, tmp_path):
  config = _config(docs_dir, tmp_path / "cache")
  config.codistill.num_groups = 2
  final = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(final[0]["test/loss"])
  rows = [r for r in metrics.read_jsonl(
      str(tmp_path / "run" / "group_1" / "metrics.jsonl")) if "loss" in r]
  assert any(r.get("distill_loss", 0) > 0 for r in rows)
