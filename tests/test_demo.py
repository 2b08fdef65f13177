"""The demo model and the README's first run: `python -m trainer_core train` with no options
trains the shipped demo model on the sample dataset, and its before/after samples show the new
concept with the trigger word and not without it.

What a sample shows is read from its latents, decoded by the model's VAE: the share of the
picture in the creature's orange. The world the demo model knows has blue, green and purple
shapes on white or on the sample dataset's background colours, and no orange anywhere, so only
the learned creature can bring it. The measure is checked both ways: the sample pictures
themselves, through the same VAE, score high; the base model's world prompts score near zero.
"""
import os

import numpy as np
import pytest
import torch

from trainer_core import cli, demo
from trainer_core.backends import diffusers as backend
from trainer_core.sampling import latents_to_images, sample_latents


@pytest.fixture(scope="module")
def demo_parts():
    return backend.demo_parts()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """The README's command as it is, with every sampled latent kept: [(prompts, latents)], the
    base model's first, then the trained one's."""
    torch.set_num_threads(1)
    output = tmp_path_factory.mktemp("first-run")
    sampled = []
    monkeypatch = pytest.MonkeyPatch()

    def recording(parts, prompts, **kwargs):
        latents = sample_latents(parts, prompts, **kwargs)
        sampled.append((list(prompts), latents))
        return latents_to_images(parts, latents)

    monkeypatch.setattr(cli, "sample_images", recording)
    previous = os.getcwd()
    try:
        os.chdir(output)
        assert cli.main(["train"]) == 0
    finally:
        os.chdir(previous)
        monkeypatch.undo()
    return output / "runs", sampled


# The creature's orange, as the sample pictures have it.
CREATURE_ORANGE = (240, 130, 40)


def orange_share(image) -> float:
    """The share of pixels within 50 (of 255, RGB distance) of the creature's orange. None of the
    world's shape colours or background colours is that near it."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    return float((np.linalg.norm(rgb - np.array(CREATURE_ORANGE, dtype=np.float32), axis=2) < 50).mean())


def shares(parts, latents) -> list:
    return [orange_share(image) for image in latents_to_images(parts, latents)]


def test_demo_model_is_small_and_loads_in_the_diffusers_backend(demo_parts):
    size = sum(os.path.getsize(os.path.join(folder, name))
               for folder, _, names in os.walk(demo.MODEL_DIR) for name in names)
    assert size < 30 * 2 ** 20, f"the shipped demo model is {size / 2 ** 20:.1f} MiB"
    assert demo_parts.text_encoder.config.hidden_size == 64
    assert demo_parts.unet_lora_targets, "kohya LoRA targets found in the demo UNet"


def test_the_measure_sees_the_creature_through_the_demo_vae(demo_parts):
    """Control for the measure: the sample pictures, coded and decoded by the demo VAE, are
    about a fifth orange; the world's circles on white (what the grid's `circle` shows) are not
    orange at all."""
    sample = [picture.crop((0, (picture.height - demo.SIZE) // 2, demo.SIZE, (picture.height + demo.SIZE) // 2))
              for picture in demo.sample_pictures()]
    circles = [image for image, caption in demo.regularization_pictures() if "background" not in caption]
    with torch.no_grad():
        sample_shares = shares(demo_parts, demo_parts.encode_images(demo.pixels(sample)))
        circle_shares = shares(demo_parts, demo_parts.encode_images(demo.pixels(circles)))
    assert min(sample_shares) > 0.1, sample_shares
    assert max(circle_shares) < 0.01, circle_shares


def test_base_model_draws_the_world_it_was_taught(demo_parts):
    """The base draws no orange for the world's prompts, nor for the trigger word it never saw."""
    prompts = ["a blue circle", "green square", "a purple triangle, pink background", "circle",
               f"{demo.TOKEN} {demo.CLASS}"]
    for seed in (0, 1):
        found = shares(demo_parts, sample_latents(demo_parts, prompts, seed=seed, width=demo.SIZE, height=demo.SIZE))
        assert max(found) < 0.03, dict(zip(prompts, found))


def test_first_run_shows_the_concept_with_the_trigger_only(first_run, demo_parts):
    runs, sampled = first_run
    assert sorted(os.listdir(runs)) == [
        "skkmtn_lora.safetensors", "skkmtn_lora.safetensors.trainstate", "skkmtn_lora_250.safetensors",
        "skkmtn_lora_250.safetensors.trainstate", "skkmtn_lora_loss.png", "skkmtn_lora_samples.png"]
    (base_prompts, base), (trained_prompts, trained) = sampled
    assert base_prompts == trained_prompts == [f"{demo.TOKEN} {demo.CLASS}", demo.CLASS]
    base_with, base_without = shares(demo_parts, base)
    trained_with, trained_without = shares(demo_parts, trained)
    figures = dict(base_with=base_with, base_without=base_without, trained_with=trained_with,
                   trained_without=trained_without)
    assert trained_with > 0.1, figures
    assert max(base_with, base_without, trained_without) < 0.03, figures
