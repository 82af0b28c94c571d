"""Small real-format data files for tests (the real datasets are large).

The files have the exact on-disk layout of the real ones, so the real loaders
run unchanged on them.
"""

import gzip
import os
import struct

import numpy as np

_WORDS = ("the kernel driver memory page lock thread device interrupt "
          "scheduler file system buffer queue cpu task signal map user "
          "process module data read write timer bus irq").split()


def write_idx_images(path: str, images: np.ndarray) -> None:
  """IDX3 ubyte, gzipped: magic 2051, count, rows, cols, then pixels."""
  n, rows, cols = images.shape
  with gzip.open(path, "wb") as f:
    f.write(struct.pack(">iiii", 2051, n, rows, cols))
    f.write(images.astype(np.uint8).tobytes())


def write_idx_labels(path: str, labels: np.ndarray) -> None:
  """IDX1 ubyte, gzipped: magic 2049, count, then labels."""
  with gzip.open(path, "wb") as f:
    f.write(struct.pack(">ii", 2049, len(labels)))
    f.write(labels.astype(np.uint8).tobytes())


def write_fashion_mnist(root: str, n_train: int = 600, n_test: int = 200,
                        seed: int = 0) -> str:
  """Fashion-MNIST-shaped files whose label is visible in the pixels."""
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, (n, 28, 28))
    for i, y in enumerate(labels):  # A bright stripe at row 2 * label.
      images[i, 2 * y:2 * y + 2, :] = 255
    write_idx_images(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"),
                     images)
    write_idx_labels(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"),
                     labels)
  return root


def write_rst_docs(root: str, n_docs: int = 30, seed: int = 0) -> str:
  """A tree of `*.rst.txt` documents of pseudo-English, like the kernel docs."""
  rng = np.random.default_rng(seed)
  for i in range(n_docs):
    sub = os.path.join(root, f"area{i % 3}")
    os.makedirs(sub, exist_ok=True)
    sentences = []
    for _ in range(int(rng.integers(5, 30))):
      words = rng.choice(_WORDS, int(rng.integers(4, 12)))
      sentences.append(" ".join(words).capitalize() + ".")
    with open(os.path.join(sub, f"doc{i}.rst.txt"), "w") as f:
      f.write(f"Title {i}\n========\n\n" + " ".join(sentences) + "\n")
  return root
