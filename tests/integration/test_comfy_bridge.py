"""The ComfyUI bridge against ComfyUI's own code paths, on the tiny SD1 checkpoint.

Each test compares what the trainer is handed with what ComfyUI itself computes when it
samples, encodes a prompt or loads a LoRA file.
"""
import types

import pytest
import torch


@pytest.fixture(scope="module")
def bridge(comfyui):
    return comfyui.pack_module("nodes.comfy_bridge")


@pytest.fixture(scope="module")
def sd1(comfyui, tiny_checkpoint, bridge):
    model, clip, vae = comfyui.load_checkpoint(tiny_checkpoint)
    with torch.inference_mode():
        parts = bridge.build_parts(model, clip, vae)
    return types.SimpleNamespace(model=model, clip=clip, vae=vae, parts=parts)


def test_noise_prediction_equals_comfyuis_sampling_call(sd1):
    # ComfyUI feeds the UNet x / sqrt(sigma^2 + 1) at timestep t(sigma) and returns
    # x - eps * sigma; the trainer feeds the DDPM sample sqrt(a) x0 + sqrt(1 - a) eps at t.
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn((2, 4, 8, 8), generator=generator)
    t = torch.tensor([10, 700])
    with torch.inference_mode():
        context = sd1.parts.encode_text(["skkmtn", "a creature"])
        eps = sd1.parts.predict_noise(x_t, t, context)
        sigma = sd1.model.get_model_object("model_sampling").sigmas[t]
        x = x_t * (sigma ** 2 + 1).sqrt().view(-1, 1, 1, 1)
        denoised = sd1.model.model.apply_model(x, sigma, c_crossattn=context)
        eps_comfy = (x - denoised) / sigma.view(-1, 1, 1, 1)
    assert eps.abs().mean() > 0.01
    assert torch.allclose(eps, eps_comfy, rtol=1e-4, atol=1e-4)


def test_schedule_is_sd1s_ddpm_schedule_and_prediction_is_epsilon(sd1):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    expected = torch.cumprod(1 - betas, dim=0).float()
    assert torch.allclose(sd1.parts.alphas_cumprod, expected, rtol=1e-4)
    assert sd1.parts.prediction_type == "epsilon"


def test_text_encoding_equals_clip_text_encode_and_reads_parentheses_literally(sd1):
    clip = sd1.clip
    with torch.inference_mode():
        ours = sd1.parts.encode_text(["skkmtn, orange creature", "girl (smiling)"])
        plain = clip.encode_from_tokens(clip.tokenize("skkmtn, orange creature"))
        literal = clip.encode_from_tokens(clip.tokenize("girl \\(smiling\\)"))
        weighted = clip.encode_from_tokens(clip.tokenize("girl (smiling)"))
        long_caption = sd1.parts.encode_text(["skkmtn " * 120, "x"])
    assert ours.shape == (2, 77, 768)
    assert torch.equal(ours[0], plain[0]) and torch.equal(ours[1], literal[0])
    assert not torch.equal(ours[1], weighted[0])
    assert long_caption.shape == (2, 77, 768), "captions are cut at 75 tokens, as kohya does"


def test_images_encode_to_scaled_latents_and_decode_back(sd1):
    pixels = torch.rand((1, 3, 64, 64)) * 2 - 1
    with torch.inference_mode():
        latents = sd1.parts.encode_images(pixels)
        expected = sd1.model.model.latent_format.process_in(sd1.vae.encode(((pixels + 1) / 2).movedim(1, -1)))
        images = sd1.parts.decode_latents(latents)
    assert latents.shape == (1, 4, 8, 8) and torch.equal(latents, expected)
    assert images.shape == (1, 3, 64, 64) and images.min() >= -1 and images.max() <= 1


def test_a_generator_draws_latents_from_the_posterior_of_an_sd_vae_and_none_gives_vae_encode(sd1, bridge):
    # The tiny checkpoint's TAESD has no posterior, so a full-size SD VAE (random weights, as
    # diffusers lays it out; ComfyUI converts the keys) is built here.
    import comfy.sd
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    blocks = 4
    diffusers_vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks)
    vae = comfy.sd.VAE(sd=diffusers_vae.state_dict())
    parts = bridge.build_parts(sd1.model, sd1.clip, vae)
    pixels = torch.rand((1, 3, 64, 64)) * 2 - 1
    before = torch.random.get_rng_state()
    with torch.inference_mode():
        mode = parts.encode_images(pixels)
        expected = sd1.model.model.latent_format.process_in(vae.encode(((pixels + 1) / 2).movedim(1, -1)))
        first = parts.encode_images(pixels, torch.Generator().manual_seed(1))
        again = parts.encode_images(pixels, torch.Generator().manual_seed(1))
        other = parts.encode_images(pixels, torch.Generator().manual_seed(2))
        mode_after = parts.encode_images(pixels)
    assert torch.equal(mode, expected), "no generator: exactly what VAEEncode gives"
    assert torch.equal(first, again), "the same generator seed draws the same sample"
    assert not torch.equal(first, other) and not torch.equal(first, mode)
    assert torch.equal(mode_after, mode), "the VAE is back to VAEEncode's behaviour"
    assert torch.equal(torch.random.get_rng_state(), before), "ComfyUI's random state is left alone"


