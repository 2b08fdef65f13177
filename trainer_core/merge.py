"""Bake a kohya LoRA into model weights: W' = W + strength * (alpha / rank) * up @ down,
and save the result as a single-file SD1.x checkpoint (MergeLoRAToCkpt and `python -m
trainer_core merge`).
LoHa and LoKr modules add their own dW (adapters/lycoris.py `file_weight_change`).

The product is computed in fp32 and cast back to W's dtype, so an fp16 checkpoint stays
fp16 and small LoRA deltas are not lost to fp16 rounding inside the matmul.
"""
from __future__ import annotations

import logging
import os
import re

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .adapters.lycoris import file_weight_change
from .errors import TrainerInputError, name_of
from .formats import (TEXT_ENCODER_PREFIX, UNET_PREFIX, atomic_write, lora_file_hashes, module_alpha,
                      network_modules)

log = logging.getLogger(__name__)

SAVE_PRECISIONS = {"fp16": torch.float16, "fp32": torch.float32}
# Metadata that decides what a merged file contains (the title and the base's file name do not).
SAME_MERGE_KEYS = ("merge.base_model_hash", "merge.lora_hash", "merge.strength_model", "merge.strength_clip",
                   "merge.precision")



def merge_lora(
    base_state_dict: dict,
    lora_state_dict: dict,
    kohya_to_weight_key: dict,
    strength_unet: float = 1.0,
    strength_text_encoder: float = 1.0,
) -> dict:
    """A new state dict with the LoRA merged in; weights the LoRA does not touch are shared.

    `kohya_to_weight_key` maps each kohya module name to the key of its weight in
    `base_state_dict` (for ComfyUI: `comfy.lora.model_lora_keys_unet/clip`).
    """
    modules = network_modules(lora_state_dict)
    unmapped = sorted(name for name in modules if name not in kohya_to_weight_key)
    if unmapped:
        raise TrainerInputError(
            f"{len(unmapped)} LoRA layer(s) have no matching weight in this model "
            f"(e.g. {', '.join(unmapped[:5])}). The LoRA was made for another model type; "
            "use one trained on an SD1.x model."
        )
    missing = sorted(k for k in (kohya_to_weight_key[n] for n in modules) if k not in base_state_dict)
    if missing:
        raise TrainerInputError(
            f"The checkpoint lacks {len(missing)} weight(s) the LoRA patches (e.g. {', '.join(missing[:5])}). "
            "Is it a complete SD1.x checkpoint?"
        )
    merged = dict(base_state_dict)
    for name, module in modules.items():
        strength = _strength(name, strength_unet, strength_text_encoder)
        if strength == 0:
            continue
        key = kohya_to_weight_key[name]
        merged[key] = _merged_weight(name, merged[key], module, strength)
    return merged


def _strength(name, strength_unet, strength_text_encoder):
    if name.startswith(UNET_PREFIX):
        return strength_unet
    if name.startswith(TEXT_ENCODER_PREFIX):
        return strength_text_encoder
    raise TrainerInputError(
        f"LoRA layer {name} is neither a UNet ({UNET_PREFIX}) nor a text-encoder ({TEXT_ENCODER_PREFIX}) "
        "layer of an SD1.x model."
    )


def _merged_weight(name, weight, module, strength):
    if module["type"] != "lora":
        return _merged_lycoris_weight(name, weight, module, strength)
    down = module["down"].to(weight.device, torch.float32)
    up = module["up"].to(weight.device, torch.float32)
    rank = down.shape[0]
    alpha = module_alpha(module)
    up_2d, down_2d = up.flatten(1), down.flatten(1)
    if up_2d.shape != (weight.shape[0], rank) or down_2d.shape != (rank, weight[0].numel()):
        raise TrainerInputError(
            f"{name}: LoRA shapes up {list(up.shape)} / down {list(down.shape)} do not fit the "
            f"model weight {list(weight.shape)}: this LoRA was made for another model (SD2.x or SDXL?)."
        )
    delta = (up_2d @ down_2d) * (strength * alpha / rank)
    return (weight.to(torch.float32) + delta.reshape(weight.shape)).to(weight.dtype)


