"""Where images come from (TFDS, image folders, digits), the paper's augmentations and evaluation
crops, and the batches each process feeds its devices."""
