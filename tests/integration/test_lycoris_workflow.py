"""LoCon, LoHa and LoKr in a real ComfyUI: the example workflow trains each type, core's LoraLoader
reads the saved file with every key and samples exactly like the in-graph MODEL, and
MergeLoRAToCkpt bakes each type in as LoraLoader applies it."""
import logging
import os

import pytest
import torch

from test_lora_workflow import Example, not_loaded_warnings, node_ids
from test_merge_node import RELATIVE_TOLERANCE, latents, pack_module, run_ok, sampling_prompt

TYPES = ["locon", "loha", "lokr"]
FILE_KEYS = {"locon": ".lora_down.weight", "loha": ".hada_w1_a", "lokr": ".lokr_w1"}


@pytest.fixture(scope="module", params=TYPES)
def trained(request, comfyui, tiny_checkpoint):
    network_type = request.param
    example = Example(comfyui, tiny_checkpoint, output_name=f"{network_type}_net", network_type=network_type,
                      train_text_encoder=True, conv_rank=4, conv_alpha=2.0, factor=-1)
    run = comfyui.run(example.prompt)
    error = run.message("execution_error")
    assert error is None, f"{error['exception_message']}\n{''.join(error['traceback'])}"
    return {"type": network_type, "example": example, "run": run, "checkpoint": tiny_checkpoint}


def conv_target_names(comfyui, checkpoint) -> set:
    import comfy.sd
    bridge = pack_module("nodes.comfy_bridge")
    model, _, _, _ = comfy.sd.load_checkpoint_guess_config(os.path.join(comfyui.folders["checkpoints"], checkpoint))
    return set(bridge.unet_conv_targets(model))


def test_each_type_trains_and_saves_its_lycoris_keys_for_unet_convs_and_text_encoder(comfyui, trained):
    network_type, run, example = trained["type"], trained["run"], trained["example"]
    name = f"{network_type}_net"
    assert {f"{name}.safetensors", f"{name}_2.safetensors"} <= set(comfyui.lora_files())
    lora = run.output(example.train, 2)
    suffix = FILE_KEYS[network_type]
    convs = conv_target_names(comfyui, trained["checkpoint"])
    assert any(n.endswith("_resnets_0_conv1") for n in convs)
    assert {n for n in convs if f"{n}{suffix}" in lora} == convs
    assert any(k.startswith("lora_te_") and k.endswith(suffix) for k in lora)
    from safetensors import safe_open
    with safe_open(os.path.join(comfyui.folders["loras"], f"{name}.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_module"] == "lycoris.kohya" and f'"algo": "{network_type}"' in metadata[
        "ss_network_args"]


def test_core_lora_loader_reads_every_key_and_samples_like_the_trained_model(comfyui, trained, caplog):
    run, example = trained["run"], trained["example"]
    caplog.set_level(logging.WARNING)
    loader_run = comfyui.run(example.with_lora_loader(f"{trained['type']}_net.safetensors"))
    assert "execution_success" in loader_run.events
    assert not_loaded_warnings(caplog) == []
    trained_latents = run.output(example.trained_sampler)["samples"]
    assert torch.equal(loader_run.output(example.trained_sampler)["samples"], trained_latents)
    assert not torch.equal(trained_latents, run.output(example.base_sampler)["samples"])


def test_comparison_nodes_of_the_example_run_on_every_type(trained):
    run, example = trained["run"], trained["example"]
    for class_type in ("TriggerComparison", "StepComparisonGrid"):
        for node in node_ids(example.prompt, class_type):
            image = run.output(node)
            assert isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[0] == 1, class_type


def test_lora_output_saves_through_core_save_lora_with_every_key(comfyui, trained):
    run, example = trained["run"], trained["example"]
    prefix = f"loras/core_saved_{trained['type']}"
    prompt = dict(example.prompt)
    # Core's Save LoRA Weights node: SaveLoRANode up to ComfyUI 0.3.6x, SaveLoRA since.
    save_lora = next(name for name in ("SaveLoRA", "SaveLoRANode") if name in comfyui.node_classes)
    prompt["904"] = {"class_type": save_lora, "inputs": {"lora": [example.train, 2], "prefix": prefix}}
    run_ok(comfyui, prompt)
    folder = os.path.join(comfyui.folders["output"], "loras")
    saved = [f for f in os.listdir(folder) if f.startswith(os.path.basename(prefix))]
    from safetensors.torch import load_file
    on_disk = load_file(os.path.join(folder, saved[0]))
    lora = run.output(example.train, 2)
    assert set(on_disk) == set(lora) and all(torch.equal(on_disk[k], lora[k]) for k in lora)


def random_network_file(comfyui, tiny_checkpoint, network_type) -> str:
    """A LoCon/LoHa/LoKr on every layer LoRATrain trains, UNet and text encoder, with weights big
    enough to change the samples visibly."""
    import comfy.sd
    bridge = pack_module("nodes.comfy_bridge")
    lora = pack_module("trainer_core.adapters.lora")
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
        os.path.join(comfyui.folders["checkpoints"], tiny_checkpoint))
    config = lora.LoRAConfig(rank=4, alpha=2.0, conv_rank=4, conv_alpha=2.0, network_type=network_type,
                             train_text_encoder=True)
    torch.manual_seed(0)
    network = lora.LoRANetwork(bridge.unet_lora_targets(model), bridge.text_encoder_lora_targets(clip), config,
                               conv_targets=bridge.unet_conv_targets(model))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    from safetensors.torch import save_file
    name = f"random_{network_type}.safetensors"
    save_file(network.kohya_state_dict(dtype=None), os.path.join(comfyui.folders["loras"], name))
    return name


