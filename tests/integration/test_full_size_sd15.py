"""The nodes on the whole SD1.5 architecture, in a real ComfyUI (random weights, 64 px, 2 steps).

The tiny checkpoint of the other integration tests has one UNet level; this one has all of
SD1.5 (full_size_sd15.py), so module names, attention widths and file layouts are those of the
model users train. The expected LoRA module names come from kohya's own rules, applied here to
diffusers' SD1.5 UNet and transformers' CLIP text model, not from the pack's target list.
"""
import logging
import os

import pytest
import torch

from test_merge_node import lora_loader_prompt, merge_prompt, random_lora_state_dict, sampling_prompt

TRAIN_STEPS = 2
HYPERNETWORK_NAME = "full_size_hypernet"
RANDOM_LORA = "full_size_random_lora.safetensors"
# Largest latent difference of the fp16 merged checkpoint to base + LoraLoader, relative to the
# largest latent: the merged weights are rounded to fp16 once.
MERGE_RELATIVE_TOLERANCE = 1e-2


# -- the oracle: kohya sd-scripts' naming rules -------------------------------------------------
# networks/lora.py, LoRANetwork: every Linear, and every Conv2d with a 1x1 kernel (other convs
# need conv_dim, which a plain LoRA does not set), inside a module of these classes; the name is
# prefix + "." + module path + "." + child path with "." replaced by "_".
KOHYA_UNET_TARGET_CLASSES = ("Transformer2DModel",)
KOHYA_TEXT_ENCODER_TARGET_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def kohya_lora_names(root, prefix, target_classes, path_prefix="") -> set:
    names = set()
    for name, module in root.named_modules():
        if type(module).__name__ not in target_classes:
            continue
        for child_name, child in module.named_modules():
            is_linear = type(child).__name__ == "Linear"
            is_conv_1x1 = type(child).__name__ == "Conv2d" and child.kernel_size == (1, 1)
            if is_linear or is_conv_1x1:
                names.add(f"{prefix}.{path_prefix}{name}.{child_name}".replace(".", "_"))
    return names


