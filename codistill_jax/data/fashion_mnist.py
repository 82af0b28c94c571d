"""Fashion-MNIST from the IDX files Debian's dataset-fashion-mnist installs.

The image-classification stand-in for ImageNet that every machine of the
project can install offline: 28x28 grey images, 10 classes, 60k train and 10k
test. The 60k training images are split into train and validation
(`config.data.validation_size` of them, by a permutation keyed by
`config.data.split_seed`); test is t10k. Pixels are scaled to [0, 1] and
standardised with the train split's mean and std.

Config fields (config.data.*): path (directory of the four .gz files),
validation_size, batch_size, eval_batch_size, split_seed, partition.
"""

from __future__ import annotations

import functools
import gzip
import os

import numpy as np

from codistill_jax.data import order
from codistill_jax.data import pipeline
from codistill_jax.data import sources
from codistill_jax.errors import ConfigError

DEFAULT_PATH = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
               "Shirt", "Sneaker", "Bag", "Ankle boot")
_INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"
# IDX magic numbers: unsigned bytes, 1 dimension (labels) or 3 (images).
_LABELS_MAGIC = 0x00000801
_IMAGES_MAGIC = 0x00000803


# Ranges of this module's config.data fields (config_lib.check_ranges).
RANGES = {"validation_size": "> 0"}


def check(config) -> None:
  """Cheap checks: the four files exist, sizes are positive."""
  path = config.data.path
  if not os.path.isdir(path):
    raise ConfigError(f"config.data.path={path}: no such directory; install "
                      f"with `{_INSTALL}` or set --config.data.path")
  for name in sum(FILES.values(), ()):
    if not os.path.isfile(os.path.join(path, name)):
      raise ConfigError(f"config.data.path={path}: {name} is missing; install "
                        f"with `{_INSTALL}` or set --config.data.path")


def read_idx(path: str, magic: int) -> np.ndarray:
  """A gzipped IDX file of unsigned bytes as a uint8 array of its shape."""
  with gzip.open(path, "rb") as f:
    raw = f.read()
  ndim = magic & 0xFF
  header = np.frombuffer(raw, ">u4", count=1 + ndim)
  if int(header[0]) != magic:
    raise ConfigError(f"config.data.path: {path} is not an IDX file of "
                      f"{ndim}-d unsigned bytes (magic {int(header[0]):#x})")
  shape = tuple(int(d) for d in header[1:])
  # Labels start at byte 8, images at byte 16: 4 bytes magic + 4 per dim.
  data = np.frombuffer(raw, np.uint8, offset=4 * (1 + ndim))
  if data.size != np.prod(shape):
    raise ConfigError(f"config.data.path: {path} holds {data.size} bytes of "
                      f"data, its header says {shape}")
  return data.reshape(shape)


def load(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{'train', 'test'} -> (uint8 images [n, 28, 28], int32 labels [n]).

  Cached in-process (a process driving several groups reads the files once)
  and keyed by the files' sizes and mtimes; the arrays must not be modified.
  """
  stamps = tuple(sources.file_stamp(os.path.join(path, f))
                 for f in sum(FILES.values(), ()))
  return _load(path, stamps)


@functools.lru_cache(maxsize=1)
def _load(path: str, stamps) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  del stamps  # Only part of the cache key.
  out = {}
  for split, (images, labels) in FILES.items():
    x = read_idx(os.path.join(path, images), _IMAGES_MAGIC)
    y = read_idx(os.path.join(path, labels), _LABELS_MAGIC).astype(np.int32)
    if len(x) != len(y):
      raise ConfigError(f"config.data.path={path}: {images} has {len(x)} "
                        f"images but {labels} has {len(y)} labels")
    out[split] = (x, y)
  return out


def _gather(images: np.ndarray, labels: np.ndarray, mean: float, std: float,
            index: np.ndarray) -> dict:
  # Images stay uint8 in memory (47 MB, not 188 MB) and become floats per batch.
  x = (images[index].astype(np.float32) / 255.0 - mean) / std
  return {"inputs": x[..., None], "labels": labels[index],
          "weights": np.ones(len(index), np.float32)}


def get_datasets(config, *, group: int, num_groups: int, process_index: int,
                 process_count: int) -> pipeline.Datasets:
  check(config)
  files = load(config.data.path)
  images, labels = files["train"]
  if config.data.validation_size >= len(images):
    raise ConfigError(f"config.data.validation_size="
                      f"{config.data.validation_size} leaves no training "
                      f"examples of {len(images)}")
  rows = order.split_indices(len(images),
                              {"validation": config.data.validation_size},
                              config.data.get("split_seed", 0))
  data = {name: (images[rows[name]], labels[rows[name]])
          for name in ("train", "validation")}
  data["test"] = files["test"]
  train_pixels = data["train"][0].astype(np.float32) / 255.0
  mean, std = float(train_pixels.mean()), float(train_pixels.std())
  splits = {name: pipeline.ArraySplit(len(y), functools.partial(
      _gather, x, y, mean, std)) for name, (x, y) in data.items()}
  info = {"num_classes": len(CLASS_NAMES), "class_names": CLASS_NAMES,
          "image_shape": (*images.shape[1:], 1), "pixel_mean": mean,
          "pixel_std": std}
  return pipeline.assemble(config, splits, info, group=group,
                         num_groups=num_groups, process_index=process_index,
                         process_count=process_count)
