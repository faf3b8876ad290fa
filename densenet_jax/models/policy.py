"""The execution policy: how a DenseNet computes on each platform, chosen in one place.

What is decided here changes how the network is computed, never what it computes: every
choice gives the same outputs, gradients and BatchNorm updates to float32 rounding
(tests/test_models.py). The reasons and the measurements behind each choice are in
docs/design.md ("Segments and chunks") and docs/performance.md.

* `scan_chunk`: input channels per step of a scanned layer's first convolution and of a
  memory-efficient transition. A layer works on whole chunks (the channels past its width
  masked to zero), so larger chunks mean fewer, larger products and more padded work. CPU: 48
  channels in the first block where that pads the dense layers' inputs at least 5% less than 64,
  else 64, doubled in each later block in the standard mode. GPU and TPU: one chunk as wide as
  the widest input, or with memory_efficient 128 in the first block and 4x as many in each later
  one (the same backward workspace in every block).
  The model hands both the CPU's and the accelerators' chunks (`chunks`) to its blocks, which
  take the one of the platform the step is lowered for (`lax.platform_dependent`), not of
  `jax.default_backend()`: a step lowered for the CPU on a GPU host gets the CPU's chunks.
* `fused_bottleneck`: whether a scanned layer's first unit is oneDNN's fused call. Only the
  specialised scanned path (scanned.py, the paper's layer only) asks, and the call implements
  part of even that layer's space: a 1x1 bottleneck convolution after BatchNorm and ReLU, on a
  float32 or bfloat16 buffer, computed in float32. Other layers of that path take the chunked
  path on every platform; which path a block takes is decided in dispatch.py.
* Whether a CPU convolution is oneDNN's is decided by densenet_jax/native/onednn.py
  (`available`, `usable`, and `dtypes`: float32, and bfloat16 where the CPU has bfloat16
  instructions), at lowering.
"""

import dataclasses

from densenet_jax.native import onednn


@dataclasses.dataclass(frozen=True)
class Chunks:
  """A block's chunk, in input channels, for each kind of platform (hashable)."""

  cpu: int
  other: int   # GPUs and TPUs

  def on(self, platform: str) -> int:
    """The chunk for `platform`, as `lax.platform_dependent` names it ('cpu' or 'default')."""
    return self.cpu if platform == 'cpu' else self.other

  def at_most(self, width: int) -> 'Chunks':
    return Chunks(min(self.cpu, width), min(self.other, width))


def chunks(model, block: int) -> Chunks:
  """The chunks of dense block `block` of `model` and of the transition after it."""
  return Chunks(scan_chunk(model, 'cpu', block), scan_chunk(model, 'gpu', block))


def fused_bottleneck_for(spec, dtype) -> bool:
  """Whether the fused call computes the first unit of a layer defined by `spec` on a buffer of
  `dtype` on a CPU with oneDNN (`fused_bottleneck`, wherever the batch's split is known)."""
  return (spec.bottleneck and spec.activation == 'relu'
          and onednn.bottleneck_usable_dtype(dtype))


def fused_bottleneck(spec, x) -> bool:
  """Whether the fused call (native/bottleneck.cc) computes the first unit of a layer defined
  by `spec` (a `layer.Spec`) on the buffer x: it computes relu(x * a + b) then a 1x1
  convolution, in float32 from a float32 or bfloat16 buffer, and only on a CPU with oneDNN
  (checked at lowering: `onednn.bottleneck_usable`)."""
  return fused_bottleneck_for(spec, x.dtype) and onednn.bottleneck_usable(x)


def scan_chunk(model, platform: str, block: int = 0) -> int:
  """The chunk of dense block `block` (0-based) of `model` on `platform` ('cpu', 'gpu', 'tpu');
  `model.scan_chunk` where set."""
  if model.scan_chunk is not None:
    return model.scan_chunk
  if platform != 'cpu':
    if model.memory_efficient:
      return 128 * 4 ** block
    return max(c + n * model.growth_rate
               for c, n in zip(model.block_inputs, model.block_sizes))
  growth = 1 if model.memory_efficient else 2
  padded = {48: 0.0, 64: 0.0}
  for i, (channels, num_layers) in enumerate(zip(model.block_inputs, model.block_sizes)):
    area = 0.25 ** i   # each transition halves height and width
    for j in range(num_layers):
      width = channels + j * model.growth_rate
      for first in padded:
        chunk = first * growth ** i
        padded[first] += area * -(-width // chunk) * chunk
  return (48 if padded[48] <= 0.95 * padded[64] else 64) * growth ** block
