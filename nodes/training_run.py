"""The part of a training node's run that LoRATrain and HypernetTrain share."""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

log = logging.getLogger(__name__)


def run_training(model, clip, vae, steps: int, hidden, train, train_text_encoder: bool = False):
    """Checks the model, builds the trainer's view of it, and runs `train(parts, callbacks)`
    with only the trained modules unfrozen, driving the node's progress bar.

    The Cancel button stops the trainer at its next step check (the last save stays) and the
    prompt then ends the way ComfyUI's own Cancel ends it.
    """
    from ..trainer_core.errors import TrainingCancelled
    from . import comfy_bridge as bridge

    bridge.check_sd1(model)
    progress = bridge.ComfyCallbacks(steps, hidden.unique_id)
    try:
        with bridge.training_models(model, clip) as (trained_model, trained_clip):
            parts = bridge.build_parts(trained_model, trained_clip, vae)
            parts.base_model_name = bridge.checkpoint_name(hidden.prompt, hidden.unique_id)
            trained = [parts.unet, parts.text_encoder] if train_text_encoder else [parts.unet]
            with bridge.training_context(*trained):
                result = train(parts, progress.callbacks())
    except TrainingCancelled as stopped:
        log.info("training cancelled at step %d; last save: %s", stopped.step, stopped.last_save)
        bridge.raise_interrupted()
    progress.raise_if_interrupted()
    return result


def saved_name(path: str, folder: str) -> str:
    """A saved file's name as ComfyUI's loaders list it: relative to the folder, with "/"."""
    return os.path.relpath(path, folder).replace(os.sep, "/")


def image_tensor(image) -> torch.Tensor:
    """A PIL image as a one-image ComfyUI IMAGE batch."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]
