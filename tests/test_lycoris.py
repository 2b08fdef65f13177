"""LoCon, LoHa and LoKr on the tiny SD1 model, checked against the lycoris-lora package."""
import copy
import json
import logging
import os
import sys

import pytest
import torch
from torch import nn

from trainer_core.adapters.lora import LoRAConfig, LoRANetwork, LoRAModule
from trainer_core.config import TrainConfig
from trainer_core.errors import TrainerInputError
from trainer_core.formats import load_lora, network_modules
from trainer_core.jobs import LoRAJob
from trainer_core.merge import merge_lora
from trainer_core.train import train_lora

from test_train import unet_output

lycoris_kohya = pytest.importorskip("lycoris.kohya", reason="the lycoris-lora package is the oracle here")

TYPES = ["locon", "loha", "lokr"]
# (network_type, rank, factor): LoKr with the automatic factor, a given one, and a rank so high
# that every w2 is a full matrix (scale 1).
SHAPES = [("locon", 4, -1), ("loha", 4, -1), ("lokr", 4, -1), ("lokr", 2, 4), ("lokr", 16, -1)]


def network(parts, network_type, rank=4, factor=-1, train_text_encoder=True, seed=0):
    config = LoRAConfig(rank=rank, alpha=rank / 2, conv_rank=rank, conv_alpha=rank / 4, factor=factor,
                        network_type=network_type, train_text_encoder=train_text_encoder)
    torch.manual_seed(seed)
    return LoRANetwork(parts.unet_lora_targets, parts.text_encoder_lora_targets, config,
                       conv_targets=parts.unet_conv_targets)


def randomize(net, seed=1):
    """Every trainable tensor non-zero, so each factor shows up in the weight change."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def our_weight_change(module) -> torch.Tensor:
    if isinstance(module, LoRAModule):
        up, down = module.lora_up.weight, module.lora_down.weight
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * module.scale()
    return module.weight_change() * module.scale()


class TextModelRoot(nn.Module):
    """transformers 5's CLIPTextModel lost the `text_model` level that kohya names keep."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_model = text_encoder


@pytest.fixture(autouse=True)
def lycoris_default_targets_without_duplicates(monkeypatch):
    """create_network_from_weights first builds a default network; lycoris-lora 4.1.3's default
    targets name time_embedding.linear_1 twice in a diffusers UNet (as the TimestepEmbedding
    block and by name) and assert. That throwaway network is all this changes."""
    kohya = lycoris_kohya.LycorisNetworkKohya
    monkeypatch.setattr(kohya, "UNET_TARGET_REPLACE_MODULE",
                        [m for m in kohya.UNET_TARGET_REPLACE_MODULE if m != "TimestepEmbedding"])


def lycoris_network(parts, state_dict):
    net, _ = lycoris_kohya.create_network_from_weights(
        1.0, None, None, TextModelRoot(parts.text_encoder), parts.unet, weights_sd=dict(state_dict))
    return net


def lycoris_weight_change(module, shape):
    """dW = alpha/rank * (the module's product), as LyCORIS's modules define it. For LoHa and LoKr
    that is `get_weight` (which applies the scale); lycoris-lora 4.1.3's `get_diff_weight`
    multiplies it by the scale once more, unlike its LoCon, its functional API and every loader."""
    if isinstance(module, lycoris_kohya.LoConModule):
        return module.get_diff_weight(multiplier=1, shape=shape)[0]
    return module.get_weight(shape)