def _merged_lycoris_weight(name, weight, module, strength):
    module = {k: v.to(weight.device) if isinstance(v, torch.Tensor) else v for k, v in module.items()}
    try:
        delta, scale = file_weight_change(module, weight.shape)
    except RuntimeError as error:  # factor shapes whose product is not the weight's shape
        raise TrainerInputError(
            f"{name}: this {module['type']} module does not fit the model weight {list(weight.shape)} "
            f"({error}): it was made for another model (SD2.x or SDXL?).") from None
    return (weight.to(torch.float32) + delta * (strength * scale)).to(weight.dtype)


# ---------------------------------------------------------------------------------------
# The merged checkpoint file


def cast_for_saving(state_dict: dict, precision: str) -> dict:
    """Floating-point tensors in the chosen precision; integer tensors (position ids) as they are."""
    dtype = SAVE_PRECISIONS[precision]
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}


def merge_metadata(title, base_model, base_model_hash, lora_name, lora_hash, strength_model, strength_clip,
                   precision) -> dict:
    """What the file was made from; A1111 and ComfyUI show the modelspec keys."""
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.title": title,
        "merge.base_model": base_model,
        "merge.base_model_hash": base_model_hash,
        "merge.lora": lora_name,
        "merge.lora_hash": lora_hash,
        "merge.strength_model": f"{strength_model:g}",
        "merge.strength_clip": f"{strength_clip:g}",
        "merge.precision": precision,
    }


