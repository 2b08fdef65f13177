"""LoRANetwork on tiny modules: the math, hook removal, kohya keys, dtypes, bad files."""
import math

import pytest
import torch
from torch import nn

from trainer_core.adapters.lora import LoRAConfig, LoRANetwork
from trainer_core.errors import TrainerInputError

torch.set_num_threads(1)


class TinyModel(nn.Module):
    """A 'UNet' with a Linear and a 1x1 conv, and a 'text encoder' Linear."""

    def __init__(self):
        super().__init__()
        self.proj_in = nn.Conv2d(6, 10, 1)
        self.to_q = nn.Linear(10, 12)
        self.fc1 = nn.Linear(5, 7)

    def unet(self, x):  # x: [B, 6, H, W]
        h = self.proj_in(x)
        return self.to_q(h.permute(0, 2, 3, 1))

    def text(self, tokens):  # tokens: [B, T, 5]
        return self.fc1(tokens)


TE_NAME = "lora_te_text_model_encoder_layers_0_mlp_fc1"


def targets(model):
    unet = {"lora_unet_proj_in": model.proj_in, "lora_unet_to_q": model.to_q}
    text_encoder = {TE_NAME: model.fc1}
    return unet, text_encoder


def make(rank=4, alpha=2.0, train_text_encoder=True, seed=0):
    torch.manual_seed(seed)
    model = TinyModel()
    config = LoRAConfig(rank=rank, alpha=alpha, train_text_encoder=train_text_encoder)
    network = LoRANetwork(*targets(model), config)
    return model, network


def randomize_up(network, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.loras().values():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=generator))


def inputs(seed=2):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 6, 3, 3, generator=generator), torch.randn(2, 4, 5, generator=generator)


def outputs(model, x, tokens):
    return model.unet(x), model.text(tokens)


def test_new_lora_changes_nothing():
    model, network = make()
    x, tokens = inputs()
    before = outputs(model, x, tokens)
    with network.attached():
        during = outputs(model, x, tokens)
    assert all(torch.equal(a, b) for a, b in zip(before, during))


def test_detached_model_is_bit_identical_to_before():
    model, network = make()
    randomize_up(network)
    x, tokens = inputs()
    before = outputs(model, x, tokens)
    with network.attached():
        during = outputs(model, x, tokens)
    after = outputs(model, x, tokens)
    assert not torch.allclose(before[0], during[0]) and not torch.allclose(before[1], during[1])
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(not m._forward_hooks for m in model.modules())


def test_hooks_are_removed_when_the_block_raises():
    model, network = make()
    with pytest.raises(KeyError):
        with network.attached():
            raise KeyError("boom")
    assert all(not m._forward_hooks for m in model.modules())
    with network.attached():  # attachable again
        pass


def test_linear_and_conv_outputs_follow_the_kohya_formula():
    model, network = make(rank=3, alpha=1.5)
    randomize_up(network)
    network.multiplier = 0.7
    x, tokens = inputs()
    scale = 0.7 * 1.5 / 3
    loras = network.loras()
    conv, q, fc1 = loras["lora_unet_proj_in"], loras["lora_unet_to_q"], loras[TE_NAME]
    conv2d = nn.functional.conv2d
    with torch.no_grad():
        h = model.proj_in(x) + scale * conv2d(conv2d(x, conv.lora_down.weight), conv.lora_up.weight)
        h = h.permute(0, 2, 3, 1)
        expected_unet = model.to_q(h) + scale * (h @ q.lora_down.weight.T @ q.lora_up.weight.T)
        expected_text = model.fc1(tokens) + scale * (tokens @ fc1.lora_down.weight.T @ fc1.lora_up.weight.T)
        with network.attached():
            unet_out, text_out = outputs(model, x, tokens)
    torch.testing.assert_close(unet_out, expected_unet)
    torch.testing.assert_close(text_out, expected_text)


def test_multiplier_scales_the_lora_and_zero_turns_it_off():
    model, network = make()
    randomize_up(network)
    x, tokens = inputs()
    base = model.unet(x)
    with network.attached():
        full = model.unet(x)
        network.multiplier = 0.0
        off = model.unet(x)
    assert torch.equal(off, base)
    assert not torch.allclose(full, base)


