"""The diffusers backend: tiny model, kohya target names, offline loading, checkpoint detection."""
import hashlib
import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from trainer_core.backends.diffusers import (
    SD15_CONFIG_DIR, checkpoint_kind, file_short_hash, kohya_text_encoder_targets, kohya_unet_targets,
    load_parts, parts_from_diffusers, schedule_from_config, tiny_components, tiny_parts)
from trainer_core.errors import TrainerInputError

torch.set_num_threads(1)

SD1_TOKEN_IDS = [49406, 320, 1125, 539, 909, 74, 18953, 1611, 49407]  # "a photo of skkmtn girl"
SD1_CROSS_ATTENTION_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


@pytest.fixture(scope="module")
def parts():
    return tiny_parts(seed=0)


def unet_output(parts, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((2, 4, 8, 8), generator=generator)
    with torch.no_grad():
        return parts.predict_noise(x, torch.tensor([10, 900]), parts.encode_text(["a red circle", "skkmtn"]))


def test_tiny_model_runs_forward_and_backward_at_sd1_shapes(parts):
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        latents = parts.encode_images(pixels)
    assert latents.shape == (2, 4, 8, 8)
    context = parts.encode_text(["a photo of skkmtn girl", ""])
    assert context.shape == (2, 77, 32)
    weight = parts.unet.conv_out.weight
    weight.requires_grad_(True)
    try:
        prediction = parts.predict_noise(torch.randn_like(latents), torch.tensor([1, 999]), context)
        prediction.square().mean().backward()
    finally:
        weight.requires_grad_(False)
    assert prediction.shape == latents.shape
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    weight.grad = None
    with torch.no_grad():
        images = parts.decode_latents(latents)
    assert images.shape == (2, 3, 64, 64)
    assert images.min() >= -1 and images.max() <= 1


def test_tiny_model_is_frozen_in_eval_mode_with_sd1_schedule(parts):
    for module in (parts.unet, parts.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert parts.prediction_type == "epsilon"
    assert parts.alphas_cumprod.shape == (1000,)
    assert parts.base_model_hash and len(parts.base_model_hash) == 10


def test_vae_latents_are_the_posterior_mean_or_a_narrow_sample_at_unit_scale(parts):
    pixels = torch.nn.functional.interpolate(torch.rand(4, 3, 8, 8) * 2 - 1, size=(64, 64), mode="bilinear")
    with torch.no_grad():
        mean = parts.encode_images(pixels)
        first = parts.encode_images(pixels, generator=torch.Generator().manual_seed(1))
        second = parts.encode_images(pixels, generator=torch.Generator().manual_seed(2))
        again = parts.encode_images(pixels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mean, parts.encode_images(pixels)), "no generator: the mean, every time"
    assert torch.equal(first, again) and not torch.equal(first, second) and not torch.equal(first, mean)
    assert torch.allclose(first, mean, atol=1e-3)  # the posterior is narrow, as a trained VAE's is
    assert 0.3 < float(mean.std()) < 3.0


def test_same_seed_gives_identical_model_and_leaves_global_rng_alone(parts):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    again = tiny_parts(seed=0)
    assert torch.equal(torch.rand(1), expected_next)
    assert again.base_model_hash == parts.base_model_hash
    assert torch.equal(unet_output(again), unet_output(parts))
    other = tiny_parts(seed=1)
    assert other.base_model_hash != parts.base_model_hash
    assert not torch.equal(unet_output(other), unet_output(parts))


def test_unet_targets_have_kohya_names_of_diffusers_paths(parts):
    targets = parts.unet_lora_targets
    # 4 transformers (down 0, mid, up 1 x2) x (proj_in, proj_out, 8 attention, 2 feed-forward)
    assert len(targets) == 48
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in targets
    assert "lora_unet_mid_block_attentions_0_proj_in" in targets
    assert "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0" in targets
    assert "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj" in targets
    pattern = re.compile(
        r"lora_unet_(down_blocks_\d+_attentions_\d+|up_blocks_\d+_attentions_\d+|mid_block_attentions_0)_"
        r"(proj_in|proj_out|transformer_blocks_\d+_(attn[12]_to_(q|k|v|out_0)|ff_net_0_proj|ff_net_2))")
    for name, module in targets.items():
        assert pattern.fullmatch(name), name
        is_1x1 = isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
        assert isinstance(module, nn.Linear) or is_1x1, name
    assert isinstance(targets["lora_unet_mid_block_attentions_0_proj_out"], nn.Conv2d)
    assert targets["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"] is \
        parts.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k


def test_unet_targets_equal_kohya_rule_of_linear_and_1x1_conv_inside_transformer2d(parts):
    # kohya networks/lora.py: UNET_TARGET_REPLACE_MODULE = ["Transformer2DModel"], then every child
    # whose class is Linear, or Conv2d with a 1x1 kernel, named prefix + "." + path with "." -> "_".
    expected = {}
    for path, block in parts.unet.named_modules():
        if type(block).__name__ == "Transformer2DModel":
            for child_path, child in block.named_modules():
                kind = type(child).__name__
                if kind == "Linear" or (kind == "Conv2d" and child.kernel_size == (1, 1)):
                    expected[f"lora_unet.{path}.{child_path}".replace(".", "_")] = child
    assert kohya_unet_targets(parts.unet) == expected


def test_text_encoder_targets_name_every_layer_with_the_text_model_prefix(parts):
    targets = kohya_text_encoder_targets(parts.text_encoder)
    layers = getattr(parts.text_encoder, "text_model", parts.text_encoder).encoder.layers
    assert len(targets) == 6 * len(layers) == 12
    for i, layer in enumerate(layers):
        prefix = f"lora_te_text_model_encoder_layers_{i}_"
        assert targets[prefix + "self_attn_q_proj"] is layer.self_attn.q_proj
        assert targets[prefix + "self_attn_k_proj"] is layer.self_attn.k_proj
        assert targets[prefix + "self_attn_v_proj"] is layer.self_attn.v_proj
        assert targets[prefix + "self_attn_out_proj"] is layer.self_attn.out_proj
        assert targets[prefix + "mlp_fc1"] is layer.mlp.fc1
        assert targets[prefix + "mlp_fc2"] is layer.mlp.fc2
    assert parts.text_encoder_lora_targets == targets


def test_encode_text_pads_and_truncates_to_77_tokens_and_passes_gradients(parts):
    long_prompt = " ".join(["word"] * 200)
    weight = parts.text_encoder_lora_targets["lora_te_text_model_encoder_layers_0_self_attn_q_proj"].weight
    weight.requires_grad_(True)
    try:
        context = parts.encode_text(["short", long_prompt, "skkmtn"])
        context.sum().backward()
    finally:
        weight.requires_grad_(False)
    assert context.shape == (3, 77, 32)
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    weight.grad = None


def test_shipped_tokenizer_tokenizes_like_sd1():
    tokenizer = tiny_components()["tokenizer"]
    assert tokenizer("a photo of skkmtn girl").input_ids == SD1_TOKEN_IDS
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77


def test_shipped_configs_describe_sd15():
    with open(os.path.join(SD15_CONFIG_DIR, "unet", "config.json"), encoding="utf-8") as f:
        unet = json.load(f)
    assert unet["cross_attention_dim"] == 768 and unet["block_out_channels"] == [320, 640, 1280, 1280]
    with open(os.path.join(SD15_CONFIG_DIR, "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
        alphas_cumprod, prediction_type = schedule_from_config(json.load(f))
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    assert prediction_type == "epsilon"
    assert torch.allclose(alphas_cumprod.double(), torch.cumprod(1 - betas, 0), atol=1e-6)


def test_load_parts_reads_a_saved_diffusers_folder_offline(parts, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "tiny_sd1"
    pipeline = StableDiffusionPipeline(**tiny_components(seed=0), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(str(folder))
    loaded = load_parts(str(folder))
    assert loaded.base_model_name == "tiny_sd1"
    assert re.fullmatch(r"[0-9a-f]{10}", loaded.base_model_hash)
    assert load_parts(str(folder)).base_model_hash == loaded.base_model_hash
    assert torch.allclose(unet_output(loaded), unet_output(parts), atol=1e-5)
    assert set(loaded.unet_lora_targets) == set(parts.unet_lora_targets)
    assert torch.allclose(loaded.alphas_cumprod, parts.alphas_cumprod)


def test_load_parts_refuses_a_folder_of_another_pipeline(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(TrainerInputError, match="StableDiffusionXLPipeline"):
        load_parts(str(tmp_path))


def test_load_parts_names_a_missing_path_or_a_plain_folder(tmp_path):
    with pytest.raises(TrainerInputError, match="does not exist"):
        load_parts(str(tmp_path / "nothing.safetensors"))
    with pytest.raises(TrainerInputError, match="model_index.json"):
        load_parts(str(tmp_path))


def tiny(*shape):
    return torch.zeros(shape, dtype=torch.float16)


NOT_SD1_FILES = {
    "sdxl": ({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": tiny(4, 2),
              "model.diffusion_model.input_blocks.0.0.weight": tiny(2, 4, 1, 1)}, "SDXL"),
    "sd2_openclip": ({"cond_stage_model.model.token_embedding.weight": tiny(4, 2),
                      "model.diffusion_model.input_blocks.0.0.weight": tiny(2, 4, 1, 1)}, "2.x"),
    "sd2_width": ({SD1_CROSS_ATTENTION_KEY: tiny(320, 1024)}, "2.x"),
    "lora": ({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": tiny(4, 8, 1, 1),
              "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(4.0)}, "LoRA"),
    "vae": ({"encoder.conv_in.weight": tiny(2, 3, 3, 3), "decoder.conv_out.weight": tiny(3, 2, 3, 3)}, "VAE"),
}


@pytest.mark.parametrize("kind", sorted(NOT_SD1_FILES))
def test_load_parts_refuses_a_single_file_that_is_not_sd1(kind, tmp_path):
    tensors, words = NOT_SD1_FILES[kind]
    path = tmp_path / f"{kind}.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(TrainerInputError) as error:
        load_parts(str(path))
    assert str(path) in str(error.value)
    assert words in str(error.value)


def sd1_shapes(**changes):
    shapes = {
        SD1_CROSS_ATTENTION_KEY: (320, 768),
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
    }
    shapes.update(changes)
    return {key: value for key, value in shapes.items() if value != "drop"}


def test_checkpoint_kind_tells_sd1_from_its_look_alikes():
    assert checkpoint_kind(sd1_shapes()) == "sd1"
    assert checkpoint_kind(sd1_shapes(**{"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)})) \
        == "sd1_inpainting"
    assert checkpoint_kind(sd1_shapes(**{"first_stage_model.encoder.conv_in.weight": "drop"})) == "sd1_incomplete"
    assert checkpoint_kind(sd1_shapes(**{SD1_CROSS_ATTENTION_KEY: (320, 1024)})) == "sd2"
    assert checkpoint_kind({"string_to_param": None, "name": None}) == "embedding"
    assert checkpoint_kind({"layer_structure": None, "320": None}) == "hypernetwork"
    assert checkpoint_kind({"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)}) == "unknown"


class NotATensor:
    pass


def test_ckpt_is_loaded_without_running_pickled_code(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"lora_unet_x.lora_down.weight": tiny(2, 2)}, "callback": NotATensor()}, str(path))
    with pytest.raises(TrainerInputError, match="safetensors"):
        load_parts(str(path))


def test_ckpt_state_dict_nesting_is_unwrapped_before_detection(tmp_path):
    path = tmp_path / "sd2.ckpt"
    torch.save({"state_dict": {SD1_CROSS_ATTENTION_KEY: tiny(320, 1024)}, "global_step": 5}, str(path))
    with pytest.raises(TrainerInputError, match="2.x"):
        load_parts(str(path))


def test_file_short_hash_is_a1111_shorthash(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(3 << 20))
    assert file_short_hash(str(path)) == hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def test_unknown_prediction_type_is_refused():
    c = tiny_components()
    with pytest.raises(TrainerInputError, match="prediction_type"):
        parts_from_diffusers(c["unet"], c["text_encoder"], c["tokenizer"], c["vae"], torch.ones(1000),
                             "sample", "cpu", torch.float32)
