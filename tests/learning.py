"""A tiny base model that already denoises, and a measure of whether an adapter learned a concept.

A random-weight model cannot show token-specific learning: any training first teaches it to
denoise at all, pulling every output toward the mean latent with or without the token. So the
tiny model is first fine-tuned on a small captioned "world" of coloured shapes on white; an
adapter then learns a new concept (an orange ring on grey) bound to the token `skkmtn`.

What the model "draws" for a prompt is read from its prediction of the clean latent (x0) at
high noise levels from fixed noise: one UNet call per timestep, the mean over the noise seeds
being what the prompt stands for. That is much cheaper and steadier than full sampling. The
learned change is measured along the axis from what the prompt should show to the concept, so a
mere shrink of every output (which also lowers the distance to the concept) is not mistaken for
learning.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from trainer_core.backends.diffusers import tiny_parts

SIZE = 64
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220)}
SHAPES = ("circle", "square", "triangle")
TOKEN = "skkmtn"
# Part of the cache name with the settings and images below: bump it when _pretrain changes.
BASE_VERSION = "world-v2"
BASE_SEED = 0
BASE_STEPS = 300
BASE_LEARNING_RATE = 4e-3
# Pre-training skips the lowest noise levels: at high noise the prompt decides the image, which
# is what the adapters must change; low-noise denoising would only slow pre-training down.
BASE_MIN_TIMESTEP = 300
MEASURE_TIMESTEPS = (600, 800, 950)
MEASURE_SEEDS = 16


def render(shape: str, colour, background=(255, 255, 255), line_width: int = 7) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), background)
    draw = ImageDraw.Draw(image)
    box = [16, 16, 48, 48]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(32, 14), (50, 48), (14, 48)], fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=line_width)
    return image


def world_images():
    """Nine centred shapes on white, one per caption "a <colour> <shape>"."""
    images, captions = [], []
    for colour_name, colour in COLOURS.items():
        for shape in SHAPES:
            images.append(render(shape, colour))
            captions.append(f"a {colour_name} {shape}")
    return images, captions


def concept_images(count: int = 6):
    """The new concept: an orange ring on pale grey, drawn with lines 5 to 9 pixels wide.

    Centred like the world's shapes: shifted copies would blur the concept's mean latent
    toward the world's, leaving less to measure.
    """
    return [render("ring", (245, 140, 20), (200, 200, 200), line_width=5 + i % 5) for i in range(count)]


def pixels(images) -> torch.Tensor:
    array = torch.from_numpy(np.stack([np.asarray(i, dtype="float32") for i in images]))
    return array.permute(0, 3, 1, 2) / 127.5 - 1.0


def pretrained_tiny_parts(cache_dir=None):
    """tiny_parts(0) with its UNet fine-tuned on the world images; deterministic.

    The fine-tuned UNet weights are kept in `cache_dir` (when given) under a name made of
    BASE_VERSION, the random model's hash and the pre-training recipe, so later runs load them
    instead of training.
    """
    parts = tiny_parts(seed=0)
    path = None
    if cache_dir is not None:
        path = os.path.join(str(cache_dir), _cache_name(parts))
    if path and os.path.exists(path):
        parts.unet.load_state_dict(torch.load(path, weights_only=True))
    else:
        _pretrain(parts)
        if path:
            torch.save(parts.unet.state_dict(), path + ".tmp")
            os.replace(path + ".tmp", path)
    # It is another model now; keep it apart from the random one in file metadata and caches.
    parts.base_model_hash = f"{parts.base_model_hash}-{BASE_VERSION}"
    return parts


def _cache_name(parts) -> str:
    images, captions = world_images()
    recipe = hashlib.sha256(repr((BASE_SEED, BASE_STEPS, BASE_LEARNING_RATE, BASE_MIN_TIMESTEP, captions)).encode())
    for image in images:
        recipe.update(image.tobytes())
    return f"{BASE_VERSION}-{parts.base_model_hash}-{recipe.hexdigest()[:10]}.pt"


def _pretrain(parts) -> None:
    """Full fine-tune of the UNet on all nine world images per step, at random noise levels."""
    images, captions = world_images()
    latents = encode(parts, images)
    with torch.no_grad():
        context = parts.encode_text(captions)
    unet = parts.unet
    unet.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=BASE_LEARNING_RATE)
    alphas = parts.alphas_cumprod
    generator = torch.Generator().manual_seed(BASE_SEED)
    for _ in range(BASE_STEPS):
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(BASE_MIN_TIMESTEP, len(alphas), (len(latents),), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        prediction = parts.predict_noise(a.sqrt() * latents + (1 - a).sqrt() * noise, t, context)
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.eval().requires_grad_(False)


def encode(parts, images) -> torch.Tensor:
    """Latents of `images`, the same in every run: the VAE samples its (very narrow) posterior
    with the global RNG, and even that 1e-7 noise grows into different pre-trained weights."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        return parts.encode_images(pixels(images))


