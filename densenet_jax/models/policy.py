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
* Whether a CPU step uses oneDNN's convolutions and the fused bottleneck call is decided by
  densenet_jax/native/onednn.py (`available`, `usable`, `bottleneck_usable`), at lowering.
"""


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
