"""Converted torchvision and Keras DenseNets compute the same logits as their sources."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from densenet_jax.models import create_model
from densenet_jax.tools import convert
from densenet_jax.training import pretrained
from densenet_jax.training import trainer
from test_input_pipeline import write_mock_metadata
from test_training import tiny_config


torch = pytest.importorskip('torch', reason='torch is a test-only requirement (CPU is enough)')
torchvision = pytest.importorskip('torchvision', reason='torchvision is a test-only requirement')

TOLERANCE = 1e-4


def randomize_torch(model, seed):
  """Random weights and random BatchNorm running statistics, so that nothing is trivially 0/1."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
        module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
        module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
        module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
  return model.eval()


def jax_logits(variables, model_name, images_nhwc, **overrides):
  model = create_model(model_name, **overrides)
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images_nhwc))


def assert_converted_logits_match(path, name, x, expected, source, overrides):
  """Converts `path` as model `name` and compares its logits on `x` with `expected`; returns
  the conversion (variables, meta)."""
  variables, meta = convert.convert(path, name)
  assert meta['overrides'] == overrides
  got = jax_logits(variables, name, x, **overrides)
  diff = float(np.max(np.abs(got - expected)))
  print(f'{name} {source} max |logit difference| = {diff:.2e}')
  assert diff <= TOLERANCE
  return variables, meta


def images(seed, batch=2):
  return np.random.default_rng(seed).standard_normal((batch, 224, 224, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def torch_densenet121(tmp_path_factory):
  model = randomize_torch(torchvision.models.densenet121(weights=None), 0)
  path = str(tmp_path_factory.mktemp('tv') / 'densenet121.pth')
  torch.save(model.state_dict(), path)
  return model, path


@pytest.mark.slow
# torchvision's four DenseNets differ in block sizes (which the converter's shape checks cover:
# test_conversion_errors), and densenet161 also in growth rate and stem width.
@pytest.mark.parametrize('name', ['densenet121', 'densenet161'])
def test_torchvision_logits_match(name, tmp_path, torch_densenet121):
  if name == 'densenet121':
    model, path = torch_densenet121
  else:
    model = randomize_torch(getattr(torchvision.models, name)(weights=None), 1)
    path = str(tmp_path / f'{name}.pth')
    torch.save(model.state_dict(), path)
  x = images(2)
  with torch.no_grad():
    expected = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  _, meta = assert_converted_logits_match(path, name, x, expected, 'torchvision', {})
  assert meta['num_classes'] == 1000


def test_safetensors_and_legacy_keys_convert_identically(tmp_path, torch_densenet121):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  model, path = torch_densenet121
  reference, _ = convert.convert(path, 'densenet121')
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  save_file(state, str(tmp_path / 'model.safetensors'))
  # The published torchvision files say 'denselayer1.norm.1.weight' for 'denselayer1.norm1.weight'.
  legacy = {k.replace('.norm1.', '.norm.1.').replace('.conv1.', '.conv.1.')
             .replace('.norm2.', '.norm.2.').replace('.conv2.', '.conv.2.')
            if 'denselayer' in k else k: v for k, v in model.state_dict().items()}
  assert any('.norm.1.' in k for k in legacy)
  torch.save(legacy, str(tmp_path / 'legacy.pth'))
  for source in ('model.safetensors', 'legacy.pth'):
    variables, _ = convert.convert(str(tmp_path / source), 'densenet121')
    jax.tree.map(np.testing.assert_array_equal, variables, reference)


@pytest.mark.slow
def test_command_line_writes_a_loadable_checkpoint(tmp_path, torch_densenet121):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  model, path = torch_densenet121
  source = str(tmp_path / 'model.safetensors')
  save_file({k: v.numpy() for k, v in model.state_dict().items()}, source)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, '-m', 'densenet_jax.tools.convert', f'--source={source}',
                         '--model=densenet121', f'--output={tmp_path / "out"}'], cwd=root,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'init_checkpoint=' in proc.stdout
  loaded = pretrained.read_init_checkpoint(str(tmp_path / 'out'))
  reference, _ = convert.convert(path, 'densenet121')
  jax.tree.map(np.testing.assert_array_equal, loaded, reference)
  assert pretrained.read_model_json(str(tmp_path / 'out'))['model'] == 'densenet121'


def test_conversion_errors(tmp_path, torch_densenet121):
  model, _ = torch_densenet121
  state = model.state_dict()
  other = str(tmp_path / 'densenet169.pth')
  torch.save(randomize_torch(torchvision.models.densenet169(weights=None), 3).state_dict(), other)
  with pytest.raises(convert.ConversionError, match=r'does not hold densenet121 weights: '
                     r'features\.\S+ has shape \(\d+, \d+, \d+, \d+\) where densenet121 needs'):
    convert.convert(other, 'densenet121')
  missing = dict(state)
  del missing['features.denseblock2.denselayer3.conv1.weight']
  torch.save(missing, str(tmp_path / 'missing.pth'))
  with pytest.raises(convert.ConversionError, match=r'missing 1 key.*denselayer3\.conv1'):
    convert.convert(str(tmp_path / 'missing.pth'), 'densenet121')
  extra = dict(state, **{'features.extra.weight': torch.zeros(3)})
  torch.save(extra, str(tmp_path / 'extra.pth'))
  with pytest.raises(convert.ConversionError, match=r"1 key\(s\) that densenet121 does not use, "
                                                    r"e.g. \['features.extra.weight'\]"):
    convert.convert(str(tmp_path / 'extra.pth'), 'densenet121')
  (tmp_path / 'garbage.pth').write_bytes(b'not a state dict')
  with pytest.raises(convert.ConversionError, match=r'Cannot read .*garbage.pth'):
    convert.convert(str(tmp_path / 'garbage.pth'), 'densenet121')
  with pytest.raises(convert.ConversionError, match='no such file'):
    convert.convert(str(tmp_path / 'absent.safetensors'), 'densenet121')


@pytest.mark.slow
def test_keras_logits_match(tmp_path):
  """Keras's DenseNet121 in each of its two files, the whole model (.keras) and its weights
  alone (.weights.h5): the logits match, and both files convert to the same variables.
  (Keras's DenseNets differ only in block sizes, which the converter's shape checks cover.)"""
  keras = pytest.importorskip('keras')
  name = 'densenet121'
  net = getattr(keras.applications, convert.KERAS_MODELS[name])(
      weights=None, classifier_activation=None)
  rng = np.random.default_rng(4)
  for layer in net.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      gamma, beta, mean, var = layer.get_weights()
      layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                         rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 1.5, var.shape)])
  x = images(5)
  expected = np.asarray(net(x, training=False))
  whole, weights = str(tmp_path / 'model.keras'), str(tmp_path / 'model.weights.h5')
  net.save(whole)
  net.save_weights(weights)
  variables, meta = assert_converted_logits_match(whole, name, x, expected, 'Keras',
                                                  {'bn_epsilon': convert.KERAS_EPSILON})
  from_weights, weights_meta = convert.convert(weights, name)
  assert weights_meta['overrides'] == meta['overrides']
  jax.tree.map(np.testing.assert_array_equal, from_weights, variables)


