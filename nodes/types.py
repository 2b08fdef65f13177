"""Socket types the pack's nodes pass to each other, declared once and reused.

Prefixed so they never meet another pack's sockets of the same name.
"""
from comfy_api.latest import io

# A trainer_core.dataset.ImageDataset: images, captions, buckets and their options.
TrainingDataset = io.Custom("SD1_TRAINING_DATASET")
# A trainer_core.dataset.RegularizationSet: class images and their prior_loss_weight.
RegularizationSet = io.Custom("SD1_REGULARIZATION_SET")