def test_down_is_kaiming_uniform_and_up_starts_at_zero():
    _, network = make(rank=4)
    lora = network.loras()["lora_unet_to_q"]
    bound = 1 / math.sqrt(10)  # kaiming_uniform(a=sqrt(5)) on fan_in 10, as nn.Linear and kohya
    assert lora.lora_down.weight.abs().max() <= bound
    assert lora.lora_down.weight.abs().max() > bound / 2
    assert torch.count_nonzero(lora.lora_up.weight) == 0


def test_kohya_state_dict_names_shapes_and_dtypes():
    _, network = make(rank=4, alpha=2.0)
    state = network.kohya_state_dict()
    assert set(state) == {
        f"{name}.{part}"
        for name in ("lora_unet_proj_in", "lora_unet_to_q", "lora_te_text_model_encoder_layers_0_mlp_fc1")
        for part in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    assert state["lora_unet_proj_in.lora_down.weight"].shape == (4, 6, 1, 1)
    assert state["lora_unet_proj_in.lora_up.weight"].shape == (10, 4, 1, 1)
    assert state["lora_unet_to_q.lora_down.weight"].shape == (4, 10)
    assert state["lora_unet_to_q.lora_up.weight"].shape == (12, 4)
    assert state["lora_unet_to_q.alpha"].shape == ()
    assert float(state["lora_unet_to_q.alpha"]) == 2.0
    assert all(t.dtype == torch.float16 for t in state.values())
    fp32 = network.kohya_state_dict(torch.float32)
    assert all(t.dtype == torch.float32 for t in fp32.values())
    with torch.no_grad():
        network.loras()["lora_unet_to_q"].lora_up.weight.fill_(1.0)
    assert torch.count_nonzero(fp32["lora_unet_to_q.lora_up.weight"]) == 0  # a copy, not the live weights


def test_text_encoder_layers_only_when_asked():
    _, network = make(train_text_encoder=False)
    assert not any(k.startswith("lora_te_") for k in network.kohya_state_dict())
    assert [g["name"] for g in network.param_groups(1e-4, 5e-5)] == ["unet"]


def test_param_groups_carry_their_learning_rates():
    _, network = make()
    groups = {g["name"]: g for g in network.param_groups(1e-4, 5e-5)}
    assert groups["unet"]["lr"] == 1e-4 and groups["text_encoder"]["lr"] == 5e-5
    assert len(groups["unet"]["params"]) == 4 and len(groups["text_encoder"]["params"]) == 2
    assert sum(len(g["params"]) for g in groups.values()) == len(list(network.parameters()))


def test_saved_weights_load_into_a_fresh_network_with_the_same_outputs():
    model, network = make()
    randomize_up(network)
    network.load_kohya_state_dict(network.kohya_state_dict(torch.float32))  # idempotent
    x, tokens = inputs()
    with network.attached():
        expected = outputs(model, x, tokens)
    fresh = LoRANetwork(*targets(model), LoRAConfig(rank=4, alpha=1.0, train_text_encoder=True))
    fresh.load_kohya_state_dict(network.kohya_state_dict(torch.float32))
    with fresh.attached():
        got = outputs(model, x, tokens)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_file_of_another_rank_is_refused_naming_both_ranks():
    model, network = make(rank=2, alpha=0.5)
    state = network.kohya_state_dict(torch.float32)
    with pytest.raises(TrainerInputError, match="rank 2 but this network has rank 4.*set rank to 2"):
        LoRANetwork(*targets(model), LoRAConfig(rank=4, train_text_encoder=True)).load_kohya_state_dict(state)


def test_rank_larger_than_a_layer_is_refused_naming_rank_and_size():
    model = TinyModel()
    with pytest.raises(TrainerInputError, match=rf"rank 6 .*{TE_NAME} has 5 .*5 or less"):
        LoRANetwork(*targets(model), LoRAConfig(rank=6, train_text_encoder=True))
    LoRANetwork(*targets(model), LoRAConfig(rank=6))  # text encoder off: its 5-wide layer is not trained


@pytest.mark.parametrize(
    "config, field",
    [
        (LoRAConfig(rank=0), "rank"),
        (LoRAConfig(rank=2.5), "rank"),
        (LoRAConfig(alpha=0), "alpha"),
        (LoRAConfig(alpha=float("nan")), "alpha"),
        (LoRAConfig(alpha=float("inf")), "alpha"),
        (LoRAConfig(dropout=1.0), "dropout"),
        (LoRAConfig(dropout=-0.1), "dropout"),
        (LoRAConfig(train_unet=False), "train_unet"),
    ],
)
def test_invalid_config_names_the_field(config, field):
    with pytest.raises(TrainerInputError, match=field):
        config.validate()


def test_dropout_only_acts_in_training_mode():
    torch.manual_seed(0)
    model = TinyModel()
    network = LoRANetwork(*targets(model), LoRAConfig(dropout=0.5))
    randomize_up(network)
    x, _ = inputs()
    with network.attached():
        network.eval()
        first, second = model.unet(x), model.unet(x)
        network.train()
        noisy = model.unet(x)
    assert torch.equal(first, second) and not torch.equal(first, noisy)


def file_for(network, replace):
    state = network.kohya_state_dict()
    return {replace(k): v for k, v in state.items()}


@pytest.mark.parametrize(
    "state, kind",
    [
        ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, "full Stable Diffusion checkpoint"),
        ({"lora_unet_x.hada_w1_a": torch.zeros(2), "lora_unet_x.alpha": torch.tensor(1.0)}, "LyCORIS"),
        (
            {
                "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 6, 1, 1),
                "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(10, 4, 1, 1),
            },
            "LDM/SGM module names",
        ),
        (
            {
                "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 5),
                "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(7, 4),
            },
            "SDXL LoRA",
        ),
        ({"unet.to_q.lora_A.weight": torch.zeros(4, 10)}, "diffusers/PEFT"),
    ],
)
def test_wrong_kind_of_file_is_refused_saying_what_it_looks_like(state, kind):
    model, network = make()
    with pytest.raises(TrainerInputError, match=kind) as info:
        network.load_kohya_state_dict(state)
    assert "expected" in str(info.value)


