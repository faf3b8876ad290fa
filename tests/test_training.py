"""The training system end to end on a tiny DenseNet-BC and scikit-learn's digits (offline)."""

import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import quickstart
from densenet_jax.data import input_pipeline
from densenet_jax.native import onednn
from densenet_jax.runtime import paths
from densenet_jax.training import optimization
from densenet_jax.training import train_lib
from densenet_jax.training import trainer
from densenet_jax.training.validation import ConfigError
from tests import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Overrides that shrink the quickstart to a few seconds: L=10 (one layer per block), k=4.
TINY = ['--config.model.depth=10', '--config.model.growth_rate=4', '--config.batch_size=32',
        '--config.num_train_steps=12', '--config.lr_decay_at=()',
        '--config.log_every_steps=4', '--config.checkpoint_every_steps=4',
        '--config.eval_every_steps=6', '--config.eval_batch_size=64']


def tiny_config(**overrides):
  config = quickstart.get_config()
  config.model.depth = 10
  config.model.growth_rate = 4
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_train_steps = 12
  config.lr_decay_at = ()
  config.log_every_steps = 4
  config.checkpoint_every_steps = 4
  config.eval_every_steps = 6
  for key, value in overrides.items():
    node = config
    *path, last = key.split('.')
    for part in path:
      node = node[part]
    node[last] = value
  return config


def train_py(workdir, *extra, env=None, **popen):
  cmd = [sys.executable, os.path.join(ROOT, 'train.py'),
         f'--config={os.path.join(ROOT, "configs", "quickstart.py")}', f'--workdir={workdir}',
         *TINY, *extra]
  full_env = dict(os.environ, XLA_FLAGS=xla_flags.with_devices(1),
                  PYTHONPATH=ROOT)
  full_env.update(env or {})
  popen = dict(dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), **popen)
  return subprocess.Popen(cmd, cwd=ROOT, env=full_env, **popen)


def run_to_end(proc, timeout=600, expect=0):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == expect, out[-5000:]
  return out


def load_params(workdir, step):
  """The params saved at `step`, as NumPy arrays (whatever devices saved them)."""
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          checkpointer.metadata(path).item_metadata.tree)
  return checkpointer.restore(path, restore_args=as_numpy)['params']


def results(workdir):
  return paths.read_json(os.path.join(workdir, 'results.json'))  # Local or gs://.


@pytest.mark.slow
def test_train_checkpoint_evaluate_in_process(tmp_path):
  """Trains on 8 devices, writes checkpoints, TensorBoard events and results.json."""
  workdir = str(tmp_path / 'run')
  out = trainer.train_and_evaluate(tiny_config(), workdir)
  assert out['step'] == 12 and out['eval_examples'] == 360
  res = results(workdir)
  assert res['step'] == 12
  assert 0 <= res['eval_top1'] <= res['eval_top5'] <= 1 and res['eval_loss'] > 0
  assert res['config']['model']['depth'] == 10
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))
                if s.isdigit()) == [4, 8, 12]
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))

  # Eval-only on the same workdir reproduces the final evaluation.
  again = trainer.train_and_evaluate(tiny_config(eval_only=True), workdir)
  assert again['eval_top1'] == out['eval_top1'] and again['eval_loss'] == out['eval_loss']


@pytest.mark.slow
def test_one_and_eight_devices_train_the_same(tmp_path):
  """The same steps on a 1-device and an 8-device mesh give the same parameters: BatchNorm
  statistics and gradients are those of the global batch either way."""
  assert jax.device_count() == 8
  config = tiny_config()
  info = input_pipeline.get_info(config.dataset)
  model = trainer.build_model(config, info.num_classes)
  schedule = optimization.learning_rate_schedule(config, global_batch_size=32,
                                                 steps_per_epoch=44, num_train_steps=12)
  tx = optimization.create_optimizer(config, schedule)
  batches = list(input_pipeline.train_iterator(config.dataset, seed=0, local_batch_size=32,
                                               epoch=0))[:3]
  finals = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = jax.sharding.Mesh(np.asarray(devices), ('data',))
    state, shardings = train_lib.create_train_state(model, tx, 0, info.image_shape, mesh)
    p_train, _ = train_lib.compile_steps(model, tx, schedule, 0.0, shardings, mesh)
    for batch in batches:
      state, _ = p_train(state, train_lib.to_global(batch, mesh))
    finals.append(jax.device_get(state))
  one, eight = finals
  assert len(jax.tree.leaves(one.params)) > 10
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5),
               (one.params, one.batch_stats), (eight.params, eight.batch_stats))


