"""Checks shared by the model tests: one implementation trains exactly as another."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from densenet_jax.models import create_model
from densenet_jax.training import train_lib


def on_one_device(fn):
  """fn traced under a mesh of the first device, as the trainer traces its steps under its mesh:
  with the tests' 8 devices and no mesh, oneDNN's calls are not used (native/shards.py), and the
  CPU's oneDNN paths would go unchecked."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    mesh = jax.sharding.Mesh(jax.devices()[:1], ('data',))
    return train_lib.on_mesh(fn, mesh)(*args, **kwargs)
  return traced


def abstract_variables(model, image_size, batch=2):
  """The variables and an image batch of `model`, as shapes only (nothing computed)."""
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), images), images


def count(tree):
  """Number of scalars in a tree of arrays or shapes."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def assert_count_and_logits(name, image_size, params, num_classes):
  """create_model(name) has `params` parameters and maps images of `image_size` to float32
  logits [batch, num_classes], checked on shapes only."""
  model = create_model(name)
  variables, images = abstract_variables(model, image_size)
  assert count(variables['params']) == params
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  assert logits.shape == (2, num_classes) and logits.dtype == jnp.float32


def tiny(depth=16, **overrides):
  return create_model('densenet_bc', depth=depth, growth_rate=4, **overrides)


@functools.partial(jax.jit, static_argnums=0)
@on_one_device
def loss_and_grads(model, variables, x, dropout_key=None):
  """One compiled program: run op by op, every layer's distinct width compiled its own ops."""
  rngs = {} if dropout_key is None else {'dropout': dropout_key}

  def loss_fn(params):
    logits, upd = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                              train=True, mutable=['batch_stats'], rngs=rngs)
    return jnp.sum(jnp.sin(logits)), (logits, upd)
  (loss, (logits, upd)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables['params'])
  return logits, upd, grads


def assert_trains_as(other, standard, x, dropout_key=None, atol=1e-5):
  """`other` has `standard`'s variables, and computes its logits, gradients and BatchNorm
  updates in training and its logits in evaluation (to `atol`: float32 rounding by default).
  Returns the text of `other`'s training program, for checks of what it calls (jit's cache
  gives it without tracing the model again)."""
  variables, (logits_s, upd_s, grads_s), infer_s = standard_results(standard, x, dropout_key)
  # Same variable tree, same initial values: checkpoints move freely between implementations.
  # (test_models.py::test_initialisation checks that they also start from the same values.)
  other_vars = jax.eval_shape(other.init, jax.random.key(0), x)
  assert jax.tree.structure(variables) == jax.tree.structure(other_vars)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), variables) == jax.tree.map(
      lambda a: (a.shape, a.dtype), other_vars)

  logits_o, upd_o, grads_o = loss_and_grads(other, variables, x, dropout_key)
  np.testing.assert_allclose(logits_o, logits_s, atol=atol)
  # Some gradients are tiny (the stem BatchNorm scale's, near 1e-5, sums that nearly cancel):
  # a leaf's tolerance is at most 5% of its largest value. Some are zero but for rounding (a
  # per-channel scale that the next BatchNorm normalises away, as squeeze-and-excitation's
  # bias): they are held to 1e-5 of the largest gradient of all.
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_s))
  close = lambda a, b, floor=0.0: np.testing.assert_allclose(
      a, b, atol=min(atol, max(0.05 * float(np.abs(b).max()), floor)))
  jax.tree.map(lambda a, b: close(a, b, 1e-5 * scale), grads_o, grads_s)
  jax.tree.map(close, upd_o, upd_s)
  np.testing.assert_allclose(infer(other, variables, x), infer_s, atol=atol)
  return loss_and_grads.lower(other, variables, x, dropout_key).as_text()


_STANDARD = {}


def standard_results(standard, x, dropout_key):
  """The standard model's variables, training and inference results, computed once per model
  and input for all the implementations compared with it."""
  key = (standard, x.shape, np.asarray(x).tobytes(), None if dropout_key is None else
         np.asarray(jax.random.key_data(dropout_key)).tobytes())
  if key not in _STANDARD:
    variables = jax.jit(standard.init)(jax.random.key(0), x)   # compiled: eager init runs op by op
    _STANDARD[key] = (variables, loss_and_grads(standard, variables, x, dropout_key),
                      infer(standard, variables, x))
  return _STANDARD[key]


@functools.partial(jax.jit, static_argnums=0)
@on_one_device
def infer(model, variables, x):
  return model.apply(variables, x)


def lowered_train_gradient(model, image_shape):
  """The jitted parameter gradient of a train-mode forward pass, lowered (not compiled) for one
  device."""
  images = jax.ShapeDtypeStruct(image_shape, jnp.float32)
  variables = jax.eval_shape(on_one_device(model.init), jax.random.key(0), images)

  def loss(params, batch_stats, images):
    logits, _ = model.apply({'params': params, 'batch_stats': batch_stats},
                            images, train=True, mutable=['batch_stats'],
                            rngs={'dropout': jax.random.key(0)})
    return jnp.sum(logits)

  return jax.jit(on_one_device(jax.grad(loss))).lower(variables['params'],
                                                      variables['batch_stats'], images)


