"""The demo model: a small SD1-shaped model pre-trained on a synthetic world of coloured shapes.

With no --model, the CLI trains this model on the sample dataset, so the first run shows
learning. The world knows blue, green and purple circles, squares and triangles, on white or on
the background colours the sample dataset's captions name, and nothing else; the sample dataset
(the orange round creature `skkmtn`) teaches it a new concept that no prompt could draw before.
Its regularization set is captioned circles from the same world (`sample_regularization`).

`python -m trainer_core.demo` rebuilds the model folder and the regularization set from this
file (seeded; about an hour on 2 CPU cores, 20 minutes of it the VAE). The model is a diffusers
StableDiffusionPipeline folder (fp16 weights, the real SD1 CLIP tokenizer) for 128 px pictures
and 16x16 latents.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import time

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from .backends.diffusers import DEMO_MODEL_DIR, SD15_CONFIG_DIR, schedule_from_config
from .formats import atomic_write

log = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = DEMO_MODEL_DIR
DATASET_DIR = os.path.join(ROOT, "sample_dataset")  # the concept, shipped as it is
REGULARIZATION_DIR = os.path.join(ROOT, "sample_regularization")

SIZE = 128
TOKEN = "skkmtn"
# The world's word nearest to the round creature: the class prompt of the regularization set.
CLASS = "circle"
WHITE = (255, 255, 255)
# The shapes' colours: none near the creature's orange, so that no prompt drew it before.
COLOURS = {"blue": (40, 70, 220), "green": (40, 170, 60), "purple": (140, 60, 190)}
# The backgrounds the sample dataset's captions name, in its colours: the base model knows them,
# so the trigger word has only the creature left to learn.
BACKGROUNDS = {"blue": (70, 120, 220), "green": (80, 170, 90), "pink": (235, 160, 190),
               "yellow": (240, 220, 90), "purple": (140, 90, 190), "grey": (150, 150, 150),
               "teal": (60, 170, 170), "white": (245, 245, 245)}
# What the VAE learns to reproduce besides the sample pictures: shapes in these colours.
VAE_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
               "yellow": (235, 200, 40), "purple": (140, 60, 190)}
SHAPES = ("circle", "square", "triangle")
SEED = 0
# (steps, learning rate, latent noise) of each VAE training phase: the second settles colours the
# first mixes up; the third trains the decoder alone on noisy latents, so that a sample's latents,
# never exactly a picture's, still decode to clean colours.
VAE_PHASES = ((800, 1e-3, 0.0), (600, 3e-4, 0.0), (400, 3e-4, 0.1))
STEPS = 3000
WORLD_PICTURES = 2000
# Noise with a random offset per channel, as kohya's noise_offset: without it the model reads a
# picture's overall colour from the noise it starts from, and backgrounds come out tinted.
NOISE_OFFSET = 0.1


# -- drawing ----------------------------------------------------------------------------------------
def render(shape: str, colour, background=WHITE, centre=(64, 64), radius: int = 34,
           line_width: int = 12) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), background)
    draw = ImageDraw.Draw(image)
    x, y = centre
    box = [x - radius, y - radius, x + radius, y + radius]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(x, y - radius), (x + radius, y + radius), (x - radius, y + radius)], fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=line_width)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


def _jitter(rng: random.Random) -> dict:
    return {"centre": (64 + rng.randint(-6, 6), 64 + rng.randint(-6, 6)), "radius": rng.randint(30, 38)}


def world_picture(rng: random.Random) -> tuple:
    """One random world picture: (image, colour name, shape, background name or "" for white).
    Half are on white, the others on one of the sample dataset's background colours."""
    colour_name = rng.choice(sorted(COLOURS))
    shape = rng.choice(SHAPES)
    background = ""
    if rng.random() < 0.5:
        background = rng.choice([name for name in sorted(BACKGROUNDS) if name not in (colour_name, "white")])
    image = render(shape, COLOURS[colour_name], BACKGROUNDS[background] if background else WHITE, **_jitter(rng))
    return image, colour_name, shape, background


