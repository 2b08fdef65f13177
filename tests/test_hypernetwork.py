"""A1111 hypernetworks: the module layout A1111 saves, hooks on a tiny UNet, files, and the
ComfyUI HypernetworkLoader reading what we write (needs COMFYUI_PATH, skipped otherwise)."""
import os
import pickle
import sys

import pytest
import torch
from torch import nn

from trainer_core.adapters.hypernetwork import (
    ACTIVATIONS,
    Hypernetwork,
    HypernetworkConfig,
    file_short_hash,
    learning_rate_warning,
    load_hypernetwork,
    load_optimizer_sidecar,
    save_hypernetwork,
    save_optimizer_sidecar,
)
from trainer_core.errors import TrainerInputError

torch.set_num_threads(1)

STRUCTURES = ["1,2,1", "1,2,2,1", "1,1"]


def make(widths=(8, 12), seed=0, **options) -> Hypernetwork:
    torch.manual_seed(seed)
    return Hypernetwork(list(widths), HypernetworkConfig(**options))


def weights_of(net: Hypernetwork) -> dict:
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8,
    ).eval()
    unet.requires_grad_(False)
    return unet


def unet_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 7, 32, generator=g)


def run_unet(unet, inputs):
    x, t, context = inputs
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=context).sample


# ---------------------------------------------------------------------------------------
# The module: layout, init, forward


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_forward_keeps_context_shape_for_every_activation_and_structure(activation):
    for structure in STRUCTURES:
        for layer_norm in (False, True):
            for dropout in (False, True):
                net = make(layer_structure=structure, activation=activation, layer_norm=layer_norm,
                           dropout=dropout, last_layer_dropout=dropout, weight_initialization="XavierNormal")
                for width in net.widths:
                    context = torch.randn(2, 5, width)
                    for module in net.pair(width):
                        out = module(context, 0.7)
                        assert out.shape == context.shape and out.dtype == torch.float32
                        assert torch.isfinite(out).all()


@pytest.mark.parametrize("options, keys", [
    # Sequential slots from A1111's HypernetworkModule.__init__: Linear, activation (not after the
    # last Linear unless activate_output), LayerNorm, Dropout per parse_dropout_structure.
    (dict(layer_structure="1,2,1", activation="relu"), [0, 2]),
    (dict(layer_structure="1,2,1", activation="linear"), [0, 1]),
    (dict(layer_structure="1,2,2,1", activation="mish", layer_norm=True, dropout=True), [0, 2, 4, 6, 7, 8]),
    (dict(layer_structure="1,2,2,1", activation="linear", layer_norm=True, dropout=True,
          last_layer_dropout=True), [0, 1, 3, 4, 6, 7]),
    (dict(layer_structure="1,2,2,1", activation="tanh", activate_output=True), [0, 2, 4]),
    (dict(layer_structure="1,1", activation="mish", activate_output=True, dropout=True), [0]),
])
def test_state_dict_keys_are_a1111_sequential_indices(options, keys):
    net = make(widths=(8,), **options)
    expected = [f"linear.{i}.{p}" for i in keys for p in ("weight", "bias")]
    assert list(net.pair(8)[0].state_dict()) == expected
    assert list(net.to_a1111("n", 0)[8][1]) == expected


def test_dropout_structure_matches_a1111():
    assert make(layer_structure="1,2,2,1", dropout=True).dropout_structure == [0, 0.3, 0, 0]
    assert make(layer_structure="1,2,2,1", dropout=True, last_layer_dropout=True).dropout_structure == [0, 0.3, 0.3, 0]
    assert make(layer_structure="1,2,1", dropout=True).dropout_structure == [0, 0, 0]
    assert make(layer_structure="1,2,2,1").dropout_structure == [0, 0, 0, 0]


