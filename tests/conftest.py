"""Test-wide settings: 8 host CPU devices (set before JAX starts) and exact float32 matmuls."""

import os

# Multi-device tests need several devices; on CPU XLA fakes them. Must precede importing jax.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update('jax_default_matmul_precision', 'highest')
