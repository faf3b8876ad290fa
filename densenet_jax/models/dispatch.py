"""Which implementation computes each dense block: the one dispatch, and its description.

Every implementation computes the layer dense_layer.py declares; they differ in what they
store, recompute and fuse, and in which layers they were written for:

* `unrolled`: one `DenseLayer` per layer (`scan_segments=0`), any layer; with
  `memory_efficient` its first unit is recomputed in the backward pass (efficient.py).
* `scanned, specialised`: scanned.py, written for the paper's layer only (`scanned.supports`):
  carried statistics, a hand-written backward pass of the first unit, chunks, and on a CPU with
  oneDNN the fused call for ReLU bottleneck layers (`policy.fused_bottleneck`).
* `scanned, generic`: generic_scan.py, any layer whose first unit reads its input channel by
  channel, differentiated by `jax.vjp` of the definition; the whole layer is recomputed in the
  backward pass, in either mode.

A scanned block whose layer no scanned path supports is unrolled. `specialised=False` sends
the paper's layer to the generic path too (to measure what an unusual layer costs).
"""

from typing import Tuple

from densenet_jax.models import dense_layer
from densenet_jax.models import generic_scan
from densenet_jax.models import layer
from densenet_jax.models import policy
from densenet_jax.models import scanned

UNROLLED = 'unrolled'
SPECIALISED = 'scanned, specialised'
GENERIC = 'scanned, generic'


def block_path(spec: layer.Spec, *, scan_segments: int, specialised: bool) -> str:
  """The implementation of a dense block of layers defined by `spec`."""
  units = dense_layer.structure(spec)
  if scan_segments:
    if specialised and scanned.supports(spec, units):
      return SPECIALISED
    if generic_scan.supports(units):
      return GENERIC
  return UNROLLED


def describe(model, platform: str) -> Tuple[str, ...]:
  """One line per dense block of a DenseNet `model`: which implementation computes it when the
  step is lowered for `platform` ('cpu', 'gpu', 'tpu'), and why (the trainer logs these and
  `python -m densenet_jax.tools.summary` prints them)."""
  spec = model.layer_spec
  units = dense_layer.structure(spec)
  path = block_path(spec, scan_segments=model.scan_segments, specialised=model.specialised)
  lines = []
  for block in range(len(model.block_sizes)):
    if path == UNROLLED:
      why = []
      if model.scan_segments:
        why.append(f'no scanned path reads a buffer into {type(units[0]).__name__}')
      if model.memory_efficient:
        why.append('first unit recomputed in the backward pass')
      line = path + (f' ({"; ".join(why)})' if why else '')
    elif path == SPECIALISED:
      fused = platform == 'cpu' and policy.fused_bottleneck_for(spec, spec.dtype)
      how = ('first unit fused by oneDNN' if fused else
             f'first unit in chunks of {model.chunk_for(platform, block)} channels')
      mode = 'recomputed' if model.memory_efficient else '1x1 outputs kept'
      line = f'{path} ({how}; {mode})'
    else:
      unknown = [type(u).__name__ for u in units if u not in scanned.computes(spec)]
      why = (f'the specialised path does not compute {", ".join(unknown)}' if unknown else
             'specialised=False')
      line = f'{path} ({why}; whole layer recomputed)'
    lines.append(f'block{block + 1}: {line}')
  return tuple(lines)
