"""The smallest single-file checkpoint ComfyUI's CheckpointLoaderSimple loads as SD1.x (SD15).

ComfyUI detects the model type from state-dict shapes: SD15 needs model_channels 320 and a
768-wide cross-attention context, but the UNet may have a single resolution level with one
res block, so the UNet is small. The text encoder must be a full CLIP-L (ComfyUI builds it
from a fixed config, and layers missing from the file would stay uninitialised). The VAE is a
TAESD, which ComfyUI accepts inside a checkpoint and which is tiny. Weights are random (seeded),
stored in fp16 to keep the file small. The modules are ComfyUI's own classes, so the key
names and shapes are exactly the ones its loader expects.
"""
import math

import torch

UNET_CONFIG = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1],
    "transformer_depth_output": [1, 1], "transformer_depth_middle": 1,
    "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "use_spatial_transformer": True, "use_linear_in_transformer": False, "legacy": False,
    "adm_in_channels": None, "use_checkpoint": False,
}
# The scale ComfyUI's VAELoader gives an SD1 TAESD, so latents match the SD15 latent format.
TAESD_SCALE = 0.18215


def tiny_sd1_state_dict(seed: int = 0) -> dict:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.ops import disable_weight_init
    from comfy.sd1_clip import SD1ClipModel
    from comfy.taesd.taesd import TAESD

    generator = torch.Generator().manual_seed(seed)
    unet = UNetModel(**UNET_CONFIG, dtype=torch.float32, device="cpu", operations=disable_weight_init)
    clip = SD1ClipModel(device="cpu", dtype=torch.float32)
    vae = TAESD()
    state = {}
    for key, tensor in unet.state_dict().items():
        state[f"model.diffusion_model.{key}"] = _random_like(key, tensor, generator)
    for key, tensor in clip.state_dict().items():
        # SD1 files hold the text model only (no projection, no logit scale).
        if key.startswith("clip_l.transformer.text_model."):
            state["cond_stage_model." + key[len("clip_l."):]] = _random_like(key, tensor, generator)
    for key, tensor in vae.state_dict().items():
        state[f"first_stage_model.{key}"] = _random_like(key, tensor, generator)
    state["first_stage_model.vae_scale"] = torch.tensor(TAESD_SCALE)
    state["first_stage_model.vae_shift"] = torch.tensor(0.0)
    return {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in state.items()}


def _random_like(key, tensor, generator):
    if not tensor.is_floating_point():
        return tensor.clone()
    if tensor.ndim <= 1:
        # The only 1-D weights are normalisation scales (GroupNorm, LayerNorm); biases start at 0.
        return torch.ones(tensor.shape) if key.endswith(".weight") else torch.zeros(tensor.shape)
    if "embedding" in key:
        return torch.randn(tensor.shape, generator=generator) * 0.02
    fan_in = math.prod(tensor.shape[1:])
    return torch.randn(tensor.shape, generator=generator) / math.sqrt(fan_in)


def write_tiny_sd1_checkpoint(path: str, seed: int = 0) -> str:
    from safetensors.torch import save_file
    save_file(tiny_sd1_state_dict(seed), path)
    return path