@pytest.mark.slow
@pytest.mark.parametrize('use_onednn', [False, True], ids=['xla', 'onednn'])
def test_cpu_steps_leave_convolutions_to_eigen(use_onednn):
  """On CPU the compiled steps keep dot products in YNNPACK fusions but no convolution: XLA's
  YNNPACK convolution runs on one core (docs/design.md#cpu-compiler-options, set in
  train_lib._CPU_COMPILER_OPTIONS). With XLA's
  defaults, this model's 3x3 convolutions (12 maps or more) would go to YNNPACK. With oneDNN's
  convolutions (densenet_jax/native) the program has no XLA convolution left at all."""
  onednn.set_enabled(use_onednn)
  if use_onednn and not onednn.available():
    pytest.skip('no oneDNN here')
  config = tiny_config(**{'model.growth_rate': 12})
  model = trainer.build_model(config, input_pipeline.get_info(config.dataset).num_classes)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('data',))
  tx = optax.sgd(0.1)
  state, shardings = train_lib.create_train_state(model, tx, 0, (8, 8, 1), mesh)
  batch = train_lib.to_global({'image': np.zeros((4, 8, 8, 1), np.float32),
                               'label': np.zeros((4,), np.int32),
                               'mask': np.ones((4,), bool)}, mesh)
  p_train, p_eval = train_lib.compile_steps(model, tx, optax.constant_schedule(0.1), 0.0,
                                            shardings, mesh)
  try:
    for step in (p_train, p_eval):
      hlo = step.lower(state, batch).compile(compiler_options=xla_flags.AS_RUN).as_text()
      library_bodies = set(re.findall(r'fusion\(.*kind=kCustom, calls=%([\w.-]+)', hlo))
      assert library_bodies, 'no YNNPACK fusion at all: the option may have been renamed'
      computations = {m.group(1): m.group(2) for m in
                      re.finditer(r'^%([\w.-]+) .*?\{\n(.*?)\n\}', hlo, re.M | re.S)}
      if use_onednn:
        assert ' convolution(' not in hlo
        assert 'custom_call_target="densenet_onednn_conv_forward' in hlo
      else:
        assert ' convolution(' in hlo
        assert not [c for c in library_bodies if ' convolution(' in computations[c]]
  finally:
    onednn.set_enabled(True)


def test_xla_flags_set_by_the_user_win(monkeypatch):
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('data',))
  assert 'xla_cpu_experimental_ynn_fusion_type' in train_lib.compiler_options(mesh)
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=dot')
  assert train_lib.compiler_options(mesh) is None


@pytest.mark.parametrize('overrides, match', [
    (dict(batch_size=12), r'config.batch_size=12: expected a positive multiple of the number '
                          r'of devices \(8\)'),
    (dict(lr_decay_at=(0.5, 1.5)), r'config.lr_decay_at=\(0.5, 1.5\): expected increasing '
                                   r'fractions of the run'),
    (dict(**{'dataset.image_size': 2}), r'config.dataset.image_size=2: expected at least 4'),
    (dict(**{'model.compression': 1.5}), r'config.model: .*compression=1.5'),
    (dict(**{'model.depth': 11}), r'config.model: depth=11 does not fit DenseNet-BC'),
    (dict(**{'model.num_classes': 5}), r'config.model.num_classes=5: expected at least the 10'),
    (dict(schedule='linear'), r"config.schedule='linear'"),
])
def test_config_errors_before_compilation(tmp_path, overrides, match):
  start = time.perf_counter()
  with pytest.raises(ConfigError, match=match):
    trainer.train_and_evaluate(tiny_config(**overrides), str(tmp_path))
  assert time.perf_counter() - start < 10  # Nothing was compiled.