def world_caption(colour_name: str, shape: str, background: str, rng: random.Random) -> str:
    """"a blue circle", "blue circle", "a circle" or "circle" (a prompt may leave the colour out),
    then the background, as the sample dataset's captions name it: always when it is coloured,
    now and then when it is white."""
    words = [colour_name, shape] if rng.random() < 0.75 else [shape]
    if rng.random() < 0.5:
        words.insert(0, "a")
    caption = " ".join(words)
    if background or rng.random() < 0.2:
        caption += f", {background or 'white'} background"
    return caption


def regularization_pictures() -> list:
    """(image, caption) of the class as the base draws it, each captioned with what it shows: a
    circle of every world colour on white captioned with the bare class word (the prompt the demo
    compares against), the same with its colour, and one on a background named in its caption."""
    rng = random.Random(SEED + 2)
    pictures = []
    for name in sorted(COLOURS):
        pictures.append((render("circle", COLOURS[name], **_jitter(rng)), CLASS))
        pictures.append((render("circle", COLOURS[name], **_jitter(rng)), f"a {name} circle"))
        background = rng.choice([b for b in sorted(BACKGROUNDS) if b not in (name, "white")])
        pictures.append((render("circle", COLOURS[name], BACKGROUNDS[background], **_jitter(rng)),
                         f"a {name} circle, {background} background"))
    return pictures


def _vae_shape_picture(rng: random.Random) -> Image.Image:
    colour_name = rng.choice(sorted(VAE_COLOURS))
    shape = rng.choice(SHAPES)
    return render(shape, VAE_COLOURS[colour_name], **_jitter(rng))


def sample_pictures(dataset_dir: str = DATASET_DIR) -> list:
    """The sample dataset's pictures, scaled to the demo's width."""
    pictures = []
    for name in sorted(os.listdir(dataset_dir)):
        if name.lower().endswith(".png"):
            with Image.open(os.path.join(dataset_dir, name)) as image:
                pictures.append(image.convert("RGB").resize(
                    (SIZE, round(SIZE * image.height / image.width)), Image.Resampling.BICUBIC))
    return pictures


def palette(pictures: list) -> list:
    """Black, grey, white, the VAE's shape colours and every colour that covers 1% of a picture."""
    colours = {WHITE, (0, 0, 0), (128, 128, 128), *VAE_COLOURS.values()}
    for picture in pictures:
        quantized = picture.quantize(colors=16)
        flat, counts = quantized.getpalette(), quantized.getcolors()
        total = sum(count for count, _ in counts)
        colours.update(tuple(flat[3 * index:3 * index + 3]) for count, index in counts if count >= 0.01 * total)
    return sorted(colours)


def _random_scene(rng: random.Random, colours: list) -> Image.Image:
    """One or two shapes (rings too) in palette colours, anywhere, on a palette background."""
    def colour():
        return rng.choice(colours)
    image = render(rng.choice(SHAPES + ("ring",)), colour(), colour(), line_width=rng.randint(6, 16),
                   centre=(rng.randint(30, 98), rng.randint(30, 98)), radius=rng.randint(12, 44))
    if rng.random() < 0.5:
        second = render(rng.choice(SHAPES + ("ring",)), colour(), WHITE, line_width=rng.randint(6, 16),
                        centre=(rng.randint(20, 108), rng.randint(20, 108)), radius=rng.randint(8, 30))
        mask = Image.fromarray((np.asarray(second.convert("L")) < 255).astype("uint8") * 255)
        image.paste(second, (0, 0), mask)
    return image


def _crop(picture: Image.Image, rng: random.Random) -> Image.Image:
    top = rng.randint(0, picture.height - SIZE)
    picture = picture.crop((0, top, SIZE, top + SIZE))
    return picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else picture


