"""Training options shared by the LoRA and hypernetwork trainers, validated once at the boundary."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from .errors import TrainerInputError, name_of

OPTIMIZERS = ("AdamW", "AdamW8bit", "Prodigy")
LR_SCHEDULERS = ("constant", "cosine", "linear")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
LATENT_SAMPLING = ("once", "random")

# Options that change where or how often files are written, not what is learned. They are left
# out of the training key, so changing them never retrains.
OUTPUT_ONLY_FIELDS = (
    "output_dir", "output_name", "save_every_steps", "resume_from", "overwrite", "force_retrain",
    "sample_every_steps", "sample_prompt", "loss_csv",
)


@dataclass
class TrainConfig:
    """How to train. Defaults follow the guides' SD1.x LoRA recipe (512px, lr 1e-3, ~1400 steps)."""

    output_dir: str = ""
    output_name: str = "my_lora"
    steps: int = 1400
    batch_size: int = 1
    gradient_accumulation: int = 1
    seed: int = 0
    learning_rate: float = 1e-3
    text_encoder_learning_rate: float = 5e-5
    optimizer: str = "AdamW"
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    max_grad_norm: float = 1.0
    latent_sampling: str = "once"
    save_every_steps: int = 0
    resume_from: str = ""
    overwrite: bool = False
    force_retrain: bool = False
    sample_every_steps: int = 0
    sample_prompt: str = ""
    loss_csv: bool = False

    def validate(self) -> None:
        if not self.output_dir:
            raise TrainerInputError(f"{name_of('output_dir')} is empty: give the folder the trained files go to.")
        _positive_int("steps", self.steps, "the number of optimizer steps, e.g. 1400")
        _positive_int("batch_size", self.batch_size, "images per step, e.g. 1")
        _positive_int("gradient_accumulation", self.gradient_accumulation,
                      "micro-batches summed per optimizer step, e.g. 1")
        _non_negative_int("warmup_steps", self.warmup_steps)
        _non_negative_int("save_every_steps", self.save_every_steps, "0 saves only the final file")
        _non_negative_int("sample_every_steps", self.sample_every_steps, "0 turns samples off")
        _positive_float("learning_rate", self.learning_rate, "the guides use 1e-3 for LoRA, 1e-5 for hypernetworks")
        _positive_float("text_encoder_learning_rate", self.text_encoder_learning_rate, "e.g. 5e-5")
        _non_negative_float("min_snr_gamma", self.min_snr_gamma, "0 turns it off, 5 is usual")
        _non_negative_float("noise_offset", self.noise_offset, "0 turns it off, 0.05 is usual")
        _positive_float("max_grad_norm", self.max_grad_norm, "1.0 is usual")
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("latent_sampling", self.latent_sampling, LATENT_SAMPLING)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise TrainerInputError(f"{name_of('seed')} must be a whole number >= 0 (got {self.seed!r}).")

    def learning_key(self) -> dict:
        """The options that change what is learned (for the training cache)."""
        return {k: v for k, v in asdict(self).items() if k not in OUTPUT_ONLY_FIELDS}

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainerInputError(f"unknown training option(s) {unknown}; known options: {sorted(known)}")
        return cls(**values)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(name, value, hint):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TrainerInputError(f"{name_of(name)} must be a whole number >= 1 (got {value!r}): {hint}.")


def _non_negative_int(name, value, hint=""):
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        extra = f": {hint}" if hint else ""
        raise TrainerInputError(f"{name_of(name)} must be a whole number >= 0 (got {value!r}){extra}.")


def _positive_float(name, value, hint):
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise TrainerInputError(f"{name_of(name)} must be a number > 0 (got {value!r}): {hint}.")


def _non_negative_float(name, value, hint):
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise TrainerInputError(f"{name_of(name)} must be a number >= 0 (got {value!r}): {hint}.")


def _choice(name, value, options):
    if value not in options:
        raise TrainerInputError(f"{name_of(name)} must be one of {', '.join(options)} (got {value!r}).")