def test_every_lora_target_is_a_layer_core_loraloader_patches(comfyui, sd1, bridge):
    lora = comfyui.pack_module("trainer_core.adapters.lora")
    unet, text_encoder = sd1.parts.unet_lora_targets, sd1.parts.text_encoder_lora_targets
    # The tiny UNet has 4 transformers (12 layers each); CLIP-L has 12 layers of 6.
    assert (len(unet), len(text_encoder)) == (48, 72)
    network = lora.LoRANetwork(unet, text_encoder, lora.LoRAConfig(train_text_encoder=True))
    for module in network.loras().values():
        torch.nn.init.normal_(module.lora_up.weight, std=0.01)
    state_dict = network.kohya_state_dict()
    assert bridge.unmatched_lora_keys(sd1.model, sd1.clip, state_dict) == []
    model, clip = bridge.apply_lora(sd1.model, sd1.clip, state_dict)
    assert len(model.patches) == 48 and len(clip.patcher.patches) == 72


def test_unmatched_lora_keys_names_keys_comfyui_would_ignore(sd1, bridge):
    state_dict = {"lora_unet_no_such_layer.lora_down.weight": torch.zeros(4, 8),
                  "lora_unet_no_such_layer.lora_up.weight": torch.zeros(8, 4),
                  "lora_unet_no_such_layer.alpha": torch.tensor(4.0)}
    assert bridge.unmatched_lora_keys(sd1.model, sd1.clip, state_dict) == sorted(state_dict)


def test_base_model_hash_is_the_same_for_every_load_and_changes_with_the_weights(comfyui, tiny_checkpoint,
                                                                               sd1, bridge):
    model, clip, vae = comfyui.load_checkpoint(tiny_checkpoint)
    with torch.inference_mode():
        reloaded = bridge.build_parts(model, clip, vae).base_model_hash
    assert reloaded == sd1.parts.base_model_hash, "the training cache must survive a restart"
    patched, _ = bridge.apply_lora(model, clip, _random_unet_lora(comfyui, sd1))
    with torch.inference_mode():
        assert bridge.build_parts(patched, clip, vae).base_model_hash != reloaded


def _random_unet_lora(comfyui, sd1):
    lora = comfyui.pack_module("trainer_core.adapters.lora")
    network = lora.LoRANetwork(sd1.parts.unet_lora_targets, {}, lora.LoRAConfig())
    for module in network.loras().values():
        torch.nn.init.normal_(module.lora_up.weight, std=0.01)
    return network.kohya_state_dict()


def test_training_refuses_a_model_that_is_not_sd1_and_names_what_it_is(comfyui, bridge):
    import comfy.supported_models
    sdxl = comfy.supported_models.SDXL({
        "model_channels": 320, "use_linear_in_transformer": True, "transformer_depth": [0, 0, 2, 2, 10, 10],
        "context_dim": 2048, "adm_in_channels": 2816, "use_temporal_attention": False})
    model = types.SimpleNamespace(model=types.SimpleNamespace(model_config=sdxl))
    errors = comfyui.pack_module("trainer_core.errors")
    with pytest.raises(errors.TrainerInputError) as raised:
        bridge.check_sd1(model)
    assert "SDXL" in str(raised.value) and "SD1.x" in str(raised.value)


def test_training_context_makes_inference_weights_trainable_and_leaves_values_and_flags(sd1, bridge):
    unet = sd1.parts.unet
    before = {name: (p.detach().clone(), p.requires_grad) for name, p in unet.named_parameters()}
    with torch.inference_mode():
        with bridge.training_context(unet):
            assert not any(p.is_inference() or p.requires_grad for p in unet.parameters())
            x = torch.randn((1, 4, 8, 8), requires_grad=True)
            context = torch.zeros((1, 77, 768))
            sd1.parts.predict_noise(x, torch.tensor([500]), context).sum().backward()
            assert x.grad is not None
    after = dict(unet.named_parameters())
    assert all(torch.equal(after[name], value) and after[name].requires_grad == flag
               for name, (value, flag) in before.items())
