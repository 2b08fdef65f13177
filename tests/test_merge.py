"""Merging a LoRA into weights gives the same outputs as applying it with hooks."""
import copy
import os

import pytest
import torch
from torch import nn

from trainer_core.adapters.lora import LoRAConfig, LoRANetwork
from trainer_core.errors import TrainerInputError
from trainer_core.merge import merge_lora

torch.set_num_threads(1)


class TinySD(nn.Module):
    def __init__(self):
        super().__init__()
        self.unet = nn.ModuleDict({"proj_in": nn.Conv2d(6, 8, 1), "to_q": nn.Linear(8, 8)})
        self.text = nn.ModuleDict({"q_proj": nn.Linear(5, 5)})

    def forward(self, x, tokens):
        h = self.unet["proj_in"](x).permute(0, 2, 3, 1)
        return self.unet["to_q"](h), self.text["q_proj"](tokens)


KEY_MAP = {
    "lora_unet_proj_in": "unet.proj_in.weight",
    "lora_unet_to_q": "unet.to_q.weight",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "text.q_proj.weight",
}


def targets(model):
    unet = {"lora_unet_proj_in": model.unet["proj_in"], "lora_unet_to_q": model.unet["to_q"]}
    text = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": model.text["q_proj"]}
    return unet, text


def trained_lora(model, rank=3, alpha=1.5):
    torch.manual_seed(1)
    network = LoRANetwork(*targets(model), LoRAConfig(rank=rank, alpha=alpha, train_text_encoder=True))
    with torch.no_grad():
        for lora in network.loras().values():
            lora.lora_up.weight.normal_()
    return network


def inputs():
    generator = torch.Generator().manual_seed(2)
    return torch.randn(2, 6, 3, 3, generator=generator), torch.randn(2, 4, 5, generator=generator)


def run(model, state_dict=None):
    if state_dict is not None:
        model = copy.deepcopy(model)
        model.load_state_dict(state_dict)
    with torch.no_grad():
        return model(*inputs())


def hooked_outputs(model, network, unet_multiplier, text_multiplier):
    # The hook multiplier is global, so apply each side separately and combine.
    x, tokens = inputs()
    with torch.no_grad(), network.attached():
        network.multiplier = unet_multiplier
        unet_out = model(x, tokens)[0]
        network.multiplier = text_multiplier
        text_out = model(x, tokens)[1]
    return unet_out, text_out


