"""The oneDNN handlers (densenet_jax/native) check every operand, result and attribute before
they touch memory: each FFI target called directly with ones that do not fit fails as an XLA
error naming itself and the problem. `use_onednn` is conftest.py's fixture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


# Every FFI target, called directly with operands, results or attributes that do not fit:
# (target, what differs from the valid call below, what the error must say after the target's
# name). Float operands and results are given by shape; width and offset by value (a shape:
# a non-scalar int32 array).
_CONV = dict(x=(2, 4, 4, 3), kernel=(3, 3, 3, 4), y=(2, 4, 4, 4), acc=(2, 4, 4, 4),
             g=(2, 4, 4, 4), dx=(2, 4, 4, 3), dkernel=(3, 3, 3, 4), stride=1, padding=1)
_BOTTLENECK = dict(x=(2, 4, 4, 8), a=(8,), b=(8,), kernels=(1, 1, 20, 4), width=8, offset=0,
                   y=(2, 4, 4, 4), dy=(2, 4, 4, 4), dx_in=(2, 4, 4, 8), dx=(2, 4, 4, 8),
                   dkernels_in=(1, 1, 20, 4), dkernels=(1, 1, 20, 4), da=(8,), db=(8,))
_SIGNATURES = {  # operands, results, attributes
    'conv_forward': ('x kernel', 'y', 'stride padding'),
    'conv_forward_accumulate': ('x kernel acc', 'y', ''),
    'conv_backward_data': ('g kernel', 'dx', 'stride padding'),
    'conv_backward_weights': ('x g', 'dkernel', 'stride padding'),
    'bottleneck_forward': ('x a b kernels width offset', 'y', ''),
    'bottleneck_backward': ('x a b kernels width offset dy dx_in dkernels_in',
                            'dx dkernels da db', ''),
}
_BAD_CALLS = [
    ('conv_forward', dict(x=(4, 4, 3)), r'x shape \(got \[4, 4, 3\], expected rank 4'),
    ('conv_forward', dict(x=(2, 4, 4, 0), kernel=(3, 3, 0, 4)), r'x shape .*no empty dimension'),
    ('conv_forward', dict(y=(2,)), r'y shape \(got \[2\], expected rank 4'),
    ('conv_forward', dict(kernel=(2, 2, 3, 4)), r'kernel not square and odd-sized \(got \[2, 2'),
    ('conv_forward', dict(kernel=(3, 1, 3, 4)), r'kernel not square and odd-sized'),
    ('conv_forward', dict(stride=0), r'stride \(got 0, expected at least 1\)'),
    ('conv_forward', dict(padding=-1), r'padding \(got -1, expected \[0, 2\]\)'),
    ('conv_forward', dict(padding=2**62), r'padding \(got 4611686018427387904, expected'),
    ('conv_forward', dict(kernel=(3, 3, 5, 4)), r'kernel input channels \(got 5, expected 3'),
    ('conv_forward', dict(x=(1, 2, 2, 3), kernel=(7, 7, 3, 4), padding=0, y=(1, 1, 1, 4)),
     r'kernel larger than the padded x \(got 7, expected at most \[2, 2\]\)'),
    ('conv_forward', dict(y=(2, 5, 5, 4)), r'y shape \(got \[2, 5, 5, 4\], expected \[2, 4, 4, 4'),
    ('conv_forward', dict(stride=2), r'y shape \(got \[2, 4, 4, 4\], expected \[2, 2, 2, 4\]'),
    ('conv_forward_accumulate', dict(acc=(2, 4, 4, 5), y=(2, 4, 4, 5)),
     r'acc shape \(got \[2, 4, 4, 5\], expected \[2, 4, 4, 4\]'),
    ('conv_forward_accumulate', dict(y=(2, 4, 4, 3)),  # not aliased: acc is copied into y
     r'y shape \(got \[2, 4, 4, 3\], expected \[2, 4, 4, 4\]'),
    ('conv_forward_accumulate', dict(kernel=(2, 2, 3, 4)), r'kernel not square and odd-sized'),
    ('conv_backward_data', dict(g=(2, 3, 3, 4)), r'g shape \(got \[2, 3, 3, 4\], expected \[2, 4'),
    ('conv_backward_data', dict(dx=(2, 4, 4, 5)), r'kernel input channels \(got 3, expected 5'),
    ('conv_backward_data', dict(dx=(2, 4, 4)), r'dx shape \(got \[2, 4, 4\]'),
    ('conv_backward_data', dict(stride=-1), r'stride \(got -1'),
    ('conv_backward_weights', dict(dkernel=(3, 3, 5, 4)), r'dkernel input channels \(got 5'),
    ('conv_backward_weights', dict(dkernel=(3, 3, 3, 4, 1)), r'dkernel shape .*expected rank 4'),
    ('conv_backward_weights', dict(g=(3, 4, 4, 4)), r'g shape \(got \[3, 4, 4, 4\], expected \[2'),
    ('conv_backward_weights', dict(padding=3), r'padding \(got 3, expected \[0, 2\]\)'),
    ('bottleneck_forward', dict(width=9), r'width \(got 9, expected \[1, 8\]\)'),
    ('bottleneck_forward', dict(width=0), r'width \(got 0, expected \[1, 8\]\)'),
    ('bottleneck_forward', dict(offset=-1), r'offset \(got -1, expected \[0, 19\]\)'),
    ('bottleneck_forward', dict(offset=15), r'offset \+ width \(got 23, expected \[1, 20\]\)'),
    # Past int32's range when added to the width: must not wrap round to a small sum.
    ('bottleneck_forward', dict(offset=2**31 - 4), r'offset \(got 2147483644, expected'),
    ('bottleneck_forward', dict(width=(2,)), r'width shape \(got \[2\], expected rank 0'),
    ('bottleneck_forward', dict(offset=(0,)), r'offset shape \(got \[0\], expected rank 0'),
    ('bottleneck_forward', dict(a=(7,)), r'a shape \(got \[7\], expected \[8\]\)'),
    ('bottleneck_forward', dict(b=(1, 8)), r'b shape \(got \[1, 8\], expected rank 1'),
    ('bottleneck_forward', dict(kernels=(3, 3, 20, 4)), r'kernels shape .*expected \[1, 1, 20, 4'),
    ('bottleneck_forward', dict(y=(2, 4, 4, 4000)), r'y shape \(got \[2, 4, 4, 4000\], expected'),
    ('bottleneck_forward', dict(y=(2, 4, 3, 4)), r'y shape \(got \[2, 4, 3, 4\]'),
    ('bottleneck_backward', dict(offset=13), r'offset \+ width \(got 21, expected \[1, 20\]'),
    ('bottleneck_backward', dict(dy=(2, 4, 4, 5)), r'dy shape \(got \[2, 4, 4, 5\]'),
    # Not aliased: dx_in and dkernels_in are copied into the results.
    ('bottleneck_backward', dict(dx_in=(2, 4, 4, 7)), r'dx_in shape \(got \[2, 4, 4, 7\]'),
    ('bottleneck_backward', dict(dx=(2, 4, 4, 9)), r'dx shape \(got \[2, 4, 4, 9\]'),
    ('bottleneck_backward', dict(dkernels_in=(1, 1, 21, 4)), r'dkernels_in shape \(got \[1, 1, 21'),
    ('bottleneck_backward', dict(dkernels=(1, 1, 19, 4)), r'dkernels shape \(got \[1, 1, 19'),
    ('bottleneck_backward', dict(da=(7,)), r'da shape \(got \[7\], expected \[8\]\)'),
    ('bottleneck_backward', dict(db=(8, 1)), r'db shape \(got \[8, 1\], expected \[8\]\)'),
    # Element types (NAME_dtype): checked before any size is computed from them.
    ('conv_forward', dict(x_dtype='int32', kernel_dtype='int32', y_dtype='int32'),
     r'x element type \(got s32, expected f32 or bf16\)'),
    ('conv_forward', dict(x_dtype='float16', kernel_dtype='float16', y_dtype='float16'),
     r'x element type \(got f16, expected f32 or bf16\)'),
    ('conv_forward', dict(kernel_dtype='bfloat16'),
     r"kernel element type \(got bf16, expected f32, x's\)"),
    ('conv_forward', dict(x_dtype='bfloat16', kernel_dtype='bfloat16'),
     r"y element type \(got f32, expected bf16, x's\)"),
    ('conv_forward', dict(x_dtype='bfloat16', kernel_dtype='bfloat16', y_dtype='bfloat16',
                          y=(2, 5, 5, 4)), r'y shape \(got \[2, 5, 5, 4\], expected \[2, 4, 4, 4'),
    ('conv_forward_accumulate', dict(x_dtype='bfloat16', kernel_dtype='bfloat16',
                                     y_dtype='bfloat16'),
     r"acc element type \(got f32, expected bf16, x's\)"),
    ('conv_backward_data', dict(g_dtype='bfloat16', kernel_dtype='bfloat16'),
     r"dx element type \(got f32, expected bf16, g's\)"),
    ('conv_backward_data', dict(g_dtype='bfloat16', kernel_dtype='bfloat16', dx_dtype='bfloat16',
                                dx=(2, 4, 4, 5)), r'kernel input channels \(got 3, expected 5'),
    ('conv_backward_weights', dict(x_dtype='bfloat16'),
     r"g element type \(got f32, expected bf16, x's\)"),
    ('conv_backward_weights', dict(x_dtype='bfloat16', g_dtype='bfloat16',
                                   dkernel_dtype='bfloat16'),
     r'dkernel element type \(got bf16, expected f32, for every x\)'),
    ('conv_backward_weights', dict(x_dtype='bfloat16', g_dtype='bfloat16', g=(3, 4, 4, 4)),
     r'g shape \(got \[3, 4, 4, 4\], expected \[2'),
    ('bottleneck_forward', dict(x_dtype='float16'),
     r"x element type \(got f16, expected f32 or u16, u16 holding bfloat16's bits\)"),
    ('bottleneck_forward', dict(x_dtype='uint16', offset=15),
     r'offset \+ width \(got 23, expected \[1, 20\]\)'),
    ('bottleneck_backward', dict(x_dtype='uint16', dx_in=(2, 4, 4, 7)),
     r'dx_in shape \(got \[2, 4, 4, 7\]'),
]


def _case_id(target, change):
  """'conv_forward-x=4,4,3-padding=0'."""
  def value(v):
    return ','.join(map(str, v)) if isinstance(v, tuple) else str(v)
  return '-'.join([target] + [f'{name}={value(v)}' for name, v in change.items()])


@pytest.mark.parametrize('target,change,message', _BAD_CALLS,
                         ids=[_case_id(target, change) for target, change, _ in _BAD_CALLS])
def test_bad_operands_are_errors_not_crashes(use_onednn, target, change, message):
  """Each handler checks every operand, result and attribute before touching memory, and fails
  as an XLA error naming itself and the problem (not a crash, nor a read past a buffer)."""
  operands, results, attributes = (names.split() for names in _SIGNATURES[target])
  values = {**(_BOTTLENECK if target.startswith('bottleneck') else _CONV), **change}

  def dtype(name):
    return jnp.int32 if name in ('width', 'offset') else values.get(f'{name}_dtype', 'float32')

  def operand(name):
    if name in ('width', 'offset') and isinstance(values[name], int):
      return jnp.int32(values[name])
    return jnp.zeros(values[name], dtype(name))

  call = jax.ffi.ffi_call(f'densenet_onednn_{target}',
                          [jax.ShapeDtypeStruct(values[name], dtype(name)) for name in results])
  with pytest.raises(jax.errors.JaxRuntimeError, match=f'densenet_onednn_{target}: {message}'):
    jax.block_until_ready(call(*map(operand, operands),
                               **{name: np.int64(values[name]) for name in attributes}))
