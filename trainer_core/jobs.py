"""What differs between training one kind of adapter and another: the module, its hooks and its
file. The loop in train.py sees only the `TrainingJob` contract below."""
from __future__ import annotations

import os
from contextlib import AbstractContextManager
from dataclasses import asdict
from typing import Optional, Protocol, runtime_checkable

from torch import nn

from .adapters.hypernetwork import (Hypernetwork, load_hypernetwork, load_optimizer_sidecar, parse_layer_structure,
                                    save_hypernetwork, save_optimizer_sidecar)
from .adapters.lora import LoRANetwork
from .errors import TrainerInputError, name_of
from .formats import load_lora, lora_metadata, lycoris_metadata, safe_output_path, save_lora


@runtime_checkable
class TrainingJob(Protocol):
    """What the training loop needs of an adapter. A job is built from (parts, adapter config,
    train config, dataset) and owns the trainable module.

    Two methods are optional (the loop uses them when a job has them; see EmbeddingJob):
    `predict(noisy, timesteps, captions)` computes the output the loss is taken on (default: the
    UNet on the encoded captions), and `intermediate_name(output_name, step)` names a save made
    during training (default: `<output_name>_<step>`)."""

    kind: str                 # the adapter's name in messages: "LoRA", "hypernetwork"
    suffix: str               # its file's extension, ".safetensors" / ".pt"
    other_kind_hint: str      # said when resume_from is a file of another kind
    module: nn.Module         # what is trained: its train()/eval() mode is set by the loop
    trains_text_encoder: bool  # whether the text encoder's output changes (no caching of contexts)

    def describe(self) -> dict:
        """Everything about the adapter that changes what is learned (part of the cache key)."""

    def output_path(self, name: str) -> str:
        """The file `name` in the output folder, with this job's suffix."""

    def attached(self) -> AbstractContextManager:
        """Attach the adapter to the frozen parts for the block; detached on exit, the parts as before."""

    def param_groups(self) -> list:
        """Optimizer parameter groups, each with its learning rate."""

    def save(self, path: str, step: int, key: str, optimizer_name: str, optimizer_state: dict) -> list:
        """Write the adapter file at `path` (and any sidecar of its format); the paths written."""

    def load_weights(self, path: str) -> int:
        """Load a file this job saved (or a compatible one) into the module; the step it was at.
        Raises TrainerInputError naming the option that does not match the file."""

    def read_foreign_optimizer_state(self, path: str) -> Optional[dict]:
        """An optimizer state kept beside a file made by another tool, or None."""

    def file_state_dict(self) -> Optional[dict]:
        """The state dict last saved or loaded, as in the file (the nodes hand it to ComfyUI), or None."""


class LoRAJob:
    kind = "LoRA"
    suffix = ".safetensors"
    other_kind_hint = "a .pt file is a hypernetwork: train it with HypernetTrain / --adapter hypernetwork"

    def __init__(self, parts, lora_config, train_config, dataset):
        self.parts, self.lora_config, self.train_config, self.dataset = parts, lora_config, train_config, dataset
        text_targets = parts.text_encoder_lora_targets if lora_config.train_text_encoder else {}
        if not parts.unet_lora_targets:
            raise TrainerInputError("the model has no layers a LoRA can train (is it an SD1.x UNet?).")
        self.module = LoRANetwork(parts.unet_lora_targets, text_targets, lora_config,
                                  conv_targets=parts.unet_conv_targets)
        self._file_state = None

    @property
    def trains_text_encoder(self) -> bool:
        return bool(self.lora_config.train_text_encoder)

    def describe(self) -> dict:
        return self.description(self.lora_config)

    @classmethod
    def description(cls, lora_config) -> dict:
        """describe() from the config alone, before a model is loaded."""
        return {"kind": cls.kind, **lora_config.cache_fields()}

    def output_path(self, name: str) -> str:
        return safe_output_path(self.train_config.output_dir, name, self.suffix, overwrite=True)

    def attached(self):
        return self.module.attached(self.parts.device, self.parts.text_encoder_device)

    def param_groups(self) -> list:
        return self.module.param_groups(self.train_config.learning_rate,
                                        self.train_config.text_encoder_learning_rate)

    def save(self, path, step, key, optimizer_name, optimizer_state):
        # fp32, so the file holds exactly the trained weights (and resumes bit-for-bit).
        state_dict = self.module.kohya_state_dict(dtype=None)
        lora, train, data = self.lora_config, self.train_config, self.dataset
        summary = data.summary()
        metadata = lora_metadata(
            output_name=os.path.splitext(os.path.basename(path))[0],
            rank=lora.rank, alpha=lora.alpha, network_dropout=lora.dropout,
            base_model_name=self.parts.base_model_name, base_model_hash=self.parts.base_model_hash,
            resolution=data.config.resolution, max_train_steps=train.steps, steps=step,
            learning_rate=train.learning_rate, unet_lr=train.learning_rate,
            text_encoder_lr=train.text_encoder_learning_rate if lora.train_text_encoder else None,
            num_train_images=summary["num_train_images"], dataset_dirs=summary.get("dataset_dirs"),
            tag_frequency=summary.get("tag_frequency"), seed=train.seed,
            prediction_type=self.parts.prediction_type, trigger_phrase=data.config.instance_token,
            extra={"ss_optimizer": optimizer_name, "ss_lr_scheduler": train.lr_scheduler,
                   "ss_training_key": key, **lycoris_metadata(lora.network_type, lora.conv_rank,
                                                         lora.conv_alpha, lora.factor)})
        save_lora(path, state_dict, metadata, overwrite=True)
        self._file_state = state_dict
        return [path]

    def load_weights(self, path) -> int:
        state_dict, metadata = load_lora(path)
        expected = {float(m.alpha) for m in self.module.loras().values()}
        self.module.load_kohya_state_dict(state_dict)
        alphas = {float(v) for k, v in state_dict.items() if k.endswith(".alpha")}
        if alphas and alphas != expected:
            raise TrainerInputError(
                f"{os.path.basename(path)} was trained with alpha {', '.join(f'{a:g}' for a in sorted(alphas))} "
                f"but {name_of('alpha')} is set to {self.lora_config.alpha:g}: set {name_of('alpha')} to the file's "
                f"value to continue it.")
        self._file_state = state_dict
        return int(metadata.get("ss_steps", 0) or 0)

    def read_foreign_optimizer_state(self, path):
        return None

    def file_state_dict(self):
        return self._file_state


