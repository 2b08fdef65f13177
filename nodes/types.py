"""Socket types the pack's nodes pass to each other, and the input values they share, declared
once and reused.

The socket types are prefixed so they never meet another pack's sockets of the same name.
"""
from comfy_api.latest import io

# The first choice of a file list (resume_from, lora_name, hypernetwork_name): no file.
NONE = "none"
# The largest seed: KSampler's range.
MAX_SEED = 0xffffffffffffffff

# A trainer_core.dataset.ImageDataset: images, captions, buckets and their options.
TrainingDataset = io.Custom("SD1_TRAINING_DATASET")
# A trainer_core.dataset.RegularizationSet: class images and their prior_loss_weight.
RegularizationSet = io.Custom("SD1_REGULARIZATION_SET")