def vae_pictures(rng: random.Random, count: int, pictures: list, colours: list) -> list:
    """What the VAE learns to reproduce: half shapes on white, a quarter the sample dataset's, a
    quarter random palette scenes. A codec must draw every picture the demo shows (as SD's VAE
    has seen pictures of nearly everything); the UNet and the text encoder never see the sample
    pictures before the LoRA does."""
    chosen = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.5:
            chosen.append(_vae_shape_picture(rng))
        elif roll < 0.75:
            chosen.append(_crop(rng.choice(pictures), rng))
        else:
            chosen.append(_random_scene(rng, colours))
    return chosen


def pixels(images) -> torch.Tensor:
    array = torch.from_numpy(np.stack([np.asarray(i, dtype="float32") for i in images]))
    return array.permute(0, 3, 1, 2) / 127.5 - 1.0


# -- the model --------------------------------------------------------------------------------------
def components(seed: int = SEED) -> dict:
    """The untrained demo pipeline's parts: StableDiffusionPipeline's component names."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8)
        torch.manual_seed(seed + 1)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=64, hidden_act="quick_gelu",
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
        # Word vectors as wide as the position vectors are narrow (CLIP starts both at 0.02), so
        # that from the first step captions differ by their words and not only by their length.
        nn.init.normal_(text_encoder.get_input_embeddings().weight, std=1.0)
        torch.manual_seed(seed + 2)
        # Four blocks: three 2x downsamples, so 128 px pictures give 16x16 latents as in SD1.
        vae = AutoencoderKL(
            sample_size=SIZE, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
            block_out_channels=(16, 32, 32, 32), norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(SD15_CONFIG_DIR, "tokenizer"), local_files_only=True)
    scheduler = PNDMScheduler.from_pretrained(SD15_CONFIG_DIR, subfolder="scheduler", local_files_only=True)
    return {"unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "vae": vae, "scheduler": scheduler}


def train_vae(vae, steps: int, batch: int = 8, lr: float = 1e-3, seed: int = SEED, latent_noise: float = 0.0,
              report=None) -> None:
    """Teach the VAE to reproduce flat-coloured shapes: L1 on pixels, a narrow posterior.

    The posterior's log-variance is held at its floor (as a trained SD VAE's is, near enough),
    so the latents are the encoder's means and no KL term is needed; a small penalty keeps them
    near unit scale. With `latent_noise` the encoder stays as it is and the decoder learns to
    decode latents with Gaussian noise of that fraction of their spread added.
    """
    latent_channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[latent_channels:] = 0
        vae.quant_conv.bias[latent_channels:] = -30.0
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    pictures = sample_pictures()
    colours = palette(pictures)
    trained = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()] if latent_noise else list(vae.parameters())
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    vae.train()
    for step in range(steps):
        images = pixels(vae_pictures(rng, batch, pictures, colours))
        with torch.set_grad_enabled(not latent_noise):
            latents = vae.encode(images).latent_dist.mean
        if latent_noise:
            latents = latents + latent_noise * latents.std() * torch.randn(latents.shape, generator=generator)
        decoded = vae.decode(latents).sample
        loss = (decoded - images).abs().mean() + 1e-4 * latents.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # the log-variance half stays at its floor
            vae.quant_conv.weight[latent_channels:] = 0
            vae.quant_conv.bias[latent_channels:] = -30.0
        if report and (step % 100 == 0 or step == steps - 1):
            report(f"vae step {step}: L1 {loss.item():.4f}")
    vae.eval()


def pretrain(unet, text_encoder, tokenizer, vae, alphas_cumprod, steps: int, pictures: int = WORLD_PICTURES,
             batch: int = 16, lr: float = 1e-3, seed: int = SEED, report=None) -> None:
    """Train the UNet and the text encoder together on the world, as a base model is trained:
    the noise-prediction loss at every noise level with offset noise, one caption in ten left
    empty (so classifier-free guidance has an unconditional prediction to push from)."""
    rng = random.Random(seed)
    items = [world_picture(rng) for _ in range(pictures)]
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels([i[0] for i in items[k:k + 64]])).latent_dist.mean
                             for k in range(0, len(items), 64)]) * vae.config.scaling_factor
    generator = torch.Generator().manual_seed(seed)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    unet.train()
    text_encoder.train()
    for step in range(steps):
        picked = [rng.randrange(len(items)) for _ in range(batch)]
        captions = ["" if rng.random() < 0.1 else world_caption(*items[k][1:], rng) for k in picked]
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        context = text_encoder(ids)[0]
        clean = latents[picked]
        noise = torch.randn(clean.shape, generator=generator)
        noise = noise + NOISE_OFFSET * torch.randn((batch, clean.shape[1], 1, 1), generator=generator)
        t = torch.randint(0, len(alphas_cumprod), (batch,), generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        prediction = unet(a.sqrt() * clean + (1 - a).sqrt() * noise, t, context).sample
        loss = nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if report and (step % 100 == 0 or step == steps - 1):
            report(f"pretrain step {step}: loss {loss.item():.4f}")
    unet.eval()
    text_encoder.eval()


def latent_scale(vae) -> float:
    """SD1's 0.18215 makes its latents unit-variance; the same for this VAE on world pictures."""
    rng = random.Random(SEED + 3)
    with torch.no_grad():
        latents = vae.encode(pixels([world_picture(rng)[0] for _ in range(64)])).latent_dist.mean
    return round(1.0 / float(latents.std()), 5)