def test_normal_init_is_a1111s_small_weights_and_zero_biases():
    net = make(widths=(320,), layer_structure="1,2,1", layer_norm=True, activation="relu")
    layers = net.pair(320)[0].weighted_layers()
    assert [type(m) for m in layers] == [nn.Linear, nn.LayerNorm, nn.Linear, nn.LayerNorm]
    for layer in layers:
        assert torch.all(layer.bias == 0)
        # A1111 gives LayerNorm weights N(0, 0.01) too, not ones.
        assert 0.007 < layer.weight.std().item() < 0.013 and abs(layer.weight.mean().item()) < 0.002


@pytest.mark.parametrize("init", ["XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"])
def test_other_initializations_zero_the_biases_and_scale_weights(init):
    linear = make(widths=(64,), layer_structure="1,2,1", weight_initialization=init).pair(64)[0].linear[0]
    assert torch.all(linear.bias == 0)
    assert linear.weight.std().item() > 0.05  # well above Normal's 0.01


def test_eval_mode_disables_dropout_and_training_enables_it():
    net = make(widths=(16,), layer_structure="1,4,4,1", dropout=True, last_layer_dropout=True,
               weight_initialization="XavierNormal")
    context = torch.randn(3, 9, 16)
    module = net.pair(16)[1]
    assert not net.training  # a new or loaded hypernetwork is ready for generation, as in A1111
    assert torch.equal(module(context), module(context))
    net.train()
    assert not torch.equal(module(context), module(context))
    net.eval()
    assert torch.equal(module(context), module(context))