def test_file_for_other_layers_lists_unmatched_names():
    _, network = make()
    state = file_for(network, lambda k: k.replace("lora_unet_to_q", "lora_unet_to_k"))
    with pytest.raises(TrainerInputError, match="lora_unet_to_k") as info:
        network.load_kohya_state_dict(state)
    assert "lora_unet_to_q" in str(info.value)


def test_text_encoder_file_into_unet_only_network_says_to_turn_it_on():
    _, with_te = make()
    _, unet_only = make(train_text_encoder=False)
    with pytest.raises(TrainerInputError, match="turn on train_text_encoder"):
        unet_only.load_kohya_state_dict(with_te.kohya_state_dict())


def test_shape_mismatch_names_the_layer_and_both_shapes():
    _, network = make()
    state = network.kohya_state_dict()
    state["lora_unet_to_q.lora_down.weight"] = torch.zeros(4, 16)
    with pytest.raises(TrainerInputError, match=r"lora_unet_to_q\.lora_down.*\[4, 16\].*\[4, 10\].*another model"):
        network.load_kohya_state_dict(state)


def test_missing_alpha_means_scale_one_like_kohya():
    model, network = make(rank=4, alpha=2.0)
    randomize_up(network)
    state = {k: v for k, v in network.kohya_state_dict(torch.float32).items() if not k.endswith(".alpha")}
    network.load_kohya_state_dict(state)
    assert all(float(lora.alpha) == 4.0 for lora in network.loras().values())


def test_fp16_model_trains_fp32_lora_with_fp32_grads():
    model, network = make()
    model.half().requires_grad_(False)
    x, tokens = inputs()
    with network.attached():
        unet_out, text_out = outputs(model, x.half(), tokens.half())
        assert unet_out.dtype == torch.float16
        (unet_out.float().square().mean() + text_out.float().square().mean()).backward()
    grads = [p.grad for p in network.parameters()]
    assert all(p.dtype == torch.float32 for p in network.parameters())
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_gradscaler_step_with_half_model_and_autocast(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    low = torch.float16 if device == "cuda" else torch.bfloat16
    model, network = make()
    model.to(device, low).requires_grad_(False)
    x, tokens = (t.to(device, low) for t in inputs())
    optimizer = torch.optim.AdamW([p for g in network.param_groups(1e-3, 1e-3) for p in g["params"]])
    scaler = torch.amp.GradScaler(device)
    before = [p.detach().clone() for p in network.parameters()]
    with network.attached():  # moves the LoRA to the model's device
        assert all(p.device.type == device for p in network.parameters())
        with torch.autocast(device, dtype=low):
            loss = model.unet(x).float().square().mean() + model.text(tokens).float().square().mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # raises "Attempting to unscale FP16 gradients" on fp16 params
        scaler.update()
    assert all(p.dtype == torch.float32 for p in network.parameters())
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, network.parameters()))