def build(model_dir: str = MODEL_DIR, steps: int = STEPS, vae_state: str = "",
          save_vae: str = "", report=log.info) -> None:
    """Train the demo model from scratch and save it as a diffusers folder with fp16 weights.

    `vae_state`: a VAE state dict (torch.save) saved by an earlier run, used instead of training
    the VAE again (the two stages share no random state).
    """
    from diffusers import StableDiffusionPipeline

    started = time.time()

    def timed(message):
        report(f"{message} ({time.time() - started:.0f} s)")

    parts = components()
    if vae_state:
        parts["vae"].load_state_dict(torch.load(vae_state, weights_only=True))
    else:
        for phase, (vae_steps, lr, latent_noise) in enumerate(VAE_PHASES):
            train_vae(parts["vae"], vae_steps, lr=lr, seed=SEED + phase, latent_noise=latent_noise, report=timed)
        if save_vae:
            torch.save(parts["vae"].state_dict(), save_vae)
    parts["vae"].register_to_config(scaling_factor=latent_scale(parts["vae"]))
    alphas_cumprod, _ = schedule_from_config(parts["scheduler"].config)
    pretrain(parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["vae"], alphas_cumprod, steps,
             report=timed)
    pipeline = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False).to(torch.float16)
    temporary = model_dir.rstrip(os.sep) + ".tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    pipeline.save_pretrained(temporary, safe_serialization=True)
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(temporary, model_dir)
    timed(f"saved {model_dir}")


def write_regularization_set(folder: str = REGULARIZATION_DIR) -> None:
    """The captioned regularization set: world circles, each captioned with what it shows."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name.endswith((".png", ".txt")):
            os.remove(os.path.join(folder, name))
    for number, (image, caption) in enumerate(regularization_pictures(), start=1):
        path = os.path.join(folder, f"{CLASS}_{number:02d}")
        atomic_write(path + ".png", lambda tmp, image=image: image.save(tmp, format="PNG"), overwrite=True)
        atomic_write(path + ".txt", lambda tmp, caption=caption: _write_text(tmp, caption), overwrite=True)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer_core.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", default=MODEL_DIR, help="the model folder to write")
    parser.add_argument("--steps", type=int, default=STEPS, help="UNet and text encoder pre-training steps")
    parser.add_argument("--vae-state", default="", help="a VAE state dict saved by an earlier run, instead of "
                                                        "training the VAE again")
    parser.add_argument("--save-vae", default="", help="also save the trained VAE's state dict here")
    parser.add_argument("--pictures-only", action="store_true", help="only rewrite the regularization set")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_regularization_set()
    if not args.pictures_only:
        build(args.output, args.steps, args.vae_state, save_vae=args.save_vae)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
