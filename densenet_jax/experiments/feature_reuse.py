"""The paper's Figure 5: how strongly each layer of a trained DenseNet uses each earlier layer.

    python -m densenet_jax.experiments.feature_reuse --workdir=RUN --output=FILE.png

For each dense block with n layers, pixel (s, l) is the mean absolute weight of layer l's first
convolution (the bottleneck 1x1, or the 3x3 without a bottleneck) over the input channels that
come from source s: s = 0 is the block's input (the stem's or the previous transition's maps),
s >= 1 the k maps that layer s of the block added. The mean runs over those input channels,
the kernel's spatial taps and all its output channels, so it is the L1 norm of the weights
divided by their number: sources of different widths (the block input is wider than k)
compare fairly. Two more columns per block: the transition's 1x1 convolution after the block
(for the last block, the classifier's weights), over the same sources.

Normalisation for display: each column is divided by its largest entry, so every target's
strongest source is 1 and the colours say how much of that a source gets. Layers differ in
their weights' overall scale (fan-out initialisation, weight decay acting on different widths,
and the transition and classifier unlike any layer), which per-column scaling removes; the
paper's colour scale per block shows the same pattern less evenly. `reuse_matrices` returns the
raw means.
"""

from typing import Any, Dict, List, Optional

from absl import app
from absl import flags
import numpy as np

from densenet_jax.runtime import paths
from densenet_jax.runtime import staging


def supports(model: Optional[Dict[str, Any]]) -> bool:
  """Whether a run's model description is a DenseNet (dense blocks to draw)."""
  return bool(model) and 'block_sizes' in model and 'growth_rate' in model


def _kernel(tree, *path) -> np.ndarray:
  for part in path:
    tree = tree[part]
  return np.asarray(tree['kernel'])


def _source_means(kernel: np.ndarray, starts: List[int]) -> np.ndarray:
  """Mean |w| over the input channels [starts[s], starts[s + 1]) of a kernel [..., in, out]."""
  weights = np.abs(kernel.reshape(-1, kernel.shape[-2], kernel.shape[-1]))
  return np.array([weights[:, a:b, :].mean() for a, b in zip(starts[:-1], starts[1:])])


def reuse_matrices(params: Dict[str, Any]) -> List[np.ndarray]:
  """One matrix per dense block, rows s = 0..n (sources), columns l = 1..n then the transition
  (classifier after the last block); NaN where s is not an input of l. Raw means, see above."""
  blocks = sorted((k for k in params if k.startswith('block') and k[5:].isdigit()),
                  key=lambda k: int(k[5:]))
  if not blocks:
    raise ValueError('These parameters have no dense block (block1, ...): not a DenseNet.')
  matrices = []
  for b, block in enumerate(blocks):
    layers = sorted(params[block], key=lambda k: int(k[5:]))
    n = len(layers)
    width0 = _kernel(params[block], layers[0], 'conv1').shape[-2]
    last_conv = 'conv2' if 'conv2' in params[block][layers[0]] else 'conv1'
    k = _kernel(params[block], layers[0], last_conv).shape[-1]
    starts = [0] + [width0 + s * k for s in range(n + 1)]
    matrix = np.full((n + 1, n + 1), np.nan)
    for l, layer in enumerate(layers, start=1):
      matrix[:l, l - 1] = _source_means(_kernel(params[block], layer, 'conv1'), starts[:l + 1])
    after = (_kernel(params, f'transition{b + 1}', 'conv') if b + 1 < len(blocks)
             else _kernel(params, 'classifier'))
    if after.shape[-2] != starts[-1]:
      raise ValueError(f'{block}: the weights after it read {after.shape[-2]} channels, but '
                       f'its input ({width0}) and {n} layers of k={k} make {starts[-1]}.')
    matrix[:, n] = _source_means(after, starts)
    matrices.append(matrix)
  return matrices


def normalise_columns(matrix: np.ndarray) -> np.ndarray:
  """Each column divided by its largest entry (NaN entries stay NaN)."""
  return matrix / np.nanmax(matrix, axis=0, keepdims=True)


def load_params(workdir: str) -> Dict[str, Any]:
  """The parameters of the newest complete checkpoint in WORKDIR/checkpoints."""
  # pylint: disable=g-import-not-at-top
  import tempfile
  import orbax.checkpoint as ocp
  from densenet_jax.training import checkpointing
  from densenet_jax.training import staged_checkpoints
  # A run staged locally for the report has no checkpoints: read its origin's.
  origin = staging.origin(workdir)
  if not checkpointing.orbax_writes_directly(origin):  # s3://: Orbax reads a local copy.
    with tempfile.TemporaryDirectory() as local:
      step = staged_checkpoints.local_copy(origin, local)
      return ocp.StandardCheckpointer().restore(paths.resolve(step) / 'state')['params']
  directory = paths.resolve(origin) / 'checkpoints'
  # On an object store Orbax writes a step in place and marks it complete last.
  complete = ((lambda p: (p / 'commit_success.txt').exists()) if paths.is_remote(directory)
              else (lambda p: True))
  steps = sorted(int(p.name) for p in directory.iterdir()
                 if p.name.isdigit() and complete(p)) if directory.is_dir() else []
  if not steps:
    raise FileNotFoundError(f'{directory}: no checkpoint to read weights from.')
  return ocp.StandardCheckpointer().restore(directory / str(steps[-1]) / 'state')['params']


def plot(matrices: List[np.ndarray], path: str, title: str = '') -> None:
  """Figure 5: one heat map per block, sources down, target layers across."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(matrices), figsize=(3.4 * len(matrices) + 0.8, 3.6),
                           squeeze=False)
  for b, (ax, matrix) in enumerate(zip(axes[0], matrices)):
    n = matrix.shape[0] - 1
    image = ax.imshow(normalise_columns(matrix), cmap='jet', vmin=0, vmax=1)
    last = 'classifier' if b + 1 == len(matrices) else f'transition {b + 1}'
    ax.set_title(f'dense block {b + 1}\n(column {"C" if last == "classifier" else "T"}: {last})',
                 fontsize=9)
    ax.set_xlabel('target layer l')
    ax.set_ylabel('source layer s (0: block input)')
    ticks = sorted(set(range(0, n, max(1, (n + 1) // 6))) | {n})
    ax.set_xticks(ticks, [('C' if last == 'classifier' else 'T') if t == n else str(t + 1)
                          for t in ticks])
    ax.set_yticks(ticks, [str(t) for t in ticks])
  fig.colorbar(image, ax=axes[0].tolist(), label='mean |w|, per column / its max')
  if title:
    fig.suptitle(title, fontsize=10)
  fig.savefig(path, dpi=110, bbox_inches='tight')
  plt.close(fig)


def write_figure(workdir: str, path: str) -> None:
  plot(reuse_matrices(load_params(workdir)), path,
       title=f'Feature reuse: {paths.resolve(workdir).name}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    write_figure(flags.FLAGS.workdir, flags.FLAGS.output)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f'feature_reuse: {e}') from None
  print(f'Wrote {flags.FLAGS.output}')


if __name__ == '__main__':  # Flags only for the command: the report imports this module.
  flags.DEFINE_string('workdir', None, 'A trained run\'s workdir.')
  flags.DEFINE_string('output', None, 'The PNG file to write.')
  flags.mark_flags_as_required(['workdir', 'output'])
  app.run(main)
