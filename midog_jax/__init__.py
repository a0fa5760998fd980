"""midog-jax: mitotic figure detection under domain shift, in JAX/Flax."""

__version__ = "0.1.0"
