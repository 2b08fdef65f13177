"""What the trainer needs from a model, and nothing more.

A backend (diffusers for the CLI and tests, the ComfyUI bridge inside ComfyUI) builds a
`ModelParts` from its own objects. The trainer only calls these functions and hooks the
modules named here, so it never imports ComfyUI or cares where the weights came from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn


@dataclass
class ModelParts:
    # The denoiser. LoRA and hypernetwork hooks go on its submodules.
    unet: nn.Module
    # (noisy latents [B,4,h,w], integer timesteps [B] in 0..999, context [B,77,768]) -> eps or v
    predict_noise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    # The text encoder module (hooked when it trains) and a function from captions to context.
    # Gradients flow through encode_text when a text-encoder LoRA is attached.
    text_encoder: nn.Module
    encode_text: Callable[[list], torch.Tensor]
    # (images [B,3,H,W] in [-1,1], generator=None) -> latents already multiplied by the VAE scale
    # factor: the posterior's mean, or with a torch.Generator a sample from it (a VAE without a
    # posterior, such as TAESD, gives the same latents either way).
    encode_images: Callable[..., torch.Tensor]
    # Latents (scaled) -> images [B,3,H,W] in [-1,1]; used for sample previews only.
    decode_latents: Optional[Callable[[torch.Tensor], torch.Tensor]]
    # The DDPM schedule the model was trained with: alphas_cumprod[t] for t in 0..999.
    alphas_cumprod: torch.Tensor
    prediction_type: str  # "epsilon" or "v_prediction"
    # kohya module name -> module, for every module a LoRA may patch (Linear or 1x1 Conv2d).
    unet_lora_targets: dict = field(default_factory=dict)
    text_encoder_lora_targets: dict = field(default_factory=dict)
    # kohya name -> Conv2d of the UNet's ResNets (conv1, conv2, conv_shortcut) and down/up
    # samplers, which LoCon, LoHa and LoKr also train.
    unet_conv_targets: dict = field(default_factory=dict)
    # Where the UNet computes (its LoRAs and hypernetwork run there) and where the text encoder
    # computes (None: the same device). With weights streamed from the CPU they differ from the
    # weights' device.
    device: torch.device = torch.device("cpu")
    text_encoder_device: Optional[torch.device] = None
    # Weights dtype of the frozen model (fp32 on CPU; fp16/bf16 on a GPU when asked).
    dtype: torch.dtype = torch.float32
    # Identifies the base model for file metadata and the training cache.
    base_model_hash: str = ""
    base_model_name: str = ""
    # Textual inversion (None where a backend cannot train embeddings): the token ids of a text
    # (without start/end tokens), the input-embedding rows [k, width] of token ids, and
    # (captions, {name: [n, width] vectors}) -> context, reading `embedding:<name>` in a caption
    # as ComfyUI's prompts do, with gradients flowing into the vectors.
    tokenize: Optional[Callable[[str], list]] = None
    token_embeddings: Optional[Callable[[list], torch.Tensor]] = None
    encode_text_with_embeddings: Optional[Callable[[list, dict], torch.Tensor]] = None
