"""Converts published DenseNet and ResNet ImageNet weights to densenet_jax variables.

    python -m densenet_jax.tools.convert --source=densenet121-a639ec97.pth --model=densenet121 \
        --output=/tmp/densenet121_tv
    python -m densenet_jax.tools.convert --source=model.safetensors --model=densenet121 --output=DIR
    python -m densenet_jax.tools.convert --source=resnet50-0676ba61.pth --model=resnet50 --output=DIR
    python -m densenet_jax.tools.convert --source=densenet121_weights_tf_dim_ordering_tf_kernels.h5 \
        --model=densenet121 --output=DIR

Sources:
  * torchvision (and timm's `tv_in1k`, which are torchvision's weights) state dicts: `.pth`/`.pt`
    (needs torch) or `.safetensors` (needs only the safetensors package); current key names
    (`denselayer1.norm1.weight`) and the legacy ones of the published torchvision files
    (`denselayer1.norm.1.weight`). Models 121/161/169/201; and torchvision's ResNets 18, 34,
    50, 101 and 152 (timm's `resnet50.tv_in1k` etc. have the same keys, as `.safetensors`).
  * Keras applications (`.h5` weights or a whole `.keras`/`.h5` model; needs keras):
    DenseNet121/169/201. Keras uses BatchNorm epsilon 1.001e-5, so those models are built with
    `bn_epsilon=1.001e-5`; everything else (zero-padded 7x7/2 stem, 3x3/2 max pool after ReLU,
    2x2 average pools) computes exactly what densenet_jax computes.

Both expect RGB images resized to 256 (shorter side), center-cropped to 224, scaled to [0, 1]
and normalised with the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225):
the `imagenet` preprocessing of configs/base.py.

The output directory holds `variables/` (an Orbax checkpoint of {'params', 'batch_stats'}) and
`model.json` (model name and field overrides); `--config.init_checkpoint=DIR` starts training or
evaluation from it.
"""

import os
import re
import tempfile
from typing import Any, Callable, Dict, Tuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from densenet_jax.models import create_model
from densenet_jax.models import resnet as resnet_layout
from densenet_jax.models import resnet_variants
from densenet_jax.runtime import paths

KERAS_EPSILON = 1.001e-5
TORCH_RESNETS = tuple(resnet_variants.IMAGENET_MODELS)
TORCH_MODELS = ('densenet121', 'densenet161', 'densenet169', 'densenet201') + TORCH_RESNETS
KERAS_MODELS = {'densenet121': 'DenseNet121', 'densenet169': 'DenseNet169',
                'densenet201': 'DenseNet201'}

# Published torchvision files name layers 'norm.1' where current code names them 'norm1'.
_LEGACY_KEY = re.compile(
    r'^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|'
    r'running_var))$')
_TORCH_BN = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}


class ConversionError(ValueError):
  """The source file does not hold the weights of the requested model."""


def model_overrides(source: str) -> Dict[str, Any]:
  """DenseNet fields a source needs beyond the named model's defaults."""
  return {'bn_epsilon': KERAS_EPSILON} if source == 'keras' else {}


def source_kind(path: str) -> str:
  if path.endswith(('.h5', '.keras', '.hdf5')):
    return 'keras'
  if path.endswith(('.pth', '.pt', '.bin', '.safetensors')):
    return 'torchvision'
  raise ConversionError(f'--source={path}: expected a .pth/.pt/.bin/.safetensors (torchvision, '
                        'timm) or .h5/.keras (Keras) file.')


