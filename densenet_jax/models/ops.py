"""Array operations shared by the standard, memory-efficient and scanned layers.

The convolutions compute in their input's element type and cast the kernel to it; the kernel's
gradient comes back in the kernel's own type. A bfloat16 model passes its float32 kernels
uncast, so that their gradients are float32 where oneDNN sums them so (native/onednn.py).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from densenet_jax.native import onednn

_NHWC = ('NHWC', 'HWIO', 'NHWC')


@jax.custom_vjp
def pointwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A 1x1 convolution: oneDNN's on the CPU, else a matrix product over channels.

  On a CPU with oneDNN built (densenet_jax/native/onednn.py) the forward pass and both
  gradients are oneDNN's convolutions, as for `conv_same`. Otherwise the gradients are written
  out as two plain matrix products: the input gradient against a materialised transposed
  kernel, the kernel gradient over the flattened positions. Autodiff's versions contract the
  4-D input over three axes, which XLA:CPU lowers with a transposed copy of the whole input per
  layer (docs/design.md, "Gradients written out for XLA:CPU").

  Args:
    x: [batch, height, width, in].
    kernel: [1, 1, in, out], a 1x1 convolution kernel.

  Returns:
    [batch, height, width, out].
  """
  return _pointwise_any(x, kernel)


def _pointwise_any(x, kernel):
  # Resolved when the step is lowered for its platform: the compiler sees one branch only.
  return lax.platform_dependent(x, kernel, cpu=_pointwise_cpu, default=_pointwise_xla)


def _pointwise_xla(x, kernel):
  return _pointwise(x, kernel[0, 0].astype(x.dtype))


def _pointwise_cpu(x, kernel):
  kernel = kernel.astype(x.dtype)
  if x.ndim == 4 and onednn.usable(x, kernel):
    return onednn.conv_forward(x, kernel)
  return _pointwise_xla(x, kernel)


def _pointwise(x, matrix):
  return lax.dot_general(x, matrix, (((x.ndim - 1,), (0,)), ((), ())))


def _pointwise_fwd(x, kernel):
  return _pointwise_any(x, kernel), (x, kernel)


def _kernel_as_given(bwd):
  """The backward rule `bwd` for a kernel of any float type: it computes with the kernel cast
  to x's type and returns the kernel's gradient in the kernel's type (on every platform
  alike, as `lax.platform_dependent`'s branches must)."""
  def rule(x, kernel, g, **geometry):
    dx, dk = bwd(x, kernel.astype(x.dtype), g, **geometry)
    return dx, dk.astype(kernel.dtype)
  return rule


def _pointwise_bwd(residuals, g):
  x, kernel = residuals
  return lax.platform_dependent(x, kernel, g, cpu=_kernel_as_given(_pointwise_bwd_cpu),
                                default=_kernel_as_given(_pointwise_bwd_xla))


def _onednn_gradients(x, kernel, g, stride=1, padding=None):
  """(input gradient, kernel gradient) of a convolution of x, through oneDNN (the kernel
  gradient in float32)."""
  return (onednn.conv_backward_data(g, kernel, x.shape, stride, padding),
          onednn.conv_backward_weights(x, g, kernel.shape, stride, padding))


def _pointwise_bwd_cpu(x, kernel, g):
  if x.ndim == 4 and onednn.usable(x, kernel, g):
    return _onednn_gradients(x, kernel, g)
  return _pointwise_bwd_xla(x, kernel, g)


def _pointwise_bwd_xla(x, kernel, g):
  # The barrier keeps XLA from folding the (small) transpose back into the product.
  dx = _pointwise(g, lax.optimization_barrier(kernel[0, 0].T))
  dk = lax.dot_general(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]),
                       (((0,), (0,)), ((), ())))
  return dx.astype(x.dtype), dk[None, None]


pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


@jax.custom_vjp
def pointwise_accumulate(acc: jax.Array, x: jax.Array, kernel: jax.Array) -> jax.Array:
  """acc + pointwise(x, kernel), for summing a 1x1 convolution over chunks of its input.

  On a CPU with oneDNN, where acc and x have one element type, the convolution adds its result
  into acc's buffer as it writes it, instead of writing it and then adding it in a separate
  pass over both.
  """
  return _pointwise_accumulate_any(acc, x, kernel)