class HypernetworkJob:
    kind = "hypernetwork"
    suffix = ".pt"
    other_kind_hint = "a .safetensors file is a LoRA: continue it with LoRATrain / --adapter lora"

    def __init__(self, parts, hypernetwork_config, train_config, dataset):
        self.parts, self.train_config, self.dataset = parts, train_config, dataset
        self.hypernetwork_config = hypernetwork_config
        self.module = Hypernetwork.for_unet(parts.unet, hypernetwork_config)

    trains_text_encoder = False

    def describe(self) -> dict:
        return self.description(self.hypernetwork_config)

    @classmethod
    def description(cls, hypernetwork_config) -> dict:
        """describe() from the config alone, before a model is loaded."""
        return {"kind": cls.kind, **asdict(hypernetwork_config)}

    def output_path(self, name: str) -> str:
        return safe_output_path(self.train_config.output_dir, name, self.suffix, overwrite=True)

    def attached(self):
        return self.module.attached(self.parts.unet, self.parts.device)

    def param_groups(self) -> list:
        return self.module.param_groups(self.train_config.learning_rate)

    def save(self, path, step, key, optimizer_name, optimizer_state):
        name = os.path.splitext(os.path.basename(path))[0]
        save_hypernetwork(path, self.module, name=name, step=step,
                          sd_checkpoint=self.parts.base_model_hash[:10],
                          sd_checkpoint_name=self.parts.base_model_name, overwrite=True)
        sidecar = save_optimizer_sidecar(path, optimizer_name, optimizer_state, overwrite=True)
        return [path, sidecar]

    def load_weights(self, path) -> int:
        loaded, step = load_hypernetwork(path)
        ours, theirs = self.hypernetwork_config, loaded.config
        for name in ("layer_structure", "activation", "layer_norm", "activate_output"):
            mine, file_value = _comparable(name, getattr(ours, name)), _comparable(name, getattr(theirs, name))
            if mine != file_value:
                raise TrainerInputError(
                    f"{os.path.basename(path)} has {name_of(name)} {getattr(theirs, name)!r} but this run has "
                    f"{getattr(ours, name)!r}: set {name_of(name)} to the file's value to continue it, or start a "
                    f"new training.")
        if sorted(loaded.widths) != sorted(self.module.widths):
            raise TrainerInputError(
                f"{os.path.basename(path)} was made for attention widths {sorted(loaded.widths)}, this model "
                f"has {sorted(self.module.widths)}: it belongs to another kind of model.")
        self.module.load_state_dict(loaded.state_dict())
        return step

    def read_foreign_optimizer_state(self, path):
        """A hypernetwork started in A1111 keeps its optimizer state in `<file>.optim`."""
        sidecar = load_optimizer_sidecar(path)
        return None if sidecar is None else sidecar.get("optimizer_state_dict")

    def file_state_dict(self):
        return None


def _comparable(name, value):
    if name == "layer_structure":
        return [float(x) for x in parse_layer_structure(value)]
    return value