def read_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
  """A torchvision/timm state dict as numpy arrays, with legacy key names updated."""
  if not os.path.isfile(path):
    raise ConversionError(f'Cannot read {path}: no such file.')
  try:
    if path.endswith('.safetensors'):
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
      state = load_file(path)
    else:
      try:
        import torch  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ConversionError(f'Reading {path} needs torch (pip install torch), or convert '
                              'the .safetensors version of the weights instead.') from e
      # weights_only: tensors and plain containers; a pickle that would run code is refused.
      state = torch.load(path, map_location='cpu', weights_only=True)
      state = state.get('state_dict', state)
      state = {k: v.numpy() for k, v in state.items() if hasattr(v, 'numpy')}
  except ConversionError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f'Cannot read {path} as a state dict: {type(e).__name__}: {e}') from e
  out = {}
  for key, value in state.items():
    key = key[len('module.'):] if key.startswith('module.') else key
    match = _LEGACY_KEY.match(key)
    if match:
      key = match.group(1) + match.group(2)
    if not key.endswith('num_batches_tracked'):
      out[key] = np.asarray(value)
  return out


# How each source names the modules of a DenseNet: fixed modules, then templates for the layers
# of dense blocks and for transitions ({block}: 1-based index, {stage}: block + 1, {layer},
# {part}: the module's densenet_jax name, translated through 'parts').
_MODULE_NAMES = {
    'torchvision': {
        'stem_conv': 'features.conv0', 'stem_norm': 'features.norm0',
        'final_norm': 'features.norm5', 'classifier': 'classifier',
        'layer': 'features.denseblock{block}.denselayer{layer}.{part}',
        'transition': 'features.transition{block}.{part}', 'parts': {},
    },
    'keras': {
        'stem_conv': 'conv1_conv', 'stem_norm': 'conv1_bn', 'final_norm': 'bn',
        'classifier': 'predictions', 'layer': 'conv{stage}_block{layer}_{part}',
        'transition': 'pool{stage}_{part}',
        'parts': {'norm1': '0_bn', 'conv1': '1_conv', 'norm2': '1_bn', 'conv2': '2_conv',
                  'norm': 'bn', 'conv': 'conv'},
    },
}


def _module_name(modules, source: str) -> str:
  """The source's name of the densenet_jax module at path `modules`."""
  names = _MODULE_NAMES[source]
  head = modules[0]
  if head in names:
    return names[head]
  for kind, prefix, part_index in (('layer', 'block', 2), ('transition', 'transition', 1)):
    if head.startswith(prefix):
      block = int(head[len(prefix):])
      part = modules[part_index]
      layer = modules[1][len('layer'):] if kind == 'layer' else None
      return names[kind].format(block=block, stage=block + 1, layer=layer,
                                part=names['parts'].get(part, part))
  raise ConversionError(f'No {source} name for {"/".join(modules)}.')


# torchvision's ResNet: its names of the modules that are not inside a residual block, and of
# the parts of a block (convN and normN keep their number: bnN).
_RESNET_MODULES = {'stem_conv': 'conv1', 'stem_norm': 'bn1', 'classifier': 'fc'}
_RESNET_PARTS = {'shortcut_conv': 'downsample.0', 'shortcut_norm': 'downsample.1'}


def _resnet_module_name(modules) -> str:
  """torchvision's name of the ResNet module at path `modules` ('stage2', 'block1', 'norm1'
  is 'layer2.0.bn1')."""
  if modules[0] in _RESNET_MODULES:
    return _RESNET_MODULES[modules[0]]
  stage, block, part = modules
  part = _RESNET_PARTS.get(part, part.replace('norm', 'bn'))
  return f'layer{stage[len("stage"):]}.{int(block[len("block"):]) - 1}.{part}'


def _torch_name(path: Tuple[str, ...], resnet: bool = False) -> Tuple[str, Callable]:
  """(torchvision key, array transform) of a densenet_jax variable path."""
  *modules, leaf = path
  suffix = 'weight' if leaf == 'kernel' else _TORCH_BN.get(leaf, leaf)
  name = _resnet_module_name(modules) if resnet else _module_name(modules, 'torchvision')
  if leaf != 'kernel':
    transform = lambda a: a
  elif modules == ['classifier']:
    transform = lambda a: a.T  # Linear: torch [out, in] -> Flax [in, out].
  else:
    transform = lambda a: a.transpose(2, 3, 1, 0)  # Conv: [out, in, h, w] -> [h, w, in, out].
  return f'{name}.{suffix}', transform