def test_strength_applies_in_eval_and_training_uses_full_strength():
    net = make(widths=(8,), weight_initialization="XavierNormal", activation="tanh")
    module, context = net.pair(8)[0], torch.randn(1, 3, 8)
    delta = module(context, 1.0) - context
    assert torch.allclose(module(context, 0.5) - context, delta * 0.5, atol=1e-6)
    net.train()
    assert torch.allclose(module(context, 0.5), context + delta, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Config validation


@pytest.mark.parametrize("field, value", [
    ("layer_structure", "2,2,1"),
    ("layer_structure", "1,2,2"),
    ("layer_structure", "1"),
    ("layer_structure", "1,0,1"),
    ("layer_structure", "1,-2,1"),
    ("layer_structure", "1,two,1"),
    ("activation", "gelu"),
    ("activation", "Mish"),
    ("weight_initialization", "Kaiming"),
    ("layer_norm", True),  # with the default mish and activate_output off: ComfyUI would misread it
])
def test_config_errors_name_the_field(field, value):
    config = HypernetworkConfig(**{field: value})
    with pytest.raises(TrainerInputError, match=field):
        config.validate()


def test_layer_norm_is_accepted_where_comfyui_reads_it_as_trained():
    HypernetworkConfig(layer_norm=True, activation="linear").validate()
    HypernetworkConfig(layer_norm=True, activation="mish", activate_output=True).validate()


def test_foreign_layer_norm_file_loads_with_a1111_layout():
    """A1111 files with layer_norm and an activation but no activate_output still load, as A1111 runs them."""
    d = make(widths=(8,), layer_norm=True, activation="relu").to_a1111("a1111", 10)
    rebuilt = Hypernetwork.from_a1111(d)
    assert [type(m) for m in rebuilt.pair(8)[0].linear] == [nn.Linear, nn.ReLU, nn.LayerNorm, nn.Linear, nn.ReLU,
                                                             nn.LayerNorm, nn.Linear, nn.LayerNorm]


def test_layer_structure_accepts_lists_and_fractions():
    assert HypernetworkConfig(layer_structure=[1, 2, 1]).layer_sizes() == [1.0, 2.0, 1.0]
    assert HypernetworkConfig(layer_structure=" 1, 1.5 ,1").layer_sizes() == [1.0, 1.5, 1.0]
    net = make(widths=(320,), layer_structure="1,1.5,1")
    assert net.pair(320)[0].linear[0].out_features == 480


def test_learning_rate_warning_only_for_high_rates():
    assert learning_rate_warning(1e-5) is None
    assert learning_rate_warning(1e-4) is None
    message = learning_rate_warning(1e-3)
    assert "hypernetwork" in message and "1e-5" in message


# ---------------------------------------------------------------------------------------
# Hooks on a UNet


def test_for_unet_finds_every_context_width(tiny_unet):
    net = Hypernetwork.for_unet(tiny_unet, HypernetworkConfig())
    # attn1 reads the 32/64-channel features, attn2 the 32-wide text context.
    assert net.widths == [32, 64]
    with pytest.raises(TrainerInputError, match="to_k"):
        Hypernetwork.for_unet(nn.Sequential(nn.Linear(3, 3)), HypernetworkConfig())


def test_strength_zero_gives_exactly_the_base_output(tiny_unet):
    inputs = unet_inputs()
    base = run_unet(tiny_unet, inputs)
    net = Hypernetwork.for_unet(tiny_unet, HypernetworkConfig(weight_initialization="XavierNormal"))
    net.strength = 0.0
    with net.attached(tiny_unet):
        assert torch.equal(run_unet(tiny_unet, inputs), base)
        net.strength = 1.0
        assert not torch.allclose(run_unet(tiny_unet, inputs), base, atol=1e-4)


def test_attached_changes_output_and_detaching_restores_it_bit_for_bit(tiny_unet):
    inputs = unet_inputs()
    base = run_unet(tiny_unet, inputs)
    before = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    net = Hypernetwork.for_unet(tiny_unet, HypernetworkConfig(weight_initialization="XavierNormal"))
    with pytest.raises(ZeroDivisionError):
        with net.attached(tiny_unet):
            assert not torch.allclose(run_unet(tiny_unet, inputs), base, atol=1e-4)
            1 / 0
    assert torch.equal(run_unet(tiny_unet, inputs), base)
    assert all(not m._forward_pre_hooks for m in tiny_unet.modules())
    after = tiny_unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_hooks_transform_k_and_v_contexts_before_projection(tiny_unet):
    net = Hypernetwork.for_unet(tiny_unet, HypernetworkConfig(weight_initialization="KaimingNormal"))
    net.strength = 0.8
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    attn = tiny_unet.get_submodule(name)
    context = torch.randn(1, 6, 64)
    k_net, v_net = net.pair(64)
    with torch.no_grad():
        expected_k = attn.to_k(context + k_net.linear(context) * 0.8)
        expected_v = attn.to_v(context + v_net.linear(context) * 0.8)
        with net.attached(tiny_unet):
            assert torch.allclose(attn.to_k(context), expected_k, atol=1e-6)
            assert torch.allclose(attn.to_v(context), expected_v, atol=1e-6)


def test_half_precision_context_comes_back_in_its_dtype():
    block = nn.Module()
    block.attn2 = nn.Module()
    block.attn2.to_k = nn.Linear(8, 8).to(torch.bfloat16)
    net = make(widths=(8,), weight_initialization="XavierNormal")
    with torch.no_grad(), net.attached(block):
        out = block.attn2.to_k(torch.randn(2, 3, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_one_training_step_changes_only_hypernetwork_weights():
    from diffusers.models.attention import BasicTransformerBlock
    torch.manual_seed(0)
    block = BasicTransformerBlock(dim=16, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=12)
    block.requires_grad_(False)
    base = {k: v.clone() for k, v in block.state_dict().items()}
    net = Hypernetwork.for_unet(block, HypernetworkConfig(layer_norm=True, dropout=True, activate_output=True))
    assert net.widths == [12, 16]
    start = weights_of(net)
    optimizer = torch.optim.AdamW(net.param_groups(1e-3))
    net.train()
    with net.attached(block):
        out = block(torch.randn(2, 5, 16), encoder_hidden_states=torch.randn(2, 4, 12))
        loss = (out - 1).pow(2).mean()
        loss.backward()
    optimizer.step()
    net.eval()
    assert all(p.grad is None for p in block.parameters())
    assert all(torch.equal(v, base[k]) for k, v in block.state_dict().items())
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, start[k])}
    assert changed == set(start)


# ---------------------------------------------------------------------------------------
# Files


def test_saved_file_loads_back_with_identical_outputs(tmp_path):
    net = make(widths=(8, 12), layer_structure="1,2,2,1", activation="elu", layer_norm=True, dropout=True,
               weight_initialization="XavierUniform")
    path = tmp_path / "style.pt"
    save_hypernetwork(path, net, name="style", step=150, sd_checkpoint="abcdef0123", sd_checkpoint_name="sd15")
    loaded, step = load_hypernetwork(path)
    assert step == 150
    assert loaded.config == net.config and loaded.dropout_structure == net.dropout_structure
    assert loaded.state_dict().keys() == net.state_dict().keys()
    for width in (8, 12):
        context = torch.randn(2, 4, width)
        for ours, theirs in zip(net.pair(width), loaded.pair(width)):
            assert torch.equal(ours(context, 0.6), theirs(context, 0.6))


def test_saved_file_is_plain_a1111_dict(tmp_path):
    net = make(widths=(320, 768), layer_structure="1,2,1", activation="mish", layer_norm=True)
    path = tmp_path / "a.pt"
    save_hypernetwork(path, net, name="a", step=7)
    d = torch.load(path, weights_only=True)
    widths = [k for k in d if not isinstance(k, str)]
    assert widths == [320, 768] and all(type(k) is int for k in widths)
    assert isinstance(d[320], tuple) and len(d[320]) == 2
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for sd in d[768] for t in sd.values())
    assert list(d)[2:] == ["step", "name", "layer_structure", "activation_func", "is_layer_norm",
                           "weight_initialization", "sd_checkpoint", "sd_checkpoint_name", "activate_output",
                           "use_dropout", "dropout_structure", "last_layer_dropout", "optional_info"]
    assert d["layer_structure"] == [1.0, 2.0, 1.0] and d["activation_func"] == "mish"
    assert d["is_layer_norm"] is True and d["use_dropout"] is False and d["step"] == 7