def _pointwise_accumulate_any(acc, x, kernel):
  return lax.platform_dependent(acc, x, kernel, cpu=_pointwise_accumulate_cpu,
                                default=_pointwise_accumulate_xla)


def _pointwise_accumulate_xla(acc, x, kernel):
  return acc + _pointwise_any(x, kernel).astype(acc.dtype)


def _pointwise_accumulate_cpu(acc, x, kernel):
  kernel = kernel.astype(x.dtype)
  if x.ndim == 4 and onednn.usable(acc, x, kernel):
    return onednn.conv_forward_accumulate(acc, x, kernel)
  return _pointwise_accumulate_xla(acc, x, kernel)


def _pointwise_accumulate_fwd(acc, x, kernel):
  return _pointwise_accumulate_any(acc, x, kernel), (x, kernel)


def _pointwise_accumulate_bwd(residuals, g):
  x, kernel = residuals
  dx, dk = _pointwise_bwd(residuals, g.astype(x.dtype))
  return g, dx, dk


pointwise_accumulate.defvjp(_pointwise_accumulate_fwd, _pointwise_accumulate_bwd)


def chunk_start(c, chunk: int, width: int):
  """First channel of chunk c when a `width`-channel axis is read `chunk` channels at a time.

  The last chunk is moved back to end at the axis's end rather than running past it, so it may
  overlap the chunk before; `chunk_is_new` tells which of its channels are its own.
  """
  return jnp.minimum(c * chunk, width - chunk)


def chunk_is_new(c, chunk: int, width: int):
  """[chunk] bool: which channels of chunk c no earlier chunk has covered."""
  return chunk_start(c, chunk, width) + jnp.arange(chunk) >= c * chunk


def num_chunks(width, chunk: int):
  """Chunks of `chunk` channels that cover `width` channels (width may be traced)."""
  return (width + chunk - 1) // chunk


def zero_after(g: jax.Array) -> jax.Array:
  """A float32 zero that XLA must compute from `g`: 0 * g's first element, which it may not fold
  to a constant (0 * NaN is NaN; a NaN g means training has already diverged).

  Custom backward passes use it to tie work to the cotangent: values built from it, a
  recomputation's inputs or a zero gradient, cannot be merged into the forward pass or
  scheduled before the backward pass starts (where a constant array would stay allocated
  through the whole forward pass).
  """
  return 0.0 * g.ravel()[0].astype(jnp.float32)


# Slices and updates of 16-bit float arrays move their bits. XLA:CPU has no 16-bit float
# arithmetic and widens every operation on such an array to float32, data movement included: a
# dynamic-update-slice of a bfloat16 buffer becomes the whole buffer converted to float32, the
# update, and the whole buffer converted back, so that the update of a block's buffer inside its
# loop, in place for float32, rewrote the buffer twice per layer (docs/design.md, "The feature
# buffer"). On uint16 the same update is in place. The bits are the values, on every platform.

def bits(x: jax.Array) -> jax.Array:
  """x's elements as unsigned integers of their width where x is a 16-bit float, else x."""
  if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize == 2:
    return lax.bitcast_convert_type(x, jnp.uint16)
  return x


def from_bits(x: jax.Array, dtype) -> jax.Array:
  """The inverse of `bits`: x as `dtype` where x holds the bits of a 16-bit float, else x."""
  if x.dtype == jnp.uint16 and jnp.dtype(dtype) != jnp.uint16:
    return lax.bitcast_convert_type(x, dtype)
  return x


def update_slice(total: jax.Array, part: jax.Array, start, axis: int) -> jax.Array:
  """`lax.dynamic_update_slice_in_dim` on the bits (in place inside a loop body)."""
  part = part.astype(total.dtype)
  return from_bits(lax.dynamic_update_slice_in_dim(bits(total), bits(part), start, axis),
                   total.dtype)