def _keras_name(path: Tuple[str, ...]) -> Tuple[str, int]:
  """(Keras layer name, index in layer.get_weights()) of a densenet_jax variable path."""
  *modules, leaf = path
  # Conv2D: [kernel]; Dense: [kernel, bias]; BatchNormalization: [gamma, beta, mean, var].
  position = {'kernel': 0, 'scale': 0, 'bias': 1, 'mean': 2, 'var': 3}[leaf]
  return _module_name(modules, 'keras'), position


def read_keras_weights(path: str, model_name: str, num_classes: int) -> Dict[str, list]:
  """{layer name: layer.get_weights()} of a Keras applications DenseNet file."""
  if model_name not in KERAS_MODELS:
    raise ConversionError(f'--model={model_name}: Keras applications have '
                          f'{sorted(KERAS_MODELS)} only.')
  if not os.path.isfile(path):
    raise ConversionError(f'Cannot read {path}: no such file.')
  try:
    import keras  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(f'Reading {path} needs keras (pip install keras).') from e
  try:
    if path.endswith('.keras'):
      # safe_mode refuses to deserialise code (Lambda layers' bytecode): a weights file from
      # elsewhere is data, and must not run anything.
      net = keras.models.load_model(path, compile=False, safe_mode=True)
    else:
      # Weights only, into the architecture built here; a file that is not such weights is an
      # error, never a reason to deserialise whatever model the file describes.
      net = getattr(keras.applications, KERAS_MODELS[model_name])(
          weights=None, classes=num_classes, classifier_activation=None)
      net.load_weights(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f'Cannot read {path} as Keras {KERAS_MODELS[model_name]} weights: '
                          f'{type(e).__name__}: {e}') from e
  return {layer.name: layer.get_weights() for layer in net.layers if layer.get_weights()}


def _paths(tree) -> Dict[Tuple[str, ...], Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(k.key for k in path): leaf for path, leaf in flat}