def lora_hash(lora_state_dict) -> str:
    """The LoRA file's sshs_model_hash: the sha256 of its tensor bytes."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict.items()}
    return lora_file_hashes(tensors, {})[0]


def already_merged(path, metadata, overwrite) -> bool:
    """True when an existing file at `path` is this very merge (a re-queue after a restart) and
    is kept as it is; raises when it is another file and overwrite is off."""
    if overwrite or not os.path.exists(path):
        return False
    if not _made_from(path, metadata):
        raise TrainerInputError(
            f"{path} already exists (not merged from this model, LoRA and settings). Choose another "
            f"{name_of('output_name')}, or turn on {name_of('overwrite')} to replace it.")
    log.info("%s was already merged from the same model, LoRA and settings; not written again", path)
    return True


def _made_from(path, metadata) -> bool:
    try:
        with safe_open(path, framework="pt") as f:
            saved = f.metadata() or {}
    except Exception:  # not ours, or not a safetensors file at all
        return False
    return all(saved.get(key) == metadata[key] for key in SAME_MERGE_KEYS)


def save_checkpoint(path, state_dict, metadata, overwrite):
    atomic_write(path, lambda tmp: save_file(state_dict, tmp, metadata), overwrite=overwrite)
    log.info("saved merged checkpoint %s", path)


def merge_into_checkpoint(base_state_dict, lora_state_dict, kohya_to_weight_key, strength_model,
                          strength_clip, precision, path="", metadata=None, overwrite=False) -> dict:
    """The merged state dict in `precision`, also saved to `path` (with `metadata`) when a path
    is given, unless that file already is this merge."""
    keep_existing = bool(path) and already_merged(path, metadata, overwrite)
    merged = merge_lora(base_state_dict, lora_state_dict, kohya_to_weight_key, strength_model, strength_clip)
    # What is returned is exactly what is (or would be) saved, so a caller's outputs generate
    # like the file.
    merged = cast_for_saving(merged, precision)
    if path and not keep_existing:
        save_checkpoint(path, merged, metadata, overwrite)
    return merged


# ---------------------------------------------------------------------------------------
# kohya names in a single-file SD1.x checkpoint (without ComfyUI)

UNET_CHECKPOINT_PREFIX = "model.diffusion_model."
TEXT_ENCODER_CHECKPOINT_PREFIX = "cond_stage_model.transformer."
_TRANSFORMER_LAYER = re.compile(
    r"^(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))"
    r"\.weight$")
_TEXT_LAYER = re.compile(r"^text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight$")


def checkpoint_lora_keys(state_dict) -> dict:
    """kohya LoRA name -> weight key for every layer a kohya LoRA can patch in a single-file
    SD1.x (LDM layout) checkpoint; the same map ComfyUI's LoraLoader builds for it.

    LDM numbers a UNet's blocks across levels (input_blocks.N.1 is the attention of the N-th
    block); diffusers and kohya count per level (down_blocks.level.attentions.index).
    """
    levels = 1 + sum(1 for k in state_dict if re.match(r"model\.diffusion_model\.input_blocks\.\d+\.0\.op\.weight$", k))
    blocks = len({m.group(1) for k in state_dict
                  for m in [re.match(r"model\.diffusion_model\.input_blocks\.(\d+)\.", k)] if m})
    per_level = blocks // levels  # res blocks per level + 1 (a downsampler, or the stem for level 0)
    keys = {}
    for key in state_dict:
        if key.startswith(UNET_CHECKPOINT_PREFIX):
            path = _diffusers_unet_path(key[len(UNET_CHECKPOINT_PREFIX):], per_level)
            if path:
                keys[UNET_PREFIX + path.replace(".", "_")] = key
        elif key.startswith(TEXT_ENCODER_CHECKPOINT_PREFIX):
            rest = key[len(TEXT_ENCODER_CHECKPOINT_PREFIX):]
            if _TEXT_LAYER.match(rest):
                keys[TEXT_ENCODER_PREFIX + rest[:-len(".weight")].replace(".", "_")] = key
    return keys


# A ResNet block's convolutions (LoCon trains them), LDM name -> diffusers name.
_RESNET_CONVS = {"in_layers.2": "conv1", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _diffusers_unet_path(ldm_key: str, per_level: int):
    conv = _diffusers_conv_path(ldm_key, per_level)
    if conv:
        return conv
    match = re.match(r"^(input_blocks|output_blocks)\.(\d+)\.1\.(.+)$", ldm_key)
    if match:
        kind, number, rest = match.group(1), int(match.group(2)), match.group(3)
        if kind == "input_blocks":  # block 0 is the stem: level i's attentions are 1 + i*per_level + j
            level, index = divmod(number - 1, per_level)
            prefix = f"down_blocks.{level}.attentions.{index}"
        else:
            level, index = divmod(number, per_level)
            prefix = f"up_blocks.{level}.attentions.{index}"
    elif ldm_key.startswith("middle_block.1."):
        prefix, rest = "mid_block.attentions.0", ldm_key[len("middle_block.1."):]
    else:
        return None
    return f"{prefix}.{rest[:-len('.weight')]}" if _TRANSFORMER_LAYER.match(rest) else None


def _diffusers_conv_path(ldm_key: str, per_level: int):
    """The diffusers path of a ResNet or sampler convolution (what a LoCon trains), or None."""
    if not ldm_key.endswith(".weight"):
        return None
    key = ldm_key[:-len(".weight")]
    match = re.match(r"^(input_blocks|output_blocks)\.(\d+)\.0\.(in_layers\.2|out_layers\.3|skip_connection)$", key)
    if match:
        kind, number, layer = match.group(1), int(match.group(2)), _RESNET_CONVS[match.group(3)]
        if kind == "input_blocks":
            if number == 0:
                return None
            level, index = divmod(number - 1, per_level)
            return f"down_blocks.{level}.resnets.{index}.{layer}"
        level, index = divmod(number, per_level)
        return f"up_blocks.{level}.resnets.{index}.{layer}"
    match = re.match(r"^middle_block\.(0|2)\.(in_layers\.2|out_layers\.3|skip_connection)$", key)
    if match:
        return f"mid_block.resnets.{int(match.group(1)) // 2}.{_RESNET_CONVS[match.group(2)]}"
    match = re.match(r"^input_blocks\.(\d+)\.0\.op$", key)
    if match:
        return f"down_blocks.{(int(match.group(1)) - 1) // per_level}.downsamplers.0.conv"
    match = re.match(r"^output_blocks\.(\d+)\.[12]\.conv$", key)
    if match:
        return f"up_blocks.{int(match.group(1)) // per_level}.upsamplers.0.conv"
    return None
