"""Array operations shared by the standard, memory-efficient and scanned layers."""

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def pointwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A 1x1 convolution as a matrix product over channels.

  Args:
    x: [batch, height, width, in].
    kernel: [1, 1, in, out], a 1x1 convolution kernel.

  Returns:
    [batch, height, width, out].
  """
  return lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))


def _conv_same(x, kernel):
  pad = kernel.shape[0] // 2
  return lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)),
                                  dimension_numbers=_NHWC)


@jax.custom_vjp
def conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 'same' convolution, NHWC input and HWIO kernel of odd size.

  Its gradients are written out as two forward convolutions in the canonical NHWC/HWIO form,
  with the transposes explicit. The values are those of autodiff; the reason is XLA:CPU: inside a
  loop body (a `lax.scan`) it leaves autodiff's transposed convolutions in their non-canonical
  form and runs them with a generic emitter, 10x (input gradient) to 40x (kernel gradient)
  slower than the same convolutions outside a loop. Written out like this they run at full
  speed inside and outside loops.
  """
  return _conv_same(x, kernel)


def _conv_same_fwd(x, kernel):
  return _conv_same(x, kernel), (x, kernel)


def _conv_same_bwd(residuals, g):
  x, kernel = residuals
  # d/dx: correlate g with the kernel flipped in space, input and output channels swapped.
  dx = _conv_same(g, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))
  # d/dkernel: a convolution over the batch: channels of x as the batch, the batch as features,
  # g as a [height, width, batch, out] kernel; the result is [in, kh, kw, out].
  pad = kernel.shape[0] // 2
  dk = lax.conv_general_dilated(
      x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1), ((pad, pad), (pad, pad)),
      dimension_numbers=_NHWC)
  return dx.astype(x.dtype), dk.transpose(1, 2, 0, 3).astype(kernel.dtype)


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)