def take_slice(x: jax.Array, start, size: int, axis: int) -> jax.Array:
  """`lax.dynamic_slice_in_dim` on the bits."""
  return from_bits(lax.dynamic_slice_in_dim(bits(x), start, size, axis), x.dtype)


def pad(x: jax.Array, padding, value=0.0) -> jax.Array:
  """`lax.pad(x, value, padding)` on the bits (a padded bfloat16 array is otherwise made in
  float32, and rounded to bfloat16 again by each reader). `padding`: (low, high, 0) per axis,
  low and high >= 0. Differentiable: its gradient is the cotangent's unpadded part (the bits
  themselves carry none)."""
  return _pad(x, tuple(tuple(p) for p in padding), float(value))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _pad(x, padding, value):
  value = jnp.asarray(value, x.dtype)
  return from_bits(lax.pad(bits(x), bits(value), padding), x.dtype)


def _pad_fwd(x, padding, value):
  return _pad(x, padding, value), None


def _pad_bwd(padding, value, residuals, g):
  del value, residuals
  start = [low for low, _, _ in padding]
  limit = [n - high for n, (_, high, _) in zip(g.shape, padding)]
  return (lax.slice(g, start, limit),)


_pad.defvjp(_pad_fwd, _pad_bwd)


def add_at(total: jax.Array, part: jax.Array, start, axis: int) -> jax.Array:
  """`total` with `part` added at `start` along `axis` (in place inside a loop body)."""
  axis %= total.ndim
  old = lax.dynamic_slice_in_dim(total, start, part.shape[axis], axis)
  return lax.dynamic_update_slice_in_dim(total, old + part.astype(total.dtype), start, axis)


def _conv_same(x, kernel):
  pad = kernel.shape[0] // 2
  return lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1), ((pad, pad), (pad, pad)),
                                  dimension_numbers=_NHWC)