@pytest.mark.parametrize("network_type", TYPES)
def test_merged_checkpoint_samples_like_base_plus_core_lora_loader(comfyui, tiny_checkpoint, network_type, caplog):
    lora_file = random_network_file(comfyui, tiny_checkpoint, network_type)
    loader = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora_file,
                                                     "strength_model": 1.0, "strength_clip": 1.0}}
    caplog.set_level(logging.WARNING)
    expected = latents(run_ok(comfyui, sampling_prompt(tiny_checkpoint, ["8", 0], ["8", 1], {"8": loader})))
    assert not_loaded_warnings(caplog) == []
    base = latents(run_ok(comfyui, sampling_prompt(tiny_checkpoint)))
    for precision in ("fp32", "fp16"):
        name = f"merged_{network_type}_{precision}"
        merge = {"class_type": "MergeLoRAToCkpt", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "lora_name": lora_file, "strength_model": 1.0,
            "strength_clip": 1.0, "output_name": name, "save_precision": precision, "save_file": True,
            "overwrite": True}}
        merged_run = run_ok(comfyui, sampling_prompt(tiny_checkpoint, ["8", 0], ["8", 1], {"8": merge}))
        from_file = latents(run_ok(comfyui, sampling_prompt(f"{name}.safetensors")))
        scale = expected.abs().max().item()
        difference = (from_file - expected).abs().max().item()
        lora_effect = (expected - base).abs().max().item()
        print(f"\n{network_type} {precision} checkpoint vs base + LoraLoader: max latent difference "
              f"{difference:.3g} ({difference / scale:.2g} of {scale:.3g}); the network moves latents by "
              f"{lora_effect:.3g}; bit-equal: {torch.equal(from_file, expected)}")
        assert torch.equal(latents(merged_run), from_file)
        if precision == "fp32":
            assert torch.equal(from_file, expected), "an fp32 merge rounds exactly as LoraLoader"
        assert difference <= RELATIVE_TOLERANCE[precision] * scale
        assert lora_effect > 100 * difference


def test_conv_targets_of_a_full_size_sd15_unet_are_in_comfyuis_key_map(comfyui):
    """The diffusers backend's LoCon names (what kohya/LyCORIS write for SD1.5: resnets, down- and
    upsamplers) each name a ComfyUI UNet layer of the same shape. The UNet is built on the meta
    device with SD1.5's config, so no weights are needed."""
    import comfy.lora
    import comfy.ops
    import comfy.utils
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from diffusers import UNet2DConditionModel
    backend = pack_module("trainer_core.backends.diffusers")
    config = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                  channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                  transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1][::-1], context_dim=768,
                  num_heads=8, num_head_channels=-1, use_spatial_transformer=True, use_linear_in_transformer=False,
                  legacy=False, adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False)
    with torch.device("meta"):
        comfy_unet = UNetModel(**config, dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init)
        diffusers_unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(os.path.join(backend.SD15_CONFIG_DIR, "unet")))
    key_map = {"lora_unet_" + key[:-len(".weight")].replace(".", "_"): value[:-len(".weight")]
               for key, value in comfy.utils.unet_to_diffusers(config).items() if key.endswith(".weight")}
    convs = backend.kohya_unet_conv_targets(diffusers_unet)
    assert len(convs) == 64  # 22 resnets x conv1/conv2, 14 shortcuts, 3 downsamplers, 3 upsamplers
    for name, module in convs.items():
        assert tuple(comfy_unet.get_submodule(key_map[name]).weight.shape) == tuple(module.weight.shape), name
