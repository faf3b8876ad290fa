"""Command-line tools beside training: `summary` (a model's stages and sizes) and `convert`
(published weights to densenet_jax variables)."""