def _unflatten(flat: Dict[Tuple[str, ...], np.ndarray]) -> Dict[str, Any]:
  tree: Dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def convert(source_path: str, model_name: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Reads `source_path` and returns (variables, model.json contents) for `model_name`.

  Raises:
    ConversionError: unreadable file; weights of another architecture (the first variable
      whose shapes differ is named with both shapes); missing or unexpected keys.
  """
  kind = source_kind(source_path)
  if kind == 'torchvision' and model_name not in TORCH_MODELS:
    raise ConversionError(f'--model={model_name}: torchvision has {TORCH_MODELS} only.')
  overrides = model_overrides(kind)
  resnet = model_name in TORCH_RESNETS
  if kind == 'keras':
    probe = read_keras_weights(source_path, model_name, 1000)
    num_classes = probe['predictions'][1].shape[0]
  else:
    state = read_torch_state_dict(source_path)
    classifier = _torch_name(('classifier', 'bias'), resnet)[0]
    num_classes = state[classifier].shape[0] if classifier in state else 1000
  # A ResNet's blocks by their own names (the sources' layout), stacked at the end.
  unrolled = {'scan_blocks': False} if resnet else {}
  model = create_model(model_name, num_classes=int(num_classes), **overrides, **unrolled)
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  flat = {}
  used = set()
  for collection in ('params', 'batch_stats'):
    for path, leaf in _paths(abstract[collection]).items():
      if kind == 'keras':
        layer, index = _keras_name(path)
        if layer not in probe:
          raise ConversionError(f'{source_path} has no Keras layer {layer!r} (for '
                                f'{collection}/{"/".join(path)}): not Keras {model_name}?')
        value, key = np.asarray(probe[layer][index]), f'{layer}[{index}]'
      else:
        key, transform = _torch_name(path, resnet)
        if key not in state:
          missing = sorted(_torch_name(p, resnet)[0] for p in _paths(abstract[collection])
                           if _torch_name(p, resnet)[0] not in state)
          raise ConversionError(f'{source_path} is missing {len(missing)} key(s) of '
                                f'{model_name}, e.g. {missing[:5]}.')
        value = transform(np.asarray(state[key]))
      used.add(key)
      if value.shape != leaf.shape:
        raise ConversionError(
            f'{source_path} does not hold {model_name} weights: {key} has shape {value.shape} '
            f'where {model_name} needs {leaf.shape} ({collection}/{"/".join(path)}).')
      flat[(collection,) + path] = value.astype(np.float32)
  if kind == 'torchvision':
    unexpected = sorted(set(state) - used)
    if unexpected:
      raise ConversionError(f'{source_path} has {len(unexpected)} key(s) that {model_name} '
                            f'does not use, e.g. {unexpected[:5]}: another architecture?')
  meta = {'model': model_name, 'overrides': overrides, 'num_classes': int(num_classes),
          'source': kind, 'source_file': os.path.abspath(source_path)}
  variables = _unflatten(flat)
  if resnet:
    variables = resnet_layout.to_layout(create_model(model_name), variables)
  return variables, meta


def save(variables: Dict[str, Any], meta: Dict[str, Any], output: str) -> None:
  """Writes OUTPUT/variables (Orbax) and OUTPUT/model.json."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from densenet_jax.training import checkpointing
  from densenet_jax.training import staged_checkpoints
  output = paths.resolve(output)  # A local directory or an object store.
  output.mkdir(parents=True, exist_ok=True)
  direct = checkpointing.orbax_writes_directly(output)
  with tempfile.TemporaryDirectory() as local:  # Used only where Orbax cannot write (s3://).
    variables_dir = output / 'variables' if direct else paths.resolve(local) / 'variables'
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(variables_dir, variables, force=True)
    checkpointer.wait_until_finished()  # The save is asynchronous; the CLI must not exit before.
    checkpointer.close()
    if not direct:
      staged_checkpoints.upload_tree(os.fspath(variables_dir),
                                     f'{paths.display(output)}/variables')
  paths.write_json(output / 'model.json', meta)


_SOURCE = flags.DEFINE_string('source', None, 'Weights file (.pth, .safetensors, .h5, .keras).')
_MODEL = flags.DEFINE_enum('model', 'densenet121', TORCH_MODELS, 'Architecture of the weights.')
_OUTPUT = flags.DEFINE_string('output', None, 'Directory to write the converted variables to.')


def check_output(output: str) -> None:
  """A local --output that cannot become a directory is refused before the source is read, and
  without creating anything. (An object store's errors come from its own checks on writing.)"""
  if paths.is_remote(output):
    return
  existing = os.path.abspath(output)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ConversionError(f'--output={output}: {existing} is a file, not a directory.')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ConversionError(f'--output={output}: {existing} is not writable.')


def main(argv):
  if len(argv) > 1:   # A name without its flag would otherwise be ignored.
    raise SystemExit(f'convert: unexpected arguments {argv[1:]}: give --source=FILE, '
                     '--model=NAME and --output=DIR.')
  try:
    check_output(_OUTPUT.value)
    variables, meta = convert(_SOURCE.value, _MODEL.value)
  except ConversionError as e:   # Names the file, key or shape; a traceback would bury it.
    raise SystemExit(f'convert: {e}') from None
  try:
    save(variables, meta, _OUTPUT.value)
  except OSError as e:   # A full disk, say: the one line says where and why.
    raise SystemExit(f'convert: --output={_OUTPUT.value}: cannot write: {e}') from None
  print(f'Wrote {meta["model"]} ({meta["source"]}, {meta["num_classes"]} classes) to '
        f'{_OUTPUT.value}. Train or evaluate from it with --config.init_checkpoint='
        f'{paths.resolve(_OUTPUT.value)}' +
        (f' --config.model.bn_epsilon={KERAS_EPSILON}' if meta['source'] == 'keras' else ''))


if __name__ == '__main__':
  flags.mark_flags_as_required(['source', 'output'])
  app.run(main)