@pytest.mark.slow
def test_imagenet_evaluation_of_converted_weights_on_mock_data(tmp_path, torch_densenet121):
  """Convert, then `eval_only` through the real ImageNet input pipeline and trainer."""
  _, path = torch_densenet121
  variables, meta = convert.convert(path, 'densenet121')
  convert.save(variables, meta, str(tmp_path / 'converted'))
  data_dir = str(tmp_path / 'tfds')
  write_mock_metadata(data_dir, 'imagenet2012', {'train': 16, 'validation': 16})
  config = tiny_config(**{'model.name': 'densenet121', 'model.depth': None,
                          'model.growth_rate': None, 'dataset.name': 'imagenet2012',
                          'dataset.data_dir': data_dir, 'dataset.image_size': 224,
                          'dataset.preprocess': 'imagenet', 'dataset.train_split': 'train',
                          'dataset.eval_split': 'validation',
                          'dataset.mean': (0.485, 0.456, 0.406),
                          'dataset.std': (0.229, 0.224, 0.225), 'dataset.cache': False,
                          'batch_size': 8, 'eval_batch_size': 8, 'eval_only': True,
                          'init_checkpoint': str(tmp_path / 'converted')})
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_FILES,
                              data_dir=data_dir):
    out = trainer.train_and_evaluate(config, str(tmp_path / 'eval'))
  assert out['step'] == 0 and out['eval_examples'] == 16
  assert 0 <= out['eval_top1'] <= out['eval_top5'] <= 1 and np.isfinite(out['eval_loss'])
  assert os.path.isfile(str(tmp_path / 'eval' / 'results.json'))


@pytest.mark.slow
def test_fine_tuning_keeps_all_but_a_resized_classifier():
  model_1000 = create_model('densenet_bc', depth=10, growth_rate=4, num_classes=1000)
  model_10 = create_model('densenet_bc', depth=10, growth_rate=4, num_classes=10)
  x = np.zeros((1, 8, 8, 3), np.float32)
  source = jax.device_get(model_1000.init(jax.random.key(1), x))
  target = jax.device_get(model_10.init(jax.random.key(2), x))
  merged = pretrained.merge(source, target['params'], target['batch_stats'], model_10)
  np.testing.assert_array_equal(merged['params']['classifier']['kernel'],
                                target['params']['classifier']['kernel'])
  np.testing.assert_array_equal(merged['params']['block1']['layer1']['conv2']['kernel'],
                                source['params']['block1']['layer1']['conv2']['kernel'])
  other = create_model('densenet_bc', depth=10, growth_rate=6, num_classes=10)
  wrong = jax.device_get(other.init(jax.random.key(2), x))
  with pytest.raises(ValueError, match=r'does not match config.model: params/\S+ has shape'):
    pretrained.merge(source, wrong['params'], wrong['batch_stats'], other)


class _Payload:
  """Pickles as a call to os.system: loading it would run a command."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def test_files_that_carry_code_are_refused(tmp_path):
  torch = pytest.importorskip('torch')
  marker = tmp_path / 'code_ran'
  path = tmp_path / 'payload.pth'
  torch.save({'features.conv0.weight': torch.zeros(1), 'x': _Payload(marker)}, path)
  with pytest.raises(convert.ConversionError, match='Cannot read .*payload.pth as a state dict'):
    convert.read_torch_state_dict(str(path))
  assert not marker.exists()

  keras = pytest.importorskip('keras')
  inputs = keras.Input((4,))
  outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)
  keras_path = tmp_path / 'lambda.keras'
  keras.Model(inputs, outputs).save(keras_path)
  with pytest.raises(convert.ConversionError, match=r'Cannot read .*lambda.keras.*safe_mode'):
    convert.read_keras_weights(str(keras_path), 'densenet121', 1000)
  # A .h5 file that is not DenseNet weights is not loaded as a whole model instead.
  h5_path = tmp_path / 'lambda.h5'
  keras.Model(inputs, outputs).save(h5_path)
  with pytest.raises(convert.ConversionError, match=r'Cannot read .*lambda.h5 as Keras'):
    convert.read_keras_weights(str(h5_path), 'densenet121', 1000)