def test_dropout_is_recorded_in_dropout_structure_not_use_dropout(tmp_path):
    """A1111 rebuilds dropouts from dropout_structure; ComfyUI only from use_dropout (and keeps them on)."""
    net = make(widths=(8,), layer_structure="1,2,2,1", dropout=True, last_layer_dropout=True)
    d = net.to_a1111("d", 1)
    assert d["use_dropout"] is False and d["last_layer_dropout"] is True
    assert d["dropout_structure"] == [0.0, 0.3, 0.3, 0.0]
    path = tmp_path / "d.pt"
    save_hypernetwork(path, net, name="d", step=1)
    loaded, _ = load_hypernetwork(path)
    assert loaded.config.dropout and loaded.config.last_layer_dropout
    assert list(loaded.pair(8)[0].state_dict()) == list(d[8][0])


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    path = tmp_path / "a.pt"
    save_hypernetwork(path, make(seed=0), name="a", step=1)
    with pytest.raises(TrainerInputError):
        save_hypernetwork(path, make(seed=1), name="a", step=2)
    save_hypernetwork(path, make(seed=1), name="a", step=2, overwrite=True)
    assert load_hypernetwork(path)[1] == 2
    assert sorted(os.listdir(tmp_path)) == ["a.pt"]


def test_file_without_layer_structure_is_inferred_from_weights(tmp_path):
    net = make(widths=(8, 12), layer_structure="1,3,1", activation="relu", layer_norm=True)
    d = net.to_a1111("old", 3)
    for key in ("layer_structure", "is_layer_norm", "dropout_structure"):
        del d[key]
    rebuilt = Hypernetwork.from_a1111(d)
    assert rebuilt.config.layer_sizes() == [1.0, 3.0, 1.0] and rebuilt.config.layer_norm
    context = torch.randn(1, 2, 12)
    assert torch.equal(rebuilt.pair(12)[1](context), net.pair(12)[1](context))