def kohya_sd15_module_names(train_text_encoder: bool) -> set:
    """The modules of a kohya SD1.5 LoRA, from SD1.5's modules built on the meta device."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(  # SD1.5's UNet configuration
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8)
        text_encoder = CLIPTextModel(CLIPTextConfig(  # CLIP ViT-L/14's text model
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
    names = kohya_lora_names(unet, "lora_unet", KOHYA_UNET_TARGET_CLASSES)
    if train_text_encoder:
        # kohya's names carry transformers 4's module paths (text_model.encoder.layers...);
        # transformers 5's CLIPTextModel no longer has the text_model level.
        has_level = any(name.startswith("text_model.") for name, _ in text_encoder.named_modules())
        names |= kohya_lora_names(text_encoder, "lora_te", KOHYA_TEXT_ENCODER_TARGET_CLASSES,
                                  path_prefix="" if has_level else "text_model.")
    return names


# -- prompts ------------------------------------------------------------------------------------
def node(comfyui, class_type, **values) -> dict:
    """A node with every widget at its default (the first option of a list), then `values`."""
    inputs = {}
    for section in ("required", "optional"):
        for name, spec in comfyui.node_classes[class_type].INPUT_TYPES().get(section, {}).items():
            options = spec[1] if len(spec) > 1 else {}
            if "default" in options:
                inputs[name] = options["default"]
            elif isinstance(spec[0], list) and spec[0] and section == "required":
                inputs[name] = spec[0][0]
    inputs.update(values)
    return {"class_type": class_type, "inputs": inputs}


def training_prompt(comfyui, checkpoint, class_type, **train_inputs) -> dict:
    """Load Checkpoint -> LoadDataset (64 px) -> the training node -> a 2-step KSampler on its MODEL
    (and, for LoRATrain, its CLIP)."""
    sample_dataset = comfyui.pack_module("nodes.dataset").SAMPLE_DATASET
    clip = ["10", 1] if class_type == "LoRATrain" else None
    return sampling_prompt(checkpoint, model=["10", 0], clip=clip, extra={
        "9": node(comfyui, "LoadDataset", folder=sample_dataset, instance_token="skkmtn", resolution=64),
        "10": node(comfyui, class_type, model=["1", 0], clip=["1", 1], vae=["1", 2], dataset=["9", 0],
                   steps=TRAIN_STEPS, save_every_steps=0, seed=0, **train_inputs)})


def run_ok(comfyui, prompt):
    """A prompt that must succeed. Callers keep tensors, not the run: a run holds every node's
    outputs, and a full-size MODEL left referenced would stay in memory. Each prompt runs in a
    fresh executor, so the previous prompt's models are not held in ComfyUI's cache either."""
    import gc
    gc.collect()
    run = comfyui.run(prompt, executor=comfyui.new_executor())
    run.assert_succeeded()
    return run


def latents(run):
    return run.output("5")["samples"].clone()


def not_loaded_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()
            or r.getMessage().startswith("NOT LOADED")]


# -- tests --------------------------------------------------------------------------------------
def test_comfyui_loads_the_fixture_as_sd15_with_every_weight(comfyui, full_size_checkpoint, caplog):
    caplog.set_level(logging.DEBUG)
    model, clip, vae = comfyui.load_checkpoint(full_size_checkpoint)
    assert type(model.model.model_config).__name__ == "SD15"
    unet = model.model.diffusion_model
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    # SD1 files hold no CLIP projection or logit scale; ComfyUI expects that and logs it at DEBUG.
    complaints = [r.getMessage()[:300] for r in caplog.records if "left over keys" in r.getMessage() or (
        r.levelno >= logging.WARNING and any(word in r.getMessage().lower() for word in ("missing", "unexpected")))]
    assert complaints == []


@pytest.mark.parametrize("train_text_encoder", [False, True], ids=["unet", "unet_and_text_encoder"])
def test_lora_train_writes_kohyas_sd15_module_set_and_loads_in_core_lora_loader(
        comfyui, full_size_checkpoint, caplog, train_text_encoder):
    from safetensors.torch import load_file
    name = f"full_size_lora_te{int(train_text_encoder)}"
    trained = run_ok(comfyui, training_prompt(comfyui, full_size_checkpoint, "LoRATrain", output_name=name,
                                              train_text_encoder=train_text_encoder, rank=4, alpha=4.0))
    in_graph = latents(trained)
    del trained

    state = load_file(os.path.join(comfyui.folders["loras"], f"{name}.safetensors"))
    modules = {key.split(".")[0] for key in state}
    expected = kohya_sd15_module_names(train_text_encoder)
    assert len([m for m in expected if m.startswith("lora_unet_")]) == 192
    assert len([m for m in expected if m.startswith("lora_te_")]) == (72 if train_text_encoder else 0)
    assert sorted(modules - expected) == [] and sorted(expected - modules) == []
    for module in modules:
        down, up = state[f"{module}.lora_down.weight"], state[f"{module}.lora_up.weight"]
        assert state[f"{module}.alpha"].ndim == 0 and down.shape[0] == 4 and up.shape[1] == 4
        assert down.ndim == up.ndim == (4 if module.endswith(("proj_in", "proj_out")) else 2), module
    assert len(state) == 3 * len(modules)

    caplog.set_level(logging.WARNING)
    loader = run_ok(comfyui, lora_loader_prompt(full_size_checkpoint, f"{name}.safetensors"))
    assert not_loaded_warnings(caplog) == []
    assert torch.equal(latents(loader), in_graph), "LoraLoader on the file samples exactly like LoRATrain's MODEL/CLIP"


def test_hypernet_train_covers_every_sd15_attention_width_and_core_loader_matches_apply(
        comfyui, full_size_checkpoint):
    trained = run_ok(comfyui, training_prompt(comfyui, full_size_checkpoint, "HypernetTrain",
                                              output_name=HYPERNETWORK_NAME, learning_rate=1e-3))
    in_graph = latents(trained)
    del trained
    file_name = f"{HYPERNETWORK_NAME}.pt"
    saved = torch.load(os.path.join(comfyui.folders["hypernetworks"], file_name), weights_only=True)
    widths = sorted(key for key in saved if isinstance(key, int))
    assert widths == [320, 640, 768, 1280]
    for width in widths:
        k_net, v_net = saved[width]
        first = next(key for key in k_net if key.endswith(".weight"))
        assert k_net[first].shape[1] == v_net[first].shape[1] == width

    def sampled_with(class_type, **inputs):
        prompt = sampling_prompt(full_size_checkpoint, model=["10", 0], extra={
            "10": {"class_type": class_type, "inputs": {"model": ["1", 0], **inputs}}})
        return latents(run_ok(comfyui, prompt))
    core = sampled_with("HypernetworkLoader", hypernetwork_name=file_name, strength=1.0)
    applied = sampled_with("ApplyHypernetwork", hypernetwork_name=file_name, strength=1.0)
    base = latents(run_ok(comfyui, sampling_prompt(full_size_checkpoint)))
    assert torch.equal(applied, core), "ApplyHypernetwork on the file == core's HypernetworkLoader"
    assert torch.equal(in_graph, core), "HypernetTrain's MODEL == core's HypernetworkLoader on its file"
    assert not torch.equal(core, base), "the hypernetwork changes the samples"


def test_merged_checkpoint_loads_in_load_checkpoint_and_equals_base_plus_lora(comfyui, full_size_checkpoint):
    from safetensors.torch import save_file
    model, clip, _ = comfyui.load_checkpoint(full_size_checkpoint)
    save_file(random_lora_state_dict(model, clip), os.path.join(comfyui.folders["loras"], RANDOM_LORA))
    del model, clip

    base = latents(run_ok(comfyui, sampling_prompt(full_size_checkpoint)))
    expected = latents(run_ok(comfyui, lora_loader_prompt(full_size_checkpoint, RANDOM_LORA)))
    merged_run = run_ok(comfyui, merge_prompt(full_size_checkpoint, lora_name=RANDOM_LORA, output_name="full_merged",
                                              save_precision="fp16"))
    assert merged_run.output("8", 2) == "full_merged.safetensors"
    in_graph = latents(merged_run)
    del merged_run
    from_file = latents(run_ok(comfyui, sampling_prompt("full_merged.safetensors")))

    scale = expected.abs().max().item()
    difference = (from_file - expected).abs().max().item()
    lora_effect = (expected - base).abs().max().item()
    print(f"\nfull-size fp16 merge vs base + LoraLoader: max latent difference {difference:.3g} of {scale:.3g}; "
          f"the LoRA moves the latents by up to {lora_effect:.3g}")
    assert torch.equal(in_graph, from_file), "the in-graph MODEL/CLIP equal Load Checkpoint on the file"
    assert difference <= MERGE_RELATIVE_TOLERANCE * scale
    assert lora_effect > 100 * difference
