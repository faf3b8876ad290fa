"""oneDNN convolutions for XLA:CPU, built on first use and called as XLA FFI custom calls.

Why: on an AVX-512 CPU, XLA's convolutions, and above all their gradients, run well below the
machine's arithmetic rate, where oneDNN's kernels come near its peak (docs/performance.md has
the measurements); PyTorch's CPU convolutions are oneDNN's too. `onednn_conv.cc` wraps
oneDNN's forward, input-gradient and kernel-gradient convolutions (any stride, symmetric zero
padding) for NHWC activations and HWIO kernels, the layouts our models already use.
`bottleneck.cc` fuses a scanned dense layer's first BatchNorm-ReLU into its 1x1 convolution
over exactly the channels the layer reads (see there and densenet_jax/models/scanned_layer.py).

Element types, declared here and nowhere else (`dtypes`, `bottleneck_usable`): the
convolutions take float32, and bfloat16 where the CPU has bfloat16 instructions (AVX512_BF16,
AMX or AVX2-VNNI-2) and oneDNN builds its own kernels for them; elsewhere oneDNN would emulate
bfloat16 (not measured), and bfloat16 convolutions stay XLA's. A bfloat16 convolution's kernel
gradient is float32, accumulated so by oneDNN. The fused call reads a float32 or bfloat16
buffer and computes in float32 on any CPU.

The library is compiled on first use and cached (densenet_jax/native/build.py); where it
cannot be built, or on a GPU or TPU, `available()` is False, the reason is logged once, and the
models use XLA's own convolutions: the values agree to float32 rounding (tests/test_onednn.py).
`DENSENET_JAX_ONEDNN=0` turns it off.

Several devices: XLA cannot split a custom call's work over the devices, so each call is split
by the batch over the mesh being traced under (densenet_jax/native/shards.py). A step traced
over several devices with no mesh set (sharded inputs alone, or the legacy `with mesh:`) does
not say how its batch is split: there `usable` and `bottleneck_usable` decline, XLA's
convolutions run, and the reason is logged once. Trace under `jax.set_mesh(mesh)` (the trainer
does, train_lib.on_mesh) to use oneDNN there. These two functions, asked per call as a step is
traced, are the only gate: every oneDNN call in the models goes through one of them.
"""

import ctypes
import os
import threading
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from densenet_jax.native import build
from densenet_jax.native import shards

_TARGETS = {
    'conv_forward': 'DensenetOnednnConvForward',
    'conv_forward_accumulate': 'DensenetOnednnConvForwardAccumulate',
    'conv_backward_data': 'DensenetOnednnConvBackwardData',
    'conv_backward_weights': 'DensenetOnednnConvBackwardWeights',
    'bottleneck_forward': 'DensenetBottleneckForward',
    'bottleneck_backward': 'DensenetBottleneckBackward',
}
_lock = threading.Lock()
# `library` keeps the loaded library (and so its handlers) alive.
_state = {'enabled': os.environ.get('DENSENET_JAX_ONEDNN', '1') != '0', 'loaded': None,
          'reason': None, 'library': None, 'bottleneck': True, 'bfloat16': None}


def _load():
  path = build.build()
  library = ctypes.cdll.LoadLibrary(str(path))
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(f'densenet_onednn_{name}',
                                jax.ffi.pycapsule(getattr(library, symbol)), platform='cpu')
  return library


def available() -> bool:
  """Whether oneDNN convolutions can be used here: enabled, on a CPU backend, and built.

  The first call on a CPU backend builds and loads the library (seconds, once per machine);
  a failure is logged once and leaves XLA's convolutions in use.
  """
  if not _state['enabled'] or jax.default_backend() != 'cpu':
    return False
  with _lock:
    if _state['loaded'] is None:
      try:
        _state['library'] = _load()
        _state['loaded'] = True
      except (OSError, RuntimeError, AttributeError) as e:
        _state['loaded'] = False
        _state['reason'] = str(e)
        logging.warning('oneDNN convolutions unavailable, using XLA\'s: %s', e)
  return _state['loaded']


def unavailable_reason() -> str:
  """Why `available()` is False ('' while it is True or has not been asked)."""
  if not _state['enabled']:
    return 'turned off (DENSENET_JAX_ONEDNN=0 or set_enabled)'
  if jax.default_backend() != 'cpu':
    return f'not a CPU backend ({jax.default_backend()})'
  return _state['reason'] or ''


def set_enabled(enabled: bool) -> None:
  """Turns the oneDNN path on or off for steps traced from now on (benchmarks, tests)."""
  if bool(enabled) != _state['enabled']:
    # JAX caches traced custom_vjp rules and cond branches by function: drop them, or a
    # step traced after this would reuse the other path's traces.
    jax.clear_caches()
  _state['enabled'] = bool(enabled)