def test_file_with_mismatched_weights_is_refused():
    d = make(widths=(8,), layer_structure="1,2,1").to_a1111("x", 0)
    d["layer_structure"] = [1.0, 3.0, 1.0]
    with pytest.raises(TrainerInputError, match="layer_structure"):
        Hypernetwork.from_a1111(d)


class NotPlain:
    pass


@pytest.mark.parametrize("kind, expect", [
    ("lora", "LoRA"),
    ("checkpoint", "checkpoint"),
    ("pickle", "could not be read"),
    ("missing", "does not exist"),
])
def test_wrong_kind_of_file_says_a_hypernetwork_was_expected(tmp_path, kind, expect):
    if kind == "lora":
        from safetensors.torch import save_file
        path = tmp_path / "x.safetensors"
        name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        save_file({f"{name}.lora_down.weight": torch.zeros(4, 320), f"{name}.lora_up.weight": torch.zeros(320, 4),
                   f"{name}.alpha": torch.tensor(4.0)}, str(path))
    elif kind == "checkpoint":
        path = tmp_path / "x.ckpt"
        torch.save({"state_dict": {"model.diffusion_model.out.0.weight": torch.zeros(3)}}, path)
    elif kind == "pickle":
        path = tmp_path / "x.pt"
        with open(path, "wb") as f:
            pickle.dump({"thing": NotPlain()}, f, protocol=2)
    else:
        path = tmp_path / "none.pt"
    with pytest.raises(TrainerInputError, match=expect) as error:
        load_hypernetwork(path)
    if kind != "missing":
        assert "expected an A1111 hypernetwork" in str(error.value)


def test_optimizer_sidecar_round_trip_in_a1111_layout(tmp_path):
    net = make(widths=(8,))
    optimizer = torch.optim.AdamW(net.param_groups(1e-5))
    net.pair(8)[0](torch.randn(1, 2, 8)).sum().backward()
    optimizer.step()
    path = tmp_path / "h.pt"
    save_hypernetwork(path, net, name="h", step=1)
    sidecar = save_optimizer_sidecar(path, "AdamW", optimizer.state_dict())
    assert sidecar == str(path) + ".optim"
    raw = torch.load(sidecar, weights_only=True)
    assert list(raw) == ["optimizer_name", "hash", "optimizer_state_dict"]
    assert raw["hash"] == file_short_hash(path) and len(raw["hash"]) == 10
    loaded = load_optimizer_sidecar(path)
    assert loaded["optimizer_name"] == "AdamW"
    fresh = torch.optim.AdamW(net.param_groups(1e-5))
    fresh.load_state_dict(loaded["optimizer_state_dict"])
    assert fresh.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]


def test_optimizer_sidecar_for_another_file_version_is_ignored(tmp_path, caplog):
    path = tmp_path / "h.pt"
    save_hypernetwork(path, make(seed=0), name="h", step=1)
    save_optimizer_sidecar(path, "AdamW", {"state": {}, "param_groups": []})
    save_hypernetwork(path, make(seed=1), name="h", step=2, overwrite=True)
    assert load_optimizer_sidecar(path) is None
    assert "another version" in caplog.text
    assert load_optimizer_sidecar(tmp_path / "missing.pt") is None


# ---------------------------------------------------------------------------------------
# ComfyUI's HypernetworkLoader on our files


