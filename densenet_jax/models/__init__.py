"""DenseNet and ResNet models: modules, the papers' named variants and `create_model`."""

from densenet_jax.models.dense_layer import DenseLayer
from densenet_jax.models.densenet import DenseBlock
from densenet_jax.models.densenet import DenseNet
from densenet_jax.models.densenet import Transition
from densenet_jax.models.family import gmacs
from densenet_jax.models.family import min_image_size
from densenet_jax.models.resnet import ResNet
from densenet_jax.models.variants import CIFAR_MODELS
from densenet_jax.models.variants import create_model
from densenet_jax.models.variants import densenet_cifar
from densenet_jax.models.variants import DENSENET_NAMES
from densenet_jax.models.variants import IMAGENET_MODELS
from densenet_jax.models.variants import MODEL_FIELDS
from densenet_jax.models.variants import MODEL_NAMES
