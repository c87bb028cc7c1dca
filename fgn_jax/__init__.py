"""fgn_jax: a vectorised simulator of FedGradNorm and FedRep in JAX/Flax."""

__version__ = "0.1.0"