@pytest.fixture(scope="module")
def comfy_loader():
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        print("COMFYUI_PATH is not set: skipping the ComfyUI HypernetworkLoader checks")
        pytest.skip("COMFYUI_PATH is not set")
    if comfy_path not in sys.path:
        sys.path.insert(0, comfy_path)
    try:
        from comfy_extras.nodes_hypernetwork import load_hypernetwork_patch
    except Exception as error:
        print(f"cannot import ComfyUI from {comfy_path}: {error!r}")
        pytest.skip(f"cannot import comfy_extras.nodes_hypernetwork from {comfy_path}: {error!r}")
    return load_hypernetwork_patch


@pytest.mark.parametrize("options", [
    dict(activation="linear"),
    dict(activation="mish"),
    dict(activation="relu"),
    dict(activation="linear", layer_norm=True),
    dict(activation="mish", layer_norm=True, activate_output=True),
    dict(activation="relu", layer_norm=True, activate_output=True),
    dict(activation="mish", activate_output=True),
    dict(activation="swish", layer_structure="1,2,1", activate_output=True),
    dict(activation="mish", dropout=True),
    dict(activation="elu", layer_norm=True, dropout=True, last_layer_dropout=True, activate_output=True),
    dict(activation="tanh", layer_structure="1,1", activate_output=True),
])
def test_comfyui_loader_computes_the_same_k_and_v(tmp_path, comfy_loader, options):
    config = HypernetworkConfig(weight_initialization="XavierNormal", **options)
    config.validate()
    torch.manual_seed(0)
    net = Hypernetwork([8, 12], config)
    path = tmp_path / "h.pt"
    save_hypernetwork(path, net, name="h", step=1)
    patch = comfy_loader(str(path), 0.7)
    assert patch is not None and sorted(patch.hypernet) == [8, 12]
    for width in (8, 12):
        # ComfyUI never switches what it builds to eval(): a Dropout there would act while generating.
        assert not any(isinstance(m, nn.Dropout) for m in patch.hypernet[width].modules())
        context = torch.randn(2, 5, width)
        with torch.no_grad():
            _, k, v = patch(None, context, context, {})
            k_net, v_net = net.pair(width)
            assert torch.allclose(k, k_net(context, 0.7), atol=1e-6)
            assert torch.allclose(v, v_net(context, 0.7), atol=1e-6)


def test_comfyui_unet_with_loader_patch_equals_our_hooks(tmp_path, comfy_loader):
    """HypernetworkLoader's attn1/attn2 patches on ComfyUI's own UNetModel give what our hooks give."""
    from comfy.cli_args import args
    args.cpu = True  # read when comfy.model_management is first imported; as tests/integration does
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    torch.manual_seed(0)
    unet = UNetModel(
        image_size=16, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1, channel_mult=(1, 2),
        num_head_channels=8, use_spatial_transformer=True, transformer_depth=[1, 1],
        transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, context_dim=24,
        operations=comfy.ops.disable_weight_init,
    ).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.2)  # disable_weight_init leaves them uninitialized
    net = Hypernetwork.for_unet(unet, HypernetworkConfig(activation="mish", layer_norm=True, activate_output=True,
                                                         weight_initialization="XavierNormal"))
    assert net.widths == [24, 32, 64]
    path = tmp_path / "h.pt"
    save_hypernetwork(path, net, name="h", step=1)
    patch = comfy_loader(str(path), 0.6)
    x, t, context = torch.randn(1, 4, 16, 16), torch.tensor([20.0]), torch.randn(1, 5, 24)
    with torch.no_grad():
        base = unet(x, t, context)
        patched = unet(x, t, context, transformer_options={
            "patches": {"attn1_patch": [patch], "attn2_patch": [patch]}})
        net.strength = 0.6
        with net.attached(unet):
            ours = unet(x, t, context)
    effect = (patched - base).abs().max().item()
    print(f"hypernetwork effect {effect:.2e}, ours vs ComfyUI {(ours - patched).abs().max().item():.2e}")
    assert effect > 1e-3
    assert torch.allclose(ours, patched, atol=1e-6, rtol=0)