def train_config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), output_name="run", steps=4, learning_rate=1e-3, seed=3)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("network_type,rank,factor", SHAPES)
def test_weight_change_equals_lycoris_for_the_same_factors(parts, network_type, rank, factor):
    ours = network(parts, network_type, rank, factor)
    randomize(ours)
    state_dict = ours.kohya_state_dict(dtype=None)
    theirs = lycoris_network(parts, state_dict)
    theirs_by_name = {m.lora_name: m for m in theirs.unet_loras + theirs.text_encoder_loras}
    assert set(theirs_by_name) == set(ours.loras())
    for name, module in ours.loras().items():
        target = ours._targets[name]
        expected = lycoris_weight_change(theirs_by_name[name], target.weight.shape)
        torch.testing.assert_close(our_weight_change(module), expected.float(), rtol=1e-5, atol=1e-7,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("network_type,rank,factor", SHAPES)
def test_files_load_in_lycoris_with_no_missing_or_unexpected_keys(parts, network_type, rank, factor):
    """As kohya's tools load a network file: build from the weights, apply, load the state dict."""
    ours = network(parts, network_type, rank, factor)
    state_dict = ours.kohya_state_dict(dtype=None)
    unet, text_encoder = copy.deepcopy(parts.unet), TextModelRoot(copy.deepcopy(parts.text_encoder))
    theirs, _ = lycoris_kohya.create_network_from_weights(1.0, None, None, text_encoder, unet,
                                                          weights_sd=dict(state_dict))
    theirs.apply_to(text_encoder, unet, apply_text_encoder=True, apply_unet=True)
    missing, unexpected = theirs.load_state_dict(state_dict, strict=False)
    assert missing == [] and unexpected == []
    assert len(theirs.unet_loras) + len(theirs.text_encoder_loras) == len(ours.loras())


def test_locon_trains_the_resnet_and_sampler_convolutions_with_conv_rank(parts):
    net = network(parts, "locon", rank=4)
    names = set(net.loras())
    assert set(parts.unet_conv_targets) <= names
    assert any("_downsamplers_0_conv" in n for n in names) and any("_upsamplers_0_conv" in n for n in names)
    state = net.kohya_state_dict()
    conv1 = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert list(state[f"{conv1}.lora_down.weight"].shape) == [4, 32, 3, 3]
    assert list(state[f"{conv1}.lora_up.weight"].shape) == [32, 4, 1, 1]
    assert float(state[f"{conv1}.alpha"]) == 1.0  # conv_alpha
    shortcut = "lora_unet_down_blocks_1_resnets_0_conv_shortcut"
    assert float(state[f"{shortcut}.alpha"]) == 2.0  # 1x1: rank and alpha, as LyCORIS


def test_plain_lora_ignores_the_convolutions_and_keeps_its_cache_key(parts):
    net = network(parts, "lora")
    assert set(net.loras()) == set(parts.unet_lora_targets) | set(parts.text_encoder_lora_targets)
    assert set(LoRAConfig().cache_fields()) == {"rank", "alpha", "dropout", "train_unet", "train_text_encoder"}
    assert "network_type" in LoRAConfig(network_type="loha").cache_fields()


def test_loha_and_lokr_files_use_the_lycoris_keys(parts):
    loha = network(parts, "loha").kohya_state_dict()
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {k[len(name) + 1:] for k in loha if k.startswith(name + ".")} == {
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
    lokr = network(parts, "lokr", rank=2).kohya_state_dict()  # 32 = 4 x 8: w2 [8, 8] at rank 2
    assert {k[len(name) + 1:] for k in lokr if k.startswith(name + ".")} == {
        "lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}
    full = network(parts, "lokr", rank=16).kohya_state_dict()
    assert {k[len(name) + 1:] for k in full if k.startswith(name + ".")} == {"lokr_w1", "lokr_w2", "alpha"}
    assert float(full[name + ".alpha"]) == 16.0  # a full w2 means scale 1: alpha = rank, as LyCORIS writes


@pytest.mark.parametrize("network_type", TYPES)
def test_new_network_changes_nothing(parts, network_type):
    before = unet_output(parts)
    net = network(parts, network_type)
    for module in net.loras().values():
        assert torch.count_nonzero(our_weight_change(module)) == 0
    with net.attached():
        assert torch.equal(unet_output(parts), before)


@pytest.mark.parametrize("network_type", TYPES)
def test_base_is_bit_identical_after_detaching(parts, network_type):
    before = unet_output(parts)
    weights = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    net = network(parts, network_type)
    randomize(net)
    with net.attached():
        assert not torch.equal(unet_output(parts), before)
    assert torch.equal(unet_output(parts), before)
    assert all(torch.equal(v, weights[k]) for k, v in parts.unet.state_dict().items())


@pytest.mark.parametrize("network_type,rank,factor", SHAPES)
def test_merged_weights_equal_the_hooked_network(parts, network_type, rank, factor):
    """The merge's per-type weight change (ComfyUI's rules, read from the file) equals what the
    hooks add while training."""
    net = network(parts, network_type, rank, factor, train_text_encoder=False)
    randomize(net)
    with net.attached():
        hooked = unet_output(parts)
    unet = copy.deepcopy(parts.unet)
    targets = dict(parts.unet_lora_targets, **parts.unet_conv_targets)
    paths = {name: _path(parts.unet, module) + ".weight" for name, module in targets.items()}
    merged = merge_lora(unet.state_dict(), net.kohya_state_dict(dtype=None), paths)
    unet.load_state_dict(merged)
    merged_parts = type(parts)(**{**parts.__dict__, "unet": unet,
                                  "predict_noise": lambda x, t, c: unet(x, t, c).sample})
    torch.testing.assert_close(unet_output(merged_parts), hooked, rtol=1e-4, atol=1e-5)


def _path(root, module):
    return next(name for name, m in root.named_modules() if m is module)


@pytest.mark.parametrize("network_type", TYPES)
def test_resume_is_bit_exact(parts, dataset, tmp_path, network_type):
    config = LoRAConfig(network_type=network_type, train_text_encoder=True)
    full = train_lora(parts, dataset, config, train_config(tmp_path, output_name="full", steps=4, save_every_steps=2))
    resumed = train_lora(parts, dataset, config, train_config(
        tmp_path, output_name="resumed", steps=4, resume_from=os.path.join(str(tmp_path), "full_2.safetensors")))
    assert resumed.losses == full.losses
    assert set(resumed.kohya_state_dict) == set(full.kohya_state_dict)
    for key, tensor in full.kohya_state_dict.items():
        assert torch.equal(tensor, resumed.kohya_state_dict[key]), key
    assert any(t.abs().max() > 0 for k, t in full.kohya_state_dict.items() if k.endswith(("_w2_b", "_w2_a", "lora_up.weight")))


@pytest.mark.parametrize("network_type", TYPES)
def test_saved_file_has_lycoris_metadata_and_requeue_hits_the_cache(parts, dataset, tmp_path, network_type):
    config = LoRAConfig(network_type=network_type, conv_rank=2, conv_alpha=1.0, factor=4)
    first = train_lora(parts, dataset, config, train_config(tmp_path, steps=2))
    state_dict, metadata = load_lora(first.final_path)
    file_type = {"locon": "lora", "loha": "loha", "lokr": "lokr"}[network_type]
    assert {m["type"] for m in network_modules(state_dict).values()} == {file_type}
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"]) == {
        "algo": network_type, "conv_dim": "2", "conv_alpha": "1", "factor": "4"}
    again = train_lora(parts, dataset, config, train_config(tmp_path, steps=2))
    assert again.from_cache
    other = train_lora(parts, dataset, LoRAConfig(network_type=network_type, conv_rank=3, conv_alpha=1.0, factor=4),
                       train_config(tmp_path, steps=2, overwrite=True))
    assert not other.from_cache


def test_resume_with_another_network_type_says_which_to_set(parts, dataset, tmp_path):
    train_lora(parts, dataset, LoRAConfig(network_type="loha"), train_config(tmp_path, steps=2, save_every_steps=1))
    with pytest.raises(TrainerInputError, match="network_type to loha"):
        train_lora(parts, dataset, LoRAConfig(network_type="locon"), train_config(
            tmp_path, output_name="other", steps=2, resume_from=os.path.join(str(tmp_path), "run_1.safetensors")))


def test_plain_lora_resuming_a_loha_file_says_to_set_network_type(parts, dataset, tmp_path):
    train_lora(parts, dataset, LoRAConfig(network_type="loha"), train_config(tmp_path, steps=2, save_every_steps=1))
    with pytest.raises(TrainerInputError, match="set network_type to loha"):
        train_lora(parts, dataset, LoRAConfig(), train_config(
            tmp_path, output_name="other", steps=2, resume_from=os.path.join(str(tmp_path), "run_1.safetensors")))


def test_lokr_without_lycoris_installed_says_how_to_install(parts, monkeypatch):
    for name in [m for m in sys.modules if m == "lycoris" or m.startswith("lycoris.")]:
        monkeypatch.setitem(sys.modules, name, None)  # import now raises ImportError
    with pytest.raises(TrainerInputError, match="pip install lycoris-lora"):
        network(parts, "lokr")
    network(parts, "loha")  # LoHa and LoCon need nothing beyond torch
    network(parts, "locon")


def test_loha_above_rank_32_warns_with_the_guideline(caplog):
    with caplog.at_level(logging.WARNING):
        LoRANetwork({"lora_unet_layer": nn.Linear(64, 64)}, {}, LoRAConfig(network_type="loha", rank=33))
    assert "rank 32 or less" in caplog.text


@pytest.mark.parametrize("config,field", [
    (LoRAConfig(network_type="oft"), "network_type"),
    (LoRAConfig(conv_rank=-1), "conv_rank"),
    (LoRAConfig(conv_alpha=0), "conv_alpha"),
    (LoRAConfig(factor=1), "factor"),
])
def test_invalid_lycoris_settings_name_the_field(config, field):
    with pytest.raises(TrainerInputError, match=field):
        config.validate()


def test_job_describes_lora_exactly_as_before(parts, dataset, tmp_path):
    job = LoRAJob(parts, LoRAConfig(), train_config(tmp_path), dataset)
    assert job.describe() == {"kind": "LoRA", "rank": 4, "alpha": 4.0, "dropout": 0.0, "train_unet": True,
                              "train_text_encoder": False}