def set_bottleneck_enabled(enabled: bool) -> None:
  """Turns the fused bottleneck calls (bottleneck.cc) on or off, the convolutions staying
  oneDNN's, for steps traced from now on: A/B measurements of the fusion (benchmarks/ab.py)."""
  if bool(enabled) != _state['bottleneck']:
    jax.clear_caches()   # as in set_enabled
  _state['bottleneck'] = bool(enabled)


def dtypes() -> frozenset:
  """The element types of the convolutions' activations and kernels that go through oneDNN
  here: float32, and bfloat16 where the CPU runs it natively (asked of the library once:
  `DensenetOnednnBfloat16Kernels` in onednn_conv.cc). Empty where oneDNN is not available."""
  if not available():
    return frozenset()
  if _state['bfloat16'] is None:
    _state['bfloat16'] = bool(_state['library'].DensenetOnednnBfloat16Kernels())
  return frozenset({jnp.dtype(jnp.float32)} |
                   ({jnp.dtype(jnp.bfloat16)} if _state['bfloat16'] else set()))


# The fused call widens a bfloat16 buffer to float32 as it reads it: no bfloat16 instructions.
_BOTTLENECK_DTYPES = frozenset({jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)})


def bottleneck_usable(x) -> bool:
  """Whether a scanned layer's first BN-ReLU-Conv1x1 on the buffer x should be fused, in the
  step being traced (only where the batch's split is known: `shards.partition_known`)."""
  return bottleneck_usable_dtype(x.dtype) and shards.partition_known()


def bottleneck_usable_dtype(dtype) -> bool:
  """Whether the fused call takes a buffer of `dtype` here (turned on, oneDNN available),
  wherever the batch's split is known."""
  return _state['bottleneck'] and jnp.dtype(dtype) in _BOTTLENECK_DTYPES and available()


def usable(*arrays) -> bool:
  """Whether a convolution of these arrays (activations, kernel, output gradient: all of one
  element type) should go through oneDNN, in the step being traced (only where the batch's
  split is known: `shards.partition_known`)."""
  kinds = {jnp.dtype(a.dtype) for a in arrays}
  return len(kinds) == 1 and kinds <= dtypes() and shards.partition_known()


def _call(name, result, *args, input_output_aliases=None, **attrs):
  return jax.ffi.ffi_call(f'densenet_onednn_{name}', result,
                          input_output_aliases=input_output_aliases)(*args, **attrs)


def _geometry(kernel_shape, stride, padding):
  size = kernel_shape[0]
  padding = size // 2 if padding is None else padding
  return dict(stride=np.int64(stride), padding=np.int64(padding))


def _out_size(size, kernel_size, stride, padding):
  return (size + 2 * padding - kernel_size) // stride + 1


def conv_forward(x: jax.Array, kernel: jax.Array, stride: int = 1,
                 padding: Optional[int] = None) -> jax.Array:
  """Convolution of x [N, H, W, in] with kernel [k, k, in, out], k odd, zero-padded by
  `padding` on every side (default k // 2: 'same' at stride 1)."""
  attrs = _geometry(kernel.shape, stride, padding)

  def call(x, kernel):
    out = [_out_size(d, kernel.shape[0], stride, int(attrs['padding'])) for d in x.shape[1:3]]
    return (_call('conv_forward',
                  jax.ShapeDtypeStruct((x.shape[0], *out, kernel.shape[3]), x.dtype), x, kernel,
                  **attrs),)

  return shards.split(call, x, kernel, batched=(True, False), outputs=(shards.BATCH,))[0]


def conv_forward_accumulate(acc: jax.Array, x: jax.Array, kernel: jax.Array) -> jax.Array:
  """acc + conv_forward(x, kernel) ('same', stride 1), written into acc's buffer in the
  convolution's own pass."""
  def call(acc, x, kernel):
    return (_call('conv_forward_accumulate', jax.ShapeDtypeStruct(acc.shape, acc.dtype), x,
                  kernel, acc, input_output_aliases={2: 0}),)

  return shards.split(call, acc, x, kernel, batched=(True, True, False),
                      outputs=(shards.BATCH,))[0]


def conv_backward_data(g: jax.Array, kernel: jax.Array, x_shape=None, stride: int = 1,
                       padding: Optional[int] = None) -> jax.Array:
  """Gradient of `conv_forward` with respect to x (of shape x_shape; g's at stride 1)."""
  x_shape = g.shape[:3] + kernel.shape[2:3] if x_shape is None else tuple(x_shape)

  def call(g, kernel):
    shape = (g.shape[0],) + x_shape[1:]   # g's part of the batch
    return (_call('conv_backward_data', jax.ShapeDtypeStruct(shape, g.dtype), g, kernel,
                  **_geometry(kernel.shape, stride, padding)),)

  return shards.split(call, g, kernel, batched=(True, False), outputs=(shards.BATCH,))[0]