@pytest.mark.parametrize("strength_unet, strength_text", [(1.0, 1.0), (0.6, -0.4), (0.0, 1.0)])
def test_merged_weights_equal_the_hooked_lora(strength_unet, strength_text):
    torch.manual_seed(0)
    model = TinySD()
    network = trained_lora(model)
    lora = network.kohya_state_dict(torch.float32)
    merged = merge_lora(model.state_dict(), lora, KEY_MAP, strength_unet, strength_text)
    expected = hooked_outputs(model, network, strength_unet, strength_text)
    for got, want in zip(run(model, merged), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_merge_returns_a_new_dict_and_shares_untouched_tensors():
    torch.manual_seed(0)
    model = TinySD()
    base = model.state_dict()
    originals = {k: v.clone() for k, v in base.items()}
    merged = merge_lora(base, trained_lora(model).kohya_state_dict(), KEY_MAP, strength_text_encoder=0.0)
    assert merged is not base
    assert all(torch.equal(base[k], originals[k]) for k in base)  # the input is not modified
    for key in ("unet.proj_in.bias", "unet.to_q.bias", "text.q_proj.weight", "text.q_proj.bias"):
        assert merged[key] is base[key]
    assert not torch.equal(merged["unet.to_q.weight"], base["unet.to_q.weight"])
    assert merged["unet.proj_in.weight"].shape == (8, 6, 1, 1)


def test_fp16_base_stays_fp16_and_close_to_the_fp32_merge():
    torch.manual_seed(0)
    model = TinySD()
    lora = trained_lora(model).kohya_state_dict()
    merged32 = merge_lora(model.state_dict(), lora, KEY_MAP)
    merged16 = merge_lora({k: v.half() for k, v in model.state_dict().items()}, lora, KEY_MAP)
    assert all(v.dtype == torch.float16 for v in merged16.values())
    for key in KEY_MAP.values():
        torch.testing.assert_close(merged16[key].float(), merged32[key], rtol=1e-3, atol=1e-3)


def test_layers_missing_from_the_key_map_are_listed():
    torch.manual_seed(0)
    model = TinySD()
    lora = trained_lora(model).kohya_state_dict()
    key_map = {"lora_unet_proj_in": "unet.proj_in.weight"}
    listed = "2 LoRA layer.*lora_te_text_model_encoder_layers_0_self_attn_q_proj, lora_unet_to_q"
    with pytest.raises(TrainerInputError, match=listed):
        merge_lora(model.state_dict(), lora, key_map)


def test_lora_for_another_model_is_refused_with_shapes():
    torch.manual_seed(0)
    model = TinySD()
    lora = trained_lora(model).kohya_state_dict()
    base = model.state_dict()
    base["unet.to_q.weight"] = torch.zeros(8, 16)
    with pytest.raises(TrainerInputError, match=r"lora_unet_to_q.*\[8, 16\].*another model"):
        merge_lora(base, lora, KEY_MAP)


def test_checkpoint_without_the_weight_is_refused():
    torch.manual_seed(0)
    model = TinySD()
    base = model.state_dict()
    del base["text.q_proj.weight"]
    with pytest.raises(TrainerInputError, match="text.q_proj.weight"):
        merge_lora(base, trained_lora(model).kohya_state_dict(), KEY_MAP)




# --- `python -m trainer_core merge` on a single-file (LDM layout) checkpoint --------------------

UNET = "model.diffusion_model."
TEXT = "cond_stage_model.transformer.text_model.encoder.layers.0."


def ldm_checkpoint() -> dict:
    """An SD1-layout checkpoint with one level of one res block (input_blocks 0-1, output_blocks
    0-1), a few attention layers, a text-encoder layer and parts no LoRA touches."""
    generator = torch.Generator().manual_seed(4)

    def weight(*shape):
        return torch.randn(shape, generator=generator).half()

    return {
        f"{UNET}input_blocks.0.0.weight": weight(8, 4, 3, 3),
        f"{UNET}input_blocks.1.0.in_layers.2.weight": weight(8, 8, 3, 3),
        f"{UNET}input_blocks.1.1.proj_in.weight": weight(8, 8, 1, 1),
        f"{UNET}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": weight(8, 6),
        f"{UNET}middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": weight(16, 8),
        f"{UNET}output_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight": weight(8, 8),
        f"{UNET}output_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias": weight(8),
        f"{TEXT}self_attn.q_proj.weight": weight(6, 6),
        f"{TEXT}mlp.fc1.weight": weight(12, 6),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(4)[None],
        "first_stage_model.decoder.conv_out.weight": weight(3, 4, 3, 3),
    }


EXPECTED_NAMES = {
    "lora_unet_down_blocks_0_resnets_0_conv1": f"{UNET}input_blocks.1.0.in_layers.2.weight",
    "lora_unet_down_blocks_0_attentions_0_proj_in": f"{UNET}input_blocks.1.1.proj_in.weight",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k":
        f"{UNET}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj":
        f"{UNET}middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
    "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn1_to_out_0":
        f"{UNET}output_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": f"{TEXT}self_attn.q_proj.weight",
    "lora_te_text_model_encoder_layers_0_mlp_fc1": f"{TEXT}mlp.fc1.weight",
}


def test_checkpoint_lora_keys_name_each_attention_and_resnet_layer_as_kohya_does():
    from trainer_core.merge import checkpoint_lora_keys
    assert checkpoint_lora_keys(ldm_checkpoint()) == EXPECTED_NAMES


def lora_for(checkpoint, names, rank=2):
    generator = torch.Generator().manual_seed(5)
    state = {}
    for name in names:
        weight = checkpoint[EXPECTED_NAMES[name]]
        tail = tuple(weight.shape[2:])
        state[f"{name}.lora_down.weight"] = torch.randn((rank, weight.shape[1]) + tail, generator=generator)
        state[f"{name}.lora_up.weight"] = torch.randn((weight.shape[0], rank) + tail, generator=generator)
        state[f"{name}.alpha"] = torch.tensor(1.0)
    return state


@pytest.fixture
def merge_files(tmp_path):
    from safetensors.torch import save_file
    checkpoint = ldm_checkpoint()
    save_file(checkpoint, str(tmp_path / "base.safetensors"))
    lora = lora_for(checkpoint, ["lora_unet_down_blocks_0_attentions_0_proj_in",
                                 "lora_te_text_model_encoder_layers_0_mlp_fc1"])
    save_file(lora, str(tmp_path / "lora.safetensors"))
    return tmp_path, checkpoint, lora


def merge_cli(folder, *extra):
    from trainer_core.cli import main
    return main(["merge", "--model", str(folder / "base.safetensors"), "--lora", str(folder / "lora.safetensors"),
                 "--output", str(folder / "out" / "merged"), *extra])


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_merge_cli_writes_the_merged_checkpoint_with_its_metadata(merge_files):
    from safetensors import safe_open
    folder, checkpoint, lora = merge_files
    previous = os.umask(0o022)
    try:
        assert merge_cli(folder, "--strength-model", "0.5", "--strength-clip", "2") == 0
    finally:
        os.umask(previous)
    path = folder / "out" / "merged.safetensors"
    assert os.stat(path).st_mode & 0o777 == 0o644
    with safe_open(str(path), framework="pt") as f:
        merged = {key: f.get_tensor(key) for key in f.keys()}
        metadata = f.metadata()
    expected = merge_lora(checkpoint, lora, EXPECTED_NAMES, 0.5, 2.0)
    assert set(merged) == set(checkpoint)
    for key, tensor in expected.items():
        assert torch.equal(merged[key], tensor.half() if tensor.is_floating_point() else tensor), key
    assert not torch.equal(merged[EXPECTED_NAMES["lora_unet_down_blocks_0_attentions_0_proj_in"]],
                           checkpoint[EXPECTED_NAMES["lora_unet_down_blocks_0_attentions_0_proj_in"]])
    assert metadata["merge.lora"] == "lora.safetensors" and metadata["merge.strength_clip"] == "2"
    assert metadata["merge.precision"] == "fp16" and metadata["modelspec.title"] == "merged"


def test_merge_cli_keeps_the_same_merge_and_needs_overwrite_for_another(merge_files, capsys, caplog):
    folder, _, _ = merge_files
    assert merge_cli(folder) == 0
    path = folder / "out" / "merged.safetensors"
    first = path.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="trainer_core"):
        assert merge_cli(folder) == 0
    assert path.stat().st_mtime_ns == first and "already merged" in caplog.text
    assert merge_cli(folder, "--precision", "fp32") == 2
    error = capsys.readouterr().err
    assert "--output" in error and "--overwrite" in error and "output_name" not in error
    assert merge_cli(folder, "--precision", "fp32", "--overwrite") == 0
    assert path.stat().st_mtime_ns != first


def test_merge_cli_refuses_a_lora_for_other_layers_naming_them(merge_files, capsys):
    from safetensors.torch import save_file
    folder, checkpoint, lora = merge_files
    save_file({k.replace("proj_in", "proj_out"): v for k, v in lora.items()}, str(folder / "lora.safetensors"))
    assert merge_cli(folder) == 2
    assert "lora_unet_down_blocks_0_attentions_0_proj_out" in capsys.readouterr().err
    assert not (folder / "out" / "merged.safetensors").exists()