@jax.custom_vjp
def conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 'same' convolution, NHWC input and HWIO kernel of odd size.

  On a CPU, in the element types oneDNN takes there (`onednn.dtypes`: float32, and bfloat16
  where the CPU has bfloat16 instructions), it and both its gradients are oneDNN's
  convolutions where oneDNN is built (densenet_jax/native/onednn.py): XLA:CPU's own run at a
  fraction of the cores' arithmetic rate.

  Without oneDNN the gradients are written out, with the values of autodiff; the reason is
  XLA:CPU. Inside a loop body (a `lax.scan`) it leaves autodiff's transposed convolutions in
  their non-canonical form and runs them with a generic emitter, many times slower than the
  same convolutions outside a loop. Here the input gradient is a canonical forward
  convolution, and the kernel gradient one matrix product over all positions, against the
  output gradient shifted by every kernel offset (`_shifted`).

  On every other platform the gradients are autodiff's, which GPU and TPU compilers run as
  their own gradient kernels without the 9 shifted copies of the output gradient. The figures
  are in docs/performance.md.
  """
  return _conv_same_any(x, kernel)


def _conv_same_any(x, kernel):
  return lax.platform_dependent(x, kernel, cpu=_conv_same_cpu, default=_conv_same)


def _conv_same_cpu(x, kernel):
  kernel = kernel.astype(x.dtype)
  if onednn.usable(x, kernel):
    return onednn.conv_forward(x, kernel)
  return _conv_same(x, kernel)


def _conv_same_fwd(x, kernel):
  return _conv_same_any(x, kernel), (x, kernel)


def _shifted(g, size):
  """[batch, height, width, size * size, out]: entry (n, h, w, i * size + j) is g at
  (n, h - i + size // 2, w - j + size // 2), zero outside g."""
  pad = size // 2
  n, h, w, out = g.shape
  padded = jnp.pad(g, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  return jnp.stack([lax.slice(padded, (0, 2 * pad - i, 2 * pad - j, 0),
                              (n, 2 * pad - i + h, 2 * pad - j + w, out))
                    for i in range(size) for j in range(size)], axis=3)


def _cpu_conv_same_bwd(x, kernel, g):
  """oneDNN's gradient convolutions where available, else written out for XLA:CPU."""
  if onednn.usable(x, kernel, g):
    return _onednn_gradients(x, kernel, g)
  return _written_conv_same_bwd(x, kernel, g)


def _written_conv_same_bwd(x, kernel, g):
  """The gradients as a canonical forward convolution and one matrix product (XLA:CPU)."""
  size, _, cin, cout = kernel.shape
  # d/dx: correlate g with the kernel flipped in space, input and output channels swapped.
  dx = _conv_same(g, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))
  # d/dkernel[i, j, c, o] = sum over positions p of x[p, c] * g[p - (i, j) + pad, o].
  dk = lax.dot_general(x.reshape(-1, cin), _shifted(g, size).reshape(-1, size * size * cout),
                       (((0,), (0,)), ((), ())))
  dk = dk.reshape(cin, size, size, cout).transpose(1, 2, 0, 3)
  return dx.astype(x.dtype), dk


def _autodiff_conv_same_bwd(x, kernel, g):
  """Autodiff's transposed convolutions: on a GPU, cuDNN's own gradient kernels."""
  return jax.vjp(_conv_same, x, kernel)[1](g)


def _conv_same_bwd(residuals, g):
  x, kernel = residuals
  # Resolved when the step is lowered for its platform: the compiler sees one branch only.
  return lax.platform_dependent(x, kernel, g, cpu=_kernel_as_given(_cpu_conv_same_bwd),
                                default=_kernel_as_given(_autodiff_conv_same_bwd))


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


def conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """Convolution of NHWC x with a square HWIO kernel, zero-padded by `padding` on every side.

  Stride 1 with 'same' padding is `conv_same`. Other strides (the ImageNet stem's 7x7/2) are
  oneDNN's convolution and gradients on a CPU with oneDNN (in `onednn.dtypes`), several times
  faster than XLA:CPU's there. Elsewhere they are XLA's convolution and autodiff's gradients.
  """
  if stride == 1 and kernel.shape[0] % 2 == 1 and padding == kernel.shape[0] // 2:
    return conv_same(x, kernel)
  return _strided_conv(x, kernel, stride, padding)


def _conv_xla(x, kernel, stride, padding):
  return lax.conv_general_dilated(x, kernel.astype(x.dtype), (stride, stride),
                                  ((padding, padding),) * 2, dimension_numbers=_NHWC)


def _onednn_kernel(kernel):
  return kernel.shape[0] == kernel.shape[1] and kernel.shape[0] % 2 == 1


def _strided_conv_cpu(x, kernel, stride, padding):
  kernel = kernel.astype(x.dtype)
  if _onednn_kernel(kernel) and onednn.usable(x, kernel):
    return onednn.conv_forward(x, kernel, stride, padding)
  return _conv_xla(x, kernel, stride, padding)


def _strided_conv_any(x, kernel, stride, padding):
  geometry = dict(stride=stride, padding=padding)
  return lax.platform_dependent(x, kernel, cpu=functools.partial(_strided_conv_cpu, **geometry),
                                default=functools.partial(_conv_xla, **geometry))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _strided_conv(x, kernel, stride, padding):
  return _strided_conv_any(x, kernel, stride, padding)


def _strided_conv_fwd(x, kernel, stride, padding):
  return _strided_conv_any(x, kernel, stride, padding), (x, kernel)


def _strided_conv_bwd_xla(x, kernel, g, stride, padding):
  return jax.vjp(lambda x, k: _conv_xla(x, k, stride, padding), x, kernel)[1](g)


def _strided_conv_bwd_cpu(x, kernel, g, stride, padding):
  if _onednn_kernel(kernel) and onednn.usable(x, kernel, g):
    return _onednn_gradients(x, kernel, g, stride, padding)
  return _strided_conv_bwd_xla(x, kernel, g, stride, padding)


def _strided_conv_bwd(stride, padding, residuals, g):
  x, kernel = residuals
  geometry = dict(stride=stride, padding=padding)
  return lax.platform_dependent(
      x, kernel, g,
      cpu=functools.partial(_kernel_as_given(_strided_conv_bwd_cpu), **geometry),
      default=functools.partial(_kernel_as_given(_strided_conv_bwd_xla), **geometry))


_strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)
