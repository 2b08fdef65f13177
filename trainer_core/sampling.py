"""A small DDIM sampler on ModelParts, for sample previews and the CLI's before/after grid.

Inside ComfyUI the example workflows use KSampler; this sampler exists so trainer_core can show
what it learned without a host application.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


@torch.no_grad()
def sample_latents(parts, prompts: list, seed: int = 0, width: int = 512, height: int = 512,
                   steps: int = 20, guidance_scale: float = 7.0, negative_prompt: str = "") -> torch.Tensor:
    device = parts.device
    alphas = parts.alphas_cumprod.to(device, torch.float32)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((len(prompts), 4, height // 8, width // 8), generator=generator).to(device)
    context = parts.encode_text(list(prompts) + [negative_prompt] * len(prompts))
    timesteps = torch.linspace(len(alphas) - 1, 0, steps).round().long().tolist()
    for i, t in enumerate(timesteps):
        alpha = alphas[t]
        alpha_next = alphas[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0, device=device)
        t_batch = torch.full((2 * len(prompts),), t, device=device, dtype=torch.long)
        output = parts.predict_noise(torch.cat([latents, latents]).to(parts.dtype), t_batch, context).float()
        conditional, unconditional = output.chunk(2)
        output = unconditional + guidance_scale * (conditional - unconditional)
        if parts.prediction_type == "v_prediction":
            x0 = alpha.sqrt() * latents - (1 - alpha).sqrt() * output
            eps = alpha.sqrt() * output + (1 - alpha).sqrt() * latents
        else:
            eps = output
            x0 = (latents - (1 - alpha).sqrt() * eps) / alpha.sqrt()
        latents = alpha_next.sqrt() * x0 + (1 - alpha_next).sqrt() * eps
    return latents


def latents_to_images(parts, latents: torch.Tensor) -> list:
    with torch.no_grad():
        pixels = parts.decode_latents(latents.to(parts.dtype)).float()
    pixels = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]


def sample_images(parts, prompts: list, seed: int = 0, width: int = 512, height: int = 512,
                  steps: int = 20, guidance_scale: float = 7.0) -> list:
    latents = sample_latents(parts, prompts, seed=seed, width=width, height=height, steps=steps,
                             guidance_scale=guidance_scale)
    return latents_to_images(parts, latents)
