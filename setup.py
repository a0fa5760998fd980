"""midog-jax: mitotic figure detection under domain shift (JAX/Flax)."""

from setuptools import find_packages, setup

# Exact pins: pip here picks the newest release across several indexes, so
# anything left open drifts between machines.
CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "ml-collections==1.1.0",
    "clu==0.0.12",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    "tifffile==2026.3.3",
    "imagecodecs==2026.3.6",
    "zarr==3.1.6",
    "numcodecs==0.16.6",
    "numpy==2.4.6",
    "scipy==1.17.1",
    "tensorboardX==2.6.5",
    "pillow==13.0.0",
    "psutil==7.2.2",
    "safetensors==0.8.0",
    "optuna==5.0.0",
    "scikit-learn==1.9.1",
    "protobuf==7.36.2",
    "matplotlib==3.11.2",  # benchmark leaderboard charts (Agg backend, imported lazily)
]

setup(
    name="midog-jax",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["midog_jax", "midog_jax.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={
        # setuptools: the installed-package test builds a wheel without build
        # isolation (70.1+ builds wheels without the separate "wheel" package).
        "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "setuptools==84.2.1"],
        "cuda": ["jax[cuda12]==0.10.2"],
        "tpu": ["jax[tpu]==0.10.2"],
        "tf": ["tensorflow"],
        # Reading torchvision .pth files (midog_jax.weights) and the parity
        # tests; never needed to train or predict. torchvision 0.29.1 needs
        # exactly this torch (it does not import beside 2.13).
        "torch": ["torch==2.14.1", "torchvision==0.29.1"],
    },
)
