"""A saved LoRA loads in diffusers with no key warnings and gives our hooked outputs.

Consumers do not protect us: diffusers only warns about unknown keys, so the test
captures its warnings and compares outputs on a tiny SD1-shaped pipeline built in code.
"""
import json
import logging
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("peft", reason="diffusers needs peft to load LoRAs (pip install peft)")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from trainer_core.adapters.lora import LoRAConfig, LoRANetwork  # noqa: E402
from trainer_core.formats import lora_metadata, save_lora  # noqa: E402

torch.set_num_threads(1)

TEXT_ENCODER_LAYERS = {
    "self_attn_q_proj": ("self_attn", "q_proj"),
    "self_attn_k_proj": ("self_attn", "k_proj"),
    "self_attn_v_proj": ("self_attn", "v_proj"),
    "self_attn_out_proj": ("self_attn", "out_proj"),
    "mlp_fc1": ("mlp", "fc1"),
    "mlp_fc2": ("mlp", "fc2"),
}


def unet_targets(unet):
    """kohya's SD1 UNet targets: Linear and 1x1 conv layers inside each Transformer2DModel."""
    found = {}
    for block_name, block in unet.named_modules():
        if type(block).__name__ != "Transformer2DModel":
            continue
        for name, module in block.named_modules():
            is_1x1 = isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
            if isinstance(module, nn.Linear) or is_1x1:
                found["lora_unet_" + f"{block_name}.{name}".replace(".", "_")] = module
    return found


def text_encoder_targets(text_encoder):
    # transformers 5 dropped the `text_model` level of CLIPTextModel; kohya names keep it.
    layers = getattr(text_encoder, "text_model", text_encoder).encoder.layers
    return {
        f"lora_te_text_model_encoder_layers_{i}_{suffix}": getattr(getattr(layer, part), leaf)
        for i, layer in enumerate(layers)
        for suffix, (part, leaf) in TEXT_ENCODER_LAYERS.items()
    }


def byte_level_chars():
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(others))]


def tiny_tokenizer(folder):
    chars = byte_level_chars()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return transformers.CLIPTokenizer.from_pretrained(str(folder))


def tiny_pipeline(folder):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(folder)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            vocab_size=1000,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    return diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=diffusers.DDPMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(f"{record.name}: {record.getMessage()}")


def outputs(pipe, latents, timestep, context, input_ids):
    with torch.no_grad():
        return pipe.unet(latents, timestep, context).sample, pipe.text_encoder(input_ids)[0]


def test_saved_lora_loads_in_diffusers_with_our_outputs(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    unet_layers, text_layers = unet_targets(pipe.unet), text_encoder_targets(pipe.text_encoder)
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in unet_layers
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0" in unet_layers
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj" in unet_layers
    assert len(text_layers) == 12

    network = LoRANetwork(unet_layers, text_layers, LoRAConfig(rank=4, alpha=2.0, train_text_encoder=True))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lora in network.loras().values():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=generator) * 0.1)

    latents = torch.randn(1, 4, 16, 16, generator=generator)
    timestep = torch.tensor([500])
    context = torch.randn(1, 77, 32, generator=generator)
    tokens = pipe.tokenizer(["a photo of skkmtn"], padding="max_length", max_length=77, return_tensors="pt")
    input_ids = tokens.input_ids
    base = outputs(pipe, latents, timestep, context, input_ids)
    with network.attached():
        expected = outputs(pipe, latents, timestep, context, input_ids)
    assert all((e - b).abs().max() > 1e-3 for e, b in zip(expected, base))  # the LoRA does something

    path = tmp_path / "skkmtn.safetensors"
    metadata = lora_metadata(output_name="skkmtn", rank=4, alpha=2.0)
    save_lora(path, network.kohya_state_dict(torch.float32), metadata)

    collect = Collect()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    for logger in loggers:
        logger.addHandler(collect)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path))
    finally:
        for logger in loggers:
            logger.removeHandler(collect)
    problems = collect.messages + [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert problems == []

    got = outputs(pipe, latents, timestep, context, input_ids)
    for name, g, e in zip(("unet", "text encoder"), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, msg=f"{name} output differs from our hooked LoRA")
