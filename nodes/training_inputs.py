"""Inputs that LoRATrain and HypernetTrain share word for word."""
from comfy_api.latest import io

from ..trainer_core.config import PRECISIONS
from .types import MAX_SEED, RegularizationSet, TrainingDataset


def model_and_data_inputs() -> list:
    return [
        io.Model.Input("model", tooltip="The SD1.x model to train on, from a checkpoint loader."),
        io.Clip.Input("clip", tooltip="The text encoder (CLIP) from the same checkpoint loader; it turns the "
                                      "captions into what the model reads."),
        io.Vae.Input("vae", tooltip="The VAE from the same checkpoint loader; it turns the "
                                    "training pictures into the model's latent space."),
        TrainingDataset.Input("dataset", tooltip="The pictures and captions from LoadDataset."),
        RegularizationSet.Input(
            "regularization", optional=True,
            tooltip="Optional: class pictures from RegImages, trained alongside so the model "
                    "still draws the ordinary class without your instance token."),
    ]


def seed_and_save_inputs() -> list:
    return [
        io.Int.Input(
            "seed", default=0, min=0, max=MAX_SEED, control_after_generate=False,
            tooltip="Makes training repeatable: the same seed, settings and pictures give the "
                    "same file (and let a re-queue reuse it)."),
        io.Int.Input(
            "save_every_steps", default=0, min=0, max=1000000,
            tooltip="Also save the file every this many steps (<output_name>_<step>), to pick "
                    "the best one or resume later. 0 = only the final file."),
        io.Int.Input(
            "sample_every_steps", default=0, min=0, max=1000000,
            tooltip="Show a sample picture of '<instance_token> <class_token>' beside the loss "
                    "chart every this many steps (costs time). 0 = loss chart only."),
    ]


def batch_inputs() -> list:
    return [
        io.Int.Input(
            "batch_size", default=1, min=1, max=64,
            tooltip="Pictures per step. More is smoother but needs more memory; 1 is fine."),
        io.Int.Input(
            "gradient_accumulation", default=1, min=1, max=256,
            tooltip="Adds up this many batches before each step: acts like a bigger batch "
                    "without the memory. 1 = off."),
    ]


def memory_inputs() -> list:
    return [
        io.Combo.Input(
            "precision", options=list(PRECISIONS), default="auto",
            tooltip="Number format while training. auto: fp16/bf16 on an NVIDIA GPU (faster, "
                    "less memory), fp32 on a CPU (where half precision is slower)."),
        io.Boolean.Input(
            "gradient_checkpointing", default=False,
            tooltip="Saves a lot of GPU memory at about 20-30% more time. Turn on for 8 GB cards."),
    ]


def replace_inputs() -> list:
    return [
        io.Boolean.Input(
            "overwrite", default=False,
            tooltip="Allow replacing an existing file of the same name that was trained with "
                    "other settings. Off: such a clash stops with a message instead."),
        io.Boolean.Input(
            "force_retrain", default=False,
            tooltip="Train again even if a file trained with exactly these settings exists."),
    ]