def conv_backward_weights(x: jax.Array, g: jax.Array, kernel_shape, stride: int = 1,
                          padding: Optional[int] = None) -> jax.Array:
  """Gradient of `conv_forward` with respect to the kernel, for output gradient g: float32
  for float32 and bfloat16 x and g alike (oneDNN sums it in float32)."""
  def call(x, g):
    return (_call('conv_backward_weights', jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32),
                  x, g, **_geometry(kernel_shape, stride, padding)),)

  return shards.split(call, x, g, batched=(True, True), outputs=(shards.SUM,))[0]


def _scalar(v):
  return jnp.asarray(v, jnp.int32).reshape(())


def _bits(x):
  """A bfloat16 buffer as its bits (uint16), which bottleneck.cc reads as bfloat16. A scanned
  block moves its buffer as bits (models/ops.py); a bfloat16 operand would make XLA convert
  them into a copy of the buffer for the call, where this conversion back folds away."""
  return lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x


def bottleneck_forward(x: jax.Array, a: jax.Array, b: jax.Array, kernels: jax.Array, width,
                       offset) -> jax.Array:
  """relu(x[..., :width] * a[:width] + b[:width]) convolved with the 1x1 kernel
  kernels[:, :, offset:offset + width] (bottleneck.cc).

  Args:
    x: a block's feature buffer [N, H, W, C], float32 or bfloat16 (computed in float32).
    a, b: [C] per-channel BatchNorm factors (BatchNorm-ReLU is relu(x * a + b)).
    kernels: [1, 1, rows, out], a block's first-convolution kernels laid end to end.
    width, offset: int32 scalars, traced or not: how many channels the layer reads, and the
      row of `kernels` where its kernel starts.

  Returns:
    [N, H, W, out], float32.
  """
  def call(x, a, b, kernels, width, offset):
    out = jax.ShapeDtypeStruct(x.shape[:3] + kernels.shape[3:], jnp.float32)
    return (_call('bottleneck_forward', out, x, a, b, kernels, width, offset),)

  return shards.split(call, _bits(x), a, b, kernels, _scalar(width), _scalar(offset),
                      batched=(True,) + (False,) * 5, outputs=(shards.BATCH,))[0]


def _bottleneck_backward(x, a, b, kernels, width, offset, dy, dx, dkernels):
  results = (jax.ShapeDtypeStruct(dx.shape, jnp.float32),
             jax.ShapeDtypeStruct(dkernels.shape, jnp.float32),
             jax.ShapeDtypeStruct(a.shape, jnp.float32),
             jax.ShapeDtypeStruct(b.shape, jnp.float32))
  return _call('bottleneck_backward', results, x, a, b, kernels, width, offset, dy, dx,
               dkernels, input_output_aliases={7: 0, 8: 1})


def bottleneck_backward(x, a, b, kernels, width, offset, dy, dx, dkernels):
  """Gradients of `bottleneck_forward` for output gradient dy: returns (dx + the gradient of x,
  dkernels + the gradient of kernels, gradient of a, gradient of b). dx and dkernels are
  updated in place where XLA can give their buffers to the call (a reverse scan's carries).

  With the batch split over devices, each device's kernel gradient is summed over the devices;
  only the rows the layer reads are: the call gets the window of `kernels` that holds them (as
  many rows as x has channels) and a zero gradient for it, and the summed window is added to
  `dkernels`. Summing all of `dkernels` would move a block's every kernel once per layer.
  """
  x, width, offset = _bits(x), _scalar(width), _scalar(offset)
  batched = (True, False, False, False, False, False, True, True, False)
  outputs = (shards.BATCH, shards.SUM, shards.SUM, shards.SUM)
  if shards.batch_axes(x, dy, dx) is None:
    return _bottleneck_backward(x, a, b, kernels, width, offset, dy, dx, dkernels)
  rows = min(x.shape[-1], kernels.shape[2])
  start = jnp.clip(offset, 0, kernels.shape[2] - rows)
  window = lambda k: lax.dynamic_slice_in_dim(k, start, rows, 2)
  dx, d_window, da, db = shards.split(
      _bottleneck_backward, x, a, b, window(kernels), width, offset - start, dy, dx,
      jnp.zeros(window(dkernels).shape, jnp.float32), batched=batched, outputs=outputs)
  dkernels = lax.dynamic_update_slice_in_dim(dkernels, window(dkernels) + d_window, start, 2)
  return dx, dkernels, da, db
