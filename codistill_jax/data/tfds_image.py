"""ImageNet-style image classification from tfds ArrayRecord files, no TF.

For the paper-scale image runs (imagenet2012 or any tfds dataset with an
'image' and a 'label' feature). Records come from `tfds.data_source`'s
random-access ArrayRecord reader and are decoded, resized and batched on grain
threads; TensorFlow is never imported. Decoding the stored JPEG/PNG bytes
needs pillow or opencv, which tfds picks up itself.

Preprocessing, train and eval alike (Inception-style eval crop): resize the
shorter side to image_size / 0.875, take the central image_size x image_size
square (bilinear, computed only for the pixels kept), scale to [0, 1] and
standardise with the ImageNet channel mean and std. There is no random
augmentation: a crop drawn from (seed, step, row) would keep resumption exact
but is not written yet.

Splits are tfds's: hold validation data out of the train split with tfds
slicing, e.g. train_split='train[:99%]', eval_splits={'validation':
'train[99%:]', 'test': 'validation'}.

Config fields (config.data.*): tfds_name, data_dir ('' = tfds default),
image_size, train_split, eval_splits ({name: tfds split}), batch_size,
eval_batch_size, split_seed (seeds the group partition), partition.
"""

from __future__ import annotations

import functools

import numpy as np

from codistill_jax.data import pipeline
from codistill_jax.data import sources
from codistill_jax.errors import ConfigError

CROP_FRACTION = 0.875
RGB_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
RGB_STD = np.array([0.229, 0.224, 0.225], np.float32)


# Ranges of this module's config.data fields (config_lib.check_ranges).
RANGES = {"image_size": "> 0"}


def check(config) -> None:
  """Cheap checks: names and sizes given, data_dir exists if set."""
  sources.check_tfds_source(config, "imagenet2012")


def _axis(size_in: int, scale: float, offset: int, size_out: int):
  """Source rows (lo, hi, frac) of output pixels offset .. offset+size_out-1.

  Pixel centres map as in TF's half-pixel bilinear resize: out + 0.5 =
  (in + 0.5) * scale.
  """
  x = (np.arange(offset, offset + size_out) + 0.5) / scale - 0.5
  x = np.clip(x, 0, size_in - 1)
  lo = np.floor(x).astype(np.int64)
  hi = np.minimum(lo + 1, size_in - 1)
  return lo, hi, (x - lo).astype(np.float32)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [h, w, c] -> float32 [size, size, c] in [0, 255], resized+cropped."""
  h, w = image.shape[:2]
  scale = size / CROP_FRACTION / min(h, w)
  # Offsets of the central square inside the resized (h*scale, w*scale) image.
  top = max(0, int(round((h * scale - size) / 2)))
  left = max(0, int(round((w * scale - size) / 2)))
  lo, hi, f = _axis(h, scale, top, size)
  rows = (image[lo].astype(np.float32) * (1 - f)[:, None, None] +
          image[hi].astype(np.float32) * f[:, None, None])
  lo, hi, f = _axis(w, scale, left, size)
  return rows[:, lo] * (1 - f)[None, :, None] + rows[:, hi] * f[None, :, None]


def _example(source, size: int, channels: int, index: int) -> dict:
  example = source[index]
  image = np.asarray(example["image"])
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] != channels:  # E.g. a grey JPEG in an RGB dataset.
    image = np.broadcast_to(image[..., :1], (*image.shape[:2], channels))
  x = center_crop(image, size) / 255.0
  if channels == 3:
    x = (x - RGB_MEAN) / RGB_STD
  else:
    x = (x - RGB_MEAN.mean()) / RGB_STD.mean()
  return {"inputs": x.astype(np.float32),
          "labels": np.int32(example["label"]),
          "weights": np.float32(1.0)}


def get_datasets(config, *, group: int, num_groups: int, process_index: int,
                 process_count: int) -> pipeline.Datasets:
  check(config)
  builder, split_sources = sources.open_tfds(config)
  features = builder.info.features
  channels = features["image"].shape[-1] or 3
  size = config.data.image_size
  splits = {}
  for name, source in split_sources.items():
    get = functools.partial(_example, source, size, channels)
    if len(source):
      try:  # Fail here, not on a grain thread, when no decoder is installed.
        get(0)
      except ImportError as e:
        raise ConfigError(
            f"config.data.tfds_name={config.data.tfds_name!r}: decoding its "
            f"images needs pillow or opencv ({e}); run `pip install pillow`"
        ) from None
    splits[name] = pipeline.RecordSplit(len(source), get)
  info = {"num_classes": int(features["label"].num_classes),
          "image_shape": (size, size, channels)}
  return pipeline.assemble(config, splits, info, group=group,
                         num_groups=num_groups, process_index=process_index,
                         process_count=process_count)
