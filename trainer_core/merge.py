"""Bake a kohya LoRA into model weights: W' = W + strength * (alpha / rank) * up @ down.
LoHa and LoKr modules add their own dW (adapters/lycoris.py `file_weight_change`).

The product is computed in fp32 and cast back to W's dtype, so an fp16 checkpoint stays
fp16 and small LoRA deltas are not lost to fp16 rounding inside the matmul.
"""
from __future__ import annotations

import torch

from .errors import TrainerInputError
from .formats import network_modules

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"


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


def merge_lora_into_modules(
    targets: dict,
    lora_state_dict: dict,
    strength_unet: float = 1.0,
    strength_text_encoder: float = 1.0,
) -> None:
    """Merge in place into the `weight` of each target module (kohya name -> module).

    For a model the caller owns (a clone): the change is permanent.
    """
    modules = network_modules(lora_state_dict)
    unmapped = sorted(name for name in modules if name not in targets)
    if unmapped:
        raise TrainerInputError(
            f"{len(unmapped)} LoRA layer(s) have no matching layer in this model "
            f"(e.g. {', '.join(unmapped[:5])}). Use a LoRA trained on an SD1.x model."
        )
    with torch.no_grad():
        for name, module in modules.items():
            strength = _strength(name, strength_unet, strength_text_encoder)
            if strength == 0:
                continue
            weight = targets[name].weight
            weight.copy_(_merged_weight(name, weight, module, strength))


def _strength(name, strength_unet, strength_text_encoder):
    if name.startswith(UNET_PREFIX):
        return strength_unet
    if name.startswith(TEXT_ENCODER_PREFIX):
        return strength_text_encoder
    raise TrainerInputError(
        f"LoRA layer {name} is neither a UNet (lora_unet_) nor a text-encoder (lora_te_) layer "
        "of an SD1.x model."
    )


def _merged_weight(name, weight, module, strength):
    if module["type"] != "lora":
        return _merged_lycoris_weight(name, weight, module, strength)
    down = module["down"].to(weight.device, torch.float32)
    up = module["up"].to(weight.device, torch.float32)
    rank = down.shape[0]
    alpha = float(module["alpha"]) if module["alpha"] is not None else float(rank)
    up_2d, down_2d = up.flatten(1), down.flatten(1)
    if up_2d.shape != (weight.shape[0], rank) or down_2d.shape != (rank, weight[0].numel()):
        raise TrainerInputError(
            f"{name}: LoRA shapes up {list(up.shape)} / down {list(down.shape)} do not fit the "
            f"model weight {list(weight.shape)}: this LoRA was made for another model (SD2.x or SDXL?)."
        )
    delta = (up_2d @ down_2d) * (strength * alpha / rank)
    return (weight.to(torch.float32) + delta.reshape(weight.shape)).to(weight.dtype)


def _merged_lycoris_weight(name, weight, module, strength):
    from .adapters.lycoris import file_weight_change
    module = {k: v.to(weight.device) if isinstance(v, torch.Tensor) else v for k, v in module.items()}
    try:
        delta, scale = file_weight_change(module, weight.shape)
    except RuntimeError as error:  # factor shapes whose product is not the weight's shape
        raise TrainerInputError(
            f"{name}: this {module['type']} module does not fit the model weight {list(weight.shape)} "
            f"({error}): it was made for another model (SD2.x or SDXL?).") from None
    return (weight.to(torch.float32) + delta * (strength * scale)).to(weight.dtype)