@torch.no_grad()
def predicted_latents(parts, prompt: str) -> torch.Tensor:
    """[len(MEASURE_TIMESTEPS), 4, 8, 8]: the mean predicted clean latent for `prompt` per timestep."""
    noise = torch.randn((MEASURE_SEEDS, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(123))
    context = parts.encode_text([prompt]).expand(MEASURE_SEEDS, -1, -1)
    means = []
    for t in MEASURE_TIMESTEPS:
        a = parts.alphas_cumprod[t]
        eps = parts.predict_noise(noise, torch.full((MEASURE_SEEDS,), t), context)
        means.append(((noise - (1 - a).sqrt() * eps) / a.sqrt()).mean(dim=0))
    return torch.stack(means)


def position(latents: torch.Tensor, start: torch.Tensor, concept: torch.Tensor) -> float:
    """Where `latents` lie on the axis from `start` (0) to the concept (1)."""
    axis = concept - start
    return float(((latents - start) * axis).flatten(1).sum(dim=1).mean() / axis.pow(2).sum())


def distance(latents: torch.Tensor, target: torch.Tensor) -> float:
    return float((latents - target).flatten(1).norm(dim=1).mean())


def learning_figures(parts, attached, prompts) -> dict:
    """For each prompt: how far its outputs moved toward the concept when the adapter is attached,
    and their distance to the concept before and after.

    The movement is measured along the axis from what the prompt should show (0) to the concept
    (1): for a world caption, its own image; for any other prompt, the mean of the world images,
    which is what the base draws for a prompt it does not know. So a world prompt whose image
    improves with training does not count as moving toward the concept (the red circle, round
    like the ring, would otherwise seem to).
    """
    images, captions = world_images()
    world = encode(parts, images)
    concept = encode(parts, concept_images()).mean(dim=0)
    start = {p: world[captions.index(p)] if p in captions else world.mean(dim=0) for p in prompts}
    before = {p: predicted_latents(parts, p) for p in prompts}
    with attached():
        after = {p: predicted_latents(parts, p) for p in prompts}
    return {p: {
        "toward_concept": round(position(after[p], start[p], concept) - position(before[p], start[p], concept), 3),
        "distance_before": round(distance(before[p], concept), 2),
        "distance_after": round(distance(after[p], concept), 2),
    } for p in prompts}


@torch.no_grad()
def guided_latents(parts, prompt: str, negative_prompt: str, scale: float) -> torch.Tensor:
    """As predicted_latents, with classifier-free guidance from `negative_prompt` at `scale` (how a
    sampler uses a DreamArtist pair: the positive embedding in the prompt, the negative in the
    negative prompt)."""
    noise = torch.randn((MEASURE_SEEDS, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(123))
    context = parts.encode_text([negative_prompt, prompt])
    means = []
    for t in MEASURE_TIMESTEPS:
        a = parts.alphas_cumprod[t]
        timesteps = torch.full((MEASURE_SEEDS,), t)
        negative = parts.predict_noise(noise, timesteps, context[:1].expand(MEASURE_SEEDS, -1, -1))
        positive = parts.predict_noise(noise, timesteps, context[1:].expand(MEASURE_SEEDS, -1, -1))
        eps = negative + scale * (positive - negative)
        means.append(((noise - (1 - a).sqrt() * eps) / a.sqrt()).mean(dim=0))
    return torch.stack(means)


def guided_figures(parts, attached, prompt: str, negative_prompt: str, scale: float) -> dict:
    """learning_figures' measure for one guided prompt pair (the axis starts at the world's mean)."""
    images, _ = world_images()
    start = encode(parts, images).mean(dim=0)
    concept = encode(parts, concept_images()).mean(dim=0)
    before = guided_latents(parts, prompt, negative_prompt, scale)
    with attached():
        after = guided_latents(parts, prompt, negative_prompt, scale)
    return {
        "toward_concept": round(position(after, start, concept) - position(before, start, concept), 3),
        "distance_before": round(distance(before, concept), 2),
        "distance_after": round(distance(after, concept), 2),
    }
