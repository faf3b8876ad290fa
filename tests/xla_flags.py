"""The XLA flags of the test processes and of every process they start.

Tests compile hundreds of small programs and run few steps of each, and on XLA:CPU most of a
compile is LLVM optimising the generated code: `--xla_backend_optimization_level=0` makes these
compiles 3-7x faster (a tiny DenseNet's train step: 18 s -> 5 s on 2 cores). It changes only
how the CPU code for XLA's fusions is optimised, not the HLO passes, the buffer assignment or
the library calls (convolutions, oneDNN, dots), so what the tests check is what runs without
it; every comparison a test makes is between programs compiled the same way. Timed runs
(benchmarks/) never use it.
"""

FAST_COMPILE = '--xla_backend_optimization_level=0'


def with_devices(count: int) -> str:
  """XLA_FLAGS for a process with `count` host CPU devices, compiled as the tests compile."""
  return f'--xla_force_host_platform_device_count={count} {FAST_COMPILE}'
