"""The paper's Figure 4 (left): DenseNet, DenseNet-B, DenseNet-C and DenseNet-BC on C10+.

    python -m densenet_jax.experiments.sweep --config=configs/ablations/variants.py --workdir=DIR
    python -m densenet_jax.experiments.sweep --config=configs/ablations/variants.py:cpu --workdir=DIR

Parameter efficiency: test error against parameters, one line per variant, several depths
each, all with k = 12 and the paper's recipe. "-B" adds the bottleneck (BN-ReLU-Conv1x1 to 4k
maps before each 3x3 convolution), "-C" compression theta = 0.5 at transitions. The depth L
counts convolutions and the classifier, so a bottleneck layer (two convolutions) takes 6 per
three blocks and a plain one 3: L = 6n + 4 with the bottleneck (model 'densenet_bc'), 3n + 4
without ('densenet_cifar').

Default ('full'): L in {40, 100} without and {100, 250} with the bottleneck (the paper's
Table 2 depths; 8 runs of 300 epochs). ':cpu': L in {10, 22} without and {16, 28} with the
bottleneck, 1,200 steps each (8 runs; not yet timed on a 2-core CPU, where the
growth-compression study's 6 runs took 66 minutes).
"""

from configs import cifar_base
from configs.ablations import common
from densenet_jax.experiments import hyper
# name, bottleneck, compression: the four variants of the paper.
VARIANTS = (('densenet_cifar', False, 1.0),   # DenseNet
            ('densenet_bc', True, 1.0),       # DenseNet-B
            ('densenet_cifar', False, 0.5),   # DenseNet-C
            ('densenet_bc', True, 0.5))       # DenseNet-BC
DEPTHS = {'full': {False: (40, 100), True: (100, 250)},
          'cpu': {False: (10, 22), True: (16, 28)}}


def get_config(arg=None):
  config = cifar_base.get_config('densenet_bc', 'cifar10')
  config.model.depth = 100
  config.model.growth_rate = 12
  if common.size(arg) == 'cpu':
    common.cpu_budget(config)
  return config


def get_sweep(arg=None):
  depths = DEPTHS[common.size(arg)]
  names, bottlenecks, compressions, ls = [], [], [], []
  for name, bottleneck, compression in VARIANTS:
    for depth in depths[bottleneck]:
      names.append(name)
      bottlenecks.append(bottleneck)
      compressions.append(compression)
      ls.append(depth)
  return hyper.zipped(hyper.sweep('model.name', names),
                      hyper.sweep('model.bottleneck', bottlenecks),
                      hyper.sweep('model.compression', compressions),
                      hyper.sweep('model.depth', ls))