@pytest.mark.slow
def test_quickstart_model_learns(tmp_path):
  """A quarter of the quickstart (5 of its 20 epochs): the loss falls and the digits are
  recognised far above chance (10 classes: 0.1)."""
  from densenet_jax.experiments import report  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  # As a user runs it: one process, one device.
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'train.py'), f'--workdir={workdir}',
       f'--config={os.path.join(ROOT, "configs", "quickstart.py")}', '--config.num_epochs=5',
       '--config.eval_every_steps=-1'], cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True, timeout=600,
      env=dict(os.environ, XLA_FLAGS=xla_flags.with_devices(1),
               PYTHONPATH=ROOT))
  assert proc.returncode == 0, proc.stdout[-5000:]
  losses = report.read_scalars(workdir)['train_loss']
  first, last = losses[min(losses)], losses[max(losses)]
  assert last < 0.35 * first, losses
  assert results(workdir)['eval_top1'] > 0.8, results(workdir)


@pytest.mark.slow
def test_squeeze_excitation_from_the_command_line(tmp_path):
  """docs/extending.md's command: a config field adds the unit, and the log names each block's
  path (scanned blocks of that layer take the generic path)."""
  workdir = str(tmp_path / 'run')
  out = run_to_end(train_py(workdir, '--config.model.se_ratio=0.5', '--config.num_train_steps=4',
                            '--config.eval_every_steps=4'))
  for block in (1, 2, 3):
    assert (f'Dense block{block}: scanned, generic (the specialised path does not compute '
            'SqueezeExcitation') in out, out[-3000:]
  assert results(workdir)['step'] == 4
  assert 'se_reduce' in load_params(workdir, 4)['block1']['layer1']


@pytest.mark.slow
def test_unknown_config_flag_is_one_line(tmp_path):
  out, _ = train_py(str(tmp_path / 'run'), '--config.model.growth_rte=6').communicate(timeout=300)
  assert 'Traceback' not in out, out[-3000:]
  assert out.strip().splitlines()[-1] == (
      "Config error: --config.model.growth_rte: no such config field (did you mean "
      "'growth_rate'?).")


def test_eval_only_without_a_checkpoint_is_refused(tmp_path):
  with pytest.raises(ConfigError, match=r'config.eval_only=True: .* has no checkpoint'):
    trainer.train_and_evaluate(tiny_config(eval_only=True), str(tmp_path / 'fresh'))
  assert not os.path.exists(tmp_path / 'fresh' / 'results.json')


def test_dataset_errors_name_the_field(tmp_path):
  config = tiny_config(**{'dataset.name': 'folder', 'dataset.data_dir': str(tmp_path / 'no')})
  with pytest.raises(ConfigError, match=r'^config.dataset.data_dir=.*: no such directory'):
    trainer.train_and_evaluate(config, str(tmp_path / 'run'))


def test_nan_loss_stops_with_step(tmp_path, monkeypatch):
  # A NaN loss made from the data (pixels divided by a tiny std) depended on the order of
  # operations: on XLA:CPU a ReLU may turn NaN into 0, and a network of zeros gives the finite
  # loss log(10). With oneDNN's convolutions no NaN reached the loss. So the loss itself is made
  # NaN here, from the first step on.
  original = train_lib.cross_entropy
  nan_loss = lambda *args, **kwargs: original(*args, **kwargs) * jnp.nan
  monkeypatch.setattr(train_lib, 'cross_entropy', nan_loss)
  config = tiny_config()
  with pytest.raises(FloatingPointError, match=r'Loss is nan at step 1\b'):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_learning_rate_is_scaled_and_decayed():
  config = tiny_config(learning_rate=0.1, reference_batch_size=64, lr_decay_at=(0.5, 0.75))
  schedule = optimization.learning_rate_schedule(config, global_batch_size=128,
                                                 steps_per_epoch=10, num_train_steps=40)
  np.testing.assert_allclose([schedule(s) for s in (0, 19, 20, 29, 30, 39)],
                             [0.2, 0.2, 0.02, 0.02, 0.002, 0.002], rtol=1e-6)
  config = tiny_config(schedule='cosine', warmup_epochs=1.0)
  schedule = optimization.learning_rate_schedule(config, global_batch_size=64,
                                                 steps_per_epoch=10, num_train_steps=40)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(40)],
                             [0.0, 0.05, 0.1, 0.0], atol=1e-6)
