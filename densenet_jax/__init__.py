"""densenet_jax: Densely Connected Convolutional Networks in JAX/Flax."""

__version__ = '0.1.0'
