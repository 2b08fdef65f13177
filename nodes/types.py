"""Socket types the pack's nodes pass to each other, and the input values they share, declared
once and reused.

The socket types are prefixed so they never meet another pack's sockets of the same name.
"""
from comfy_api.latest import io

# The first choice of a file list (resume_from, lora_name, hypernetwork_name): no file.
NONE = "none"
# The largest seed: KSampler's range.
MAX_SEED = 0xffffffffffffffff



def model_files(kind: str, suffixes) -> list:
    """The files of a ComfyUI models folder (a folder_paths kind) ending in one of `suffixes`
    (lower case), for a file combo."""
    import folder_paths
    return [name for name in folder_paths.get_filename_list(kind) if name.lower().endswith(suffixes)]


def picked_path(kind: str, choice: str) -> str:
    """The full path of a file picked in a combo of that folder; "" for NONE."""
    if choice == NONE:
        return ""
    import folder_paths
    return folder_paths.get_full_path_or_raise(kind, choice)


# A trainer_core.dataset.ImageDataset: images, captions, buckets and their options.
TrainingDataset = io.Custom("SD1_TRAINING_DATASET")
# A trainer_core.dataset.RegularizationSet: class images and their prior_loss_weight.
RegularizationSet = io.Custom("SD1_REGULARIZATION_SET")
