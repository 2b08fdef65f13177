"""Inputs that LoRATrain and HypernetTrain share word for word."""
from comfy_api.latest import io

from ..trainer_core.config import PRECISIONS


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
