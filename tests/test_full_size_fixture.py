"""The full-size SD1.5 fixture's layout, checked against diffusers' own LDM converters.

The fixture (tests/integration/full_size_sd15.py) lists SD1.5's single-file tensors from the
architecture; diffusers converts SD1.5 single files to its models. Converting the listed shapes
(as meta tensors, so nothing is allocated) must give exactly the state dicts of diffusers' SD1.5
UNet and VAE and transformers' CLIP text model. ComfyUI's side is checked in the integration tests.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "integration"))
import full_size_sd15  # noqa: E402

from trainer_core.backends.diffusers import SD15_CONFIG_DIR, checkpoint_kind  # noqa: E402


def shapes(state_dict) -> dict:
    return {key: tuple(tensor.shape) for key, tensor in state_dict.items()}


@pytest.fixture(scope="module")
def meta_checkpoint():
    return {name: torch.empty(shape, device="meta", dtype=torch.float16)
            for name, shape in full_size_sd15.checkpoint_layout()}


def test_layout_converts_to_diffusers_sd15_unet_and_vae_exactly(meta_checkpoint):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG_DIR, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG_DIR, subfolder="vae"))
    assert shapes(convert_ldm_unet_checkpoint(meta_checkpoint, unet.config)) == shapes(unet.state_dict())
    assert shapes(convert_ldm_vae_checkpoint(meta_checkpoint, vae.config)) == shapes(vae.state_dict())
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964


def test_layout_holds_clip_l_text_model_exactly(meta_checkpoint):
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(os.path.join(SD15_CONFIG_DIR, "text_encoder")))
    prefix = "cond_stage_model.transformer.text_model."
    # transformers 5 dropped CLIPTextModel's text_model level that SD1 files keep.
    expected = {key.removeprefix("text_model."): shape for key, shape in shapes(text_encoder.state_dict()).items()
                if "position_ids" not in key}
    listed = {key[len(prefix):]: shape for key, shape in shapes(meta_checkpoint).items() if key.startswith(prefix)}
    assert listed == expected


def test_layout_is_recognised_as_sd1(meta_checkpoint):
    assert checkpoint_kind(shapes(meta_checkpoint)) == "sd1"


def test_writer_streams_a_readable_safetensors_file_with_seeded_fp16_weights(tmp_path):
    from safetensors import safe_open
    layout = [entry for entry in full_size_sd15.checkpoint_layout()
              if entry[0].startswith(("model.diffusion_model.out.", "first_stage_model.quant_conv."))]
    first = full_size_sd15.write_full_size_sd15(str(tmp_path / "a.safetensors"), layout=layout)
    again = full_size_sd15.write_full_size_sd15(str(tmp_path / "b.safetensors"), layout=layout)
    with safe_open(first, "pt") as f, safe_open(again, "pt") as g:
        assert list(f.keys()) == sorted(name for name, _ in layout)
        for name, shape in layout:
            tensor = f.get_tensor(name)
            assert tensor.dtype == torch.float16 and tuple(tensor.shape) == shape
            assert torch.equal(tensor, g.get_tensor(name)), "the same seed writes the same weights"
        assert torch.equal(f.get_tensor("model.diffusion_model.out.0.weight"), torch.ones(320, dtype=torch.float16))
        assert f.get_tensor("first_stage_model.quant_conv.bias")[4:].eq(-30).all()
        assert f.get_tensor("model.diffusion_model.out.2.weight").std() > 0
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "b.safetensors"], "no temp file left behind"
