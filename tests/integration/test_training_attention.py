"""Training runs the UNet's attention through torch SDPA, picked per call with ComfyUI's
`optimized_attention_override`, and learns what ComfyUI's own attention would have learned."""
import os
import types

import pytest
import torch

SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "sample_dataset")

LEARNING_RATE = 1e-2


@pytest.fixture(scope="module")
def sd1(comfyui, tiny_checkpoint):
    bridge = comfyui.pack_module("nodes.comfy_bridge")
    model, clip, vae = comfyui.load_checkpoint(tiny_checkpoint)
    return types.SimpleNamespace(bridge=bridge, model=model, clip=clip, vae=vae)


def _parts(sd1, monkeypatch, sdpa):
    if not sdpa:
        monkeypatch.setattr(sd1.bridge, "training_attention", lambda: None)
    with torch.inference_mode():
        parts = sd1.bridge.build_parts(sd1.model, sd1.clip, sd1.vae)
    monkeypatch.undo()
    return parts


def test_this_comfyui_lets_training_choose_sdpa_and_every_attention_call_uses_it(sd1, monkeypatch):
    import comfy.ldm.modules.attention as attention
    assert sd1.bridge.training_attention() is not None, "ComfyUI >= 0.3.6x has optimized_attention_override"
    calls = []
    original = attention.attention_pytorch
    monkeypatch.setattr(attention, "attention_pytorch", lambda *a, **k: calls.append(1) or original(*a, **k))
    parts = _parts(sd1, monkeypatch, sdpa=True)
    monkeypatch.setattr(attention, "attention_pytorch", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.inference_mode():
        parts.predict_noise(torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 768))
    attention_layers = sum(1 for name, _ in parts.unet.named_modules() if name.endswith((".attn1", ".attn2")))
    assert len(calls) == attention_layers > 0


def test_lora_trained_with_sdpa_equals_one_trained_with_comfyuis_default_attention(comfyui, sd1, monkeypatch,
                                                                                   tmp_path):
    from comfy.ldm.modules.attention import optimized_attention
    LoRAConfig = comfyui.pack_module("trainer_core.adapters.lora").LoRAConfig
    TrainConfig = comfyui.pack_module("trainer_core.config").TrainConfig
    dataset_module = comfyui.pack_module("trainer_core.dataset")
    train_lora = comfyui.pack_module("trainer_core.train").train_lora
    print(f"\nComfyUI's default attention here: {optimized_attention.__name__}")
    dataset = dataset_module.ImageDataset.from_folder(dataset_module.DatasetConfig(folder=SAMPLES, instance_token="skkmtn", resolution=64))
    results = {}
    for sdpa in (True, False):
        parts = _parts(sd1, monkeypatch, sdpa)
        config = TrainConfig(output_dir=str(tmp_path / str(sdpa)), steps=4, learning_rate=LEARNING_RATE, precision="fp32",
                             gradient_checkpointing=True, seed=3)
        with sd1.bridge.training_context(parts.unet):
            results[sdpa] = train_lora(parts, dataset, LoRAConfig(rank=4, alpha=4.0), config)
    sdpa_weights, default_weights = (results[s].kohya_state_dict for s in (True, False))
    assert sdpa_weights.keys() == default_weights.keys()
    moved = max(float(t.abs().max()) for k, t in sdpa_weights.items() if k.endswith("lora_up.weight"))
    assert moved > 1e-3, "the LoRA trained"
    worst = max(float((sdpa_weights[k] - default_weights[k]).abs().max()) for k in sdpa_weights)
    print(f"largest LoRA weight difference SDPA vs default attention: {worst:.3g} (weights move up to {moved:.3g})")
    # Adam moves every weight by about the learning rate whatever its gradient's size, so rounding
    # differences in near-zero gradients show as a small fraction of one step, not of the gradient.
    assert worst <= 0.1 * LEARNING_RATE
    for (_, a), (_, b) in zip(results[True].losses, results[False].losses):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)


def test_sdpa_gradients_equal_comfyuis_default_attention(sd1, monkeypatch):
    grads = {}
    generator = torch.Generator().manual_seed(1)
    x_t, context = torch.randn((2, 4, 8, 8), generator=generator), torch.randn((2, 77, 768), generator=generator)
    for sdpa in (True, False):
        parts = _parts(sd1, monkeypatch, sdpa)
        with sd1.bridge.training_context(parts.unet):
            x = x_t.clone().requires_grad_(True)
            parts.predict_noise(x, torch.tensor([100, 800]), context).square().mean().backward()
        grads[sdpa] = x.grad
    assert grads[True].abs().max() > 0
    assert torch.allclose(grads[True], grads[False], rtol=1e-4, atol=1e-6 * float(grads[False].abs().max()))
