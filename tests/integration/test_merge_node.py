"""MergeLoRAToCkpt in a real ComfyUI, on the tiny SD1 checkpoint and a random kohya LoRA.

The saved checkpoint must load in core's Load Checkpoint and sample like the base model with
core's LoraLoader on the same LoRA file; the merged MODEL must train again.
"""
import json
import os

import pytest
import torch

from comfy_harness import PACK_NAME, REPO
from workflow_to_prompt import api_prompt

WORKFLOW = os.path.join(REPO, "example_workflows", "lora_train_merge.json")
RESOLUTION = 64
LORA_FILE = "random_merge_test.safetensors"
# Largest latent difference to base + LoraLoader, relative to the largest latent (the random tiny
# model's latents are in the hundreds): fp16 rounding of the merged weights through 2 sampling
# steps; fp32 differs only in the order of floating-point operations.
RELATIVE_TOLERANCE = {"fp16": 1e-2, "fp32": 1e-5}


def pack_module(name):
    """A module of the pack as ComfyUI loaded it (its package name is derived from the path)."""
    import importlib
    import sys
    package = next(key for key in sys.modules if key.endswith(PACK_NAME))
    return importlib.import_module(f"{package}.{name}")


def random_lora_state_dict(model, clip, seed=0) -> dict:
    """A kohya LoRA on every layer LoRATrain trains (UNet and text encoder), with weights big
    enough to change the samples visibly."""
    bridge = pack_module("nodes.comfy_bridge")
    generator = torch.Generator().manual_seed(seed)
    targets = {**bridge.unet_lora_targets(model), **bridge.text_encoder_lora_targets(clip)}
    rank, state = 4, {}
    for name, module in targets.items():
        is_conv = isinstance(module, torch.nn.Conv2d)
        features_in = module.in_channels if is_conv else module.in_features
        features_out = module.out_channels if is_conv else module.out_features
        tail = (1, 1) if is_conv else ()
        state[f"{name}.lora_down.weight"] = torch.randn((rank, features_in) + tail, generator=generator) * 0.05
        state[f"{name}.lora_up.weight"] = torch.randn((features_out, rank) + tail, generator=generator) * 0.05
        state[f"{name}.alpha"] = torch.tensor(float(rank))
    return state


@pytest.fixture(scope="module")
def lora_file(comfyui, tiny_checkpoint):
    import comfy.sd
    from safetensors.torch import save_file
    path = os.path.join(comfyui.folders["checkpoints"], tiny_checkpoint)
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(path)
    save_file(random_lora_state_dict(model, clip), os.path.join(comfyui.folders["loras"], LORA_FILE))
    return LORA_FILE


def sampling_prompt(checkpoint, model=None, clip=None, extra=None):
    """Load Checkpoint -> (optional model/clip nodes) -> CLIPTextEncode x2 -> KSampler -> preview."""
    model, clip = model or ["1", 0], clip or ["1", 1]
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "skkmtn, orange round creature"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "blurry"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": RESOLUTION, "height": RESOLUTION, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 42,
            "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
    prompt.update(extra or {})
    return prompt


def merge_prompt(checkpoint, **merge_inputs):
    inputs = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "lora_name": LORA_FILE, "strength_model": 1.0,
              "strength_clip": 1.0, "output_name": "merged", "save_precision": "fp16", "save_file": True,
              "overwrite": False, **merge_inputs}
    return sampling_prompt(checkpoint, model=["8", 0], clip=["8", 1],
                           extra={"8": {"class_type": "MergeLoRAToCkpt", "inputs": inputs}})


def lora_loader_prompt(checkpoint, lora_name):
    loader = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name,
                                                     "strength_model": 1.0, "strength_clip": 1.0}}
    return sampling_prompt(checkpoint, model=["8", 0], clip=["8", 1], extra={"8": loader})


def run_ok(comfyui, prompt, **kwargs):
    run = comfyui.run(prompt, **kwargs)
    run.assert_succeeded()
    return run


def latents(run):
    return run.output("5")["samples"]


@pytest.fixture(scope="module")
def reference(comfyui, tiny_checkpoint, lora_file):
    """KSampler latents of the base model, and of the base with core's LoraLoader on the file."""
    base = run_ok(comfyui, sampling_prompt(tiny_checkpoint))
    lora_loader = run_ok(comfyui, lora_loader_prompt(tiny_checkpoint, lora_file))
    return {"base": latents(base), "lora_loader": latents(lora_loader), "lora_loader_pixels": lora_loader.output("6")}


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_saved_checkpoint_samples_like_base_plus_core_lora_loader(comfyui, tiny_checkpoint, reference, precision):
    from safetensors import safe_open
    name = f"merged_{precision}"
    merged_run = run_ok(comfyui, merge_prompt(tiny_checkpoint, output_name=name, save_precision=precision))
    assert merged_run.output("8", 2) == f"{name}.safetensors"
    loaded_run = run_ok(comfyui, sampling_prompt(f"{name}.safetensors"))

    in_graph, from_file, expected = latents(merged_run), latents(loaded_run), reference["lora_loader"]
    scale = expected.abs().max().item()
    difference = (from_file - expected).abs().max().item()
    lora_effect = (expected - reference["base"]).abs().max().item()
    print(f"\n{precision} checkpoint vs base + LoraLoader: max latent difference {difference:.3g} "
          f"({difference / scale:.2g} of the largest latent {scale:.3g}); the LoRA itself moves the "
          f"latents by up to {lora_effect:.3g}; max pixel difference "
          f"{(loaded_run.output('6') - reference['lora_loader_pixels']).abs().max().item():.3g} (pixels in 0..1)")
    assert torch.equal(in_graph, from_file), "the in-graph MODEL/CLIP equal Load Checkpoint on the file"
    assert difference <= RELATIVE_TOLERANCE[precision] * scale
    assert lora_effect > 100 * difference

    with safe_open(os.path.join(comfyui.folders["checkpoints"], f"{name}.safetensors"), framework="pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in keys if f.get_tensor(k).is_floating_point()}
    for prefix in ("model.diffusion_model.", "cond_stage_model.transformer.text_model.", "first_stage_model."):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert dtypes == {torch.float16 if precision == "fp16" else torch.float32}
    assert metadata["merge.base_model"] == tiny_checkpoint and metadata["merge.lora"] == LORA_FILE
    assert metadata["merge.strength_model"] == "1" and metadata["merge.precision"] == precision


def test_merge_leaves_the_input_model_and_clip_unchanged(comfyui, tiny_checkpoint, reference):
    prompt = merge_prompt(tiny_checkpoint, save_file=False)
    base = sampling_prompt(tiny_checkpoint)
    # A second sampling chain on the loader's own MODEL and CLIP, run after the merge.
    prompt.update({f"b{i}": base[i] for i in ("2", "3", "5", "6", "7")})
    prompt["b5"]["inputs"].update(positive=["b2", 0], negative=["b3", 0])
    prompt["b6"]["inputs"]["samples"] = ["b5", 0]
    prompt["b7"]["inputs"]["images"] = ["b6", 0]
    run = run_ok(comfyui, prompt)
    assert run.output("8", 2) == ""
    assert torch.equal(run.output("b5")["samples"], reference["base"])


def test_lora_train_runs_on_the_merged_model(comfyui, tiny_checkpoint):
    train_inputs = {
        "model": ["8", 0], "clip": ["8", 1], "vae": ["1", 2], "dataset": ["9", 0], "output_name": "trained_on_merged",
        "steps": 2, "learning_rate": 1e-3, "text_encoder_learning_rate": 5e-5, "train_text_encoder": False,
        "rank": 4, "alpha": 4.0, "batch_size": 1, "gradient_accumulation": 1, "optimizer": "AdamW",
        "lr_scheduler": "constant", "warmup_steps": 0, "precision": "auto", "gradient_checkpointing": False,
        "seed": 0, "save_every_steps": 0, "sample_every_steps": 0, "resume_from": "none", "overwrite": False,
        "force_retrain": False}
    prompt = merge_prompt(tiny_checkpoint, save_file=False)
    prompt["9"] = {"class_type": "LoadDataset", "inputs": {
        "folder": "(sample) skkmtn_sample", "instance_token": "skkmtn", "class_token": "creature",
        "caption_extension": ".txt", "repeats": 1, "resolution": RESOLUTION, "bucketing": True, "flip": False,
        "shuffle_tags": False, "keep_tokens": 0, "caption_dropout": 0.0}}
    prompt["10"] = {"class_type": "LoRATrain", "inputs": train_inputs}
    prompt["5"]["inputs"]["model"] = ["10", 0]
    for encoder in ("2", "3"):
        prompt[encoder]["inputs"]["clip"] = ["10", 1]
    run = run_ok(comfyui, prompt)
    assert run.output("10", 4) == "trained_on_merged.safetensors"
    assert len(run.output("10", 3)["loss"]) == 2


def test_existing_checkpoint_is_kept_unless_overwrite_is_on(comfyui, tiny_checkpoint):
    path = os.path.join(comfyui.folders["checkpoints"], "taken.safetensors")
    with open(path, "wb") as f:
        f.write(b"someone else's checkpoint")
    run = comfyui.run(merge_prompt(tiny_checkpoint, output_name="taken"))
    error = run.message("execution_error")
    assert error is not None and "taken.safetensors" in error["exception_message"]
    assert "overwrite" in error["exception_message"]
    with open(path, "rb") as f:
        assert f.read() == b"someone else's checkpoint"

    run_ok(comfyui, merge_prompt(tiny_checkpoint, output_name="taken", overwrite=True))
    written = os.stat(path).st_mtime_ns
    # The same merge queued again after a restart keeps the file it already wrote.
    run_ok(comfyui, merge_prompt(tiny_checkpoint, output_name="taken"), executor=comfyui.new_executor())
    assert os.stat(path).st_mtime_ns == written
    assert not [f for f in os.listdir(comfyui.folders["checkpoints"]) if ".tmp" in f or f.startswith(".")]


def test_lora_train_merge_workflow_runs_headless(comfyui, tiny_checkpoint):
    with open(WORKFLOW, encoding="utf-8") as f:
        prompt = api_prompt(json.load(f), comfyui.node_classes)

    def nodes_of(class_type):
        return [node for node in prompt.values() if node["class_type"] == class_type]
    nodes_of("CheckpointLoaderSimple")[0]["inputs"]["ckpt_name"] = tiny_checkpoint
    nodes_of("LoadDataset")[0]["inputs"]["resolution"] = RESOLUTION
    nodes_of("LoRATrain")[0]["inputs"].update(steps=2, save_every_steps=0, output_name="merge_example_lora")
    nodes_of("EmptyLatentImage")[0]["inputs"].update(width=RESOLUTION, height=RESOLUTION)
    nodes_of("KSampler")[0]["inputs"]["steps"] = 2
    merge_id = next(i for i, node in prompt.items() if node["class_type"] == "MergeLoRAToCkpt")
    merge_widgets = {k: v for k, v in prompt[merge_id]["inputs"].items() if not isinstance(v, list)}
    assert merge_widgets == {**comfyui.widget_defaults("MergeLoRAToCkpt"), "output_name": "skkmtn_merged"}

    run = run_ok(comfyui, prompt)
    assert run.output(merge_id, 2) == "skkmtn_merged.safetensors"
    assert os.path.exists(os.path.join(comfyui.folders["checkpoints"], "skkmtn_merged.safetensors"))
    assert [f for f in os.listdir(comfyui.folders["output"]) if f.startswith("skkmtn_merged")]


def test_merge_cli_finds_the_layers_comfyui_maps_and_merges_the_same_weights(comfyui, tiny_checkpoint, lora_file,
                                                                            tmp_path):
    import comfy.sd
    from safetensors.torch import load_file

    from trainer_core.cli import main
    from trainer_core.merge import cast_for_saving, checkpoint_lora_keys, merge_lora
    checkpoint = os.path.join(comfyui.folders["checkpoints"], tiny_checkpoint)
    lora = os.path.join(comfyui.folders["loras"], lora_file)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(checkpoint)
    comfy_keys = pack_module("nodes.comfy_bridge").checkpoint_lora_keys(model, clip)
    base = load_file(checkpoint)
    ours = checkpoint_lora_keys(base)
    trained = {key.split(".")[0] for key in load_file(lora)}
    assert trained <= set(ours), "every layer LoRATrain trains is found in the file"
    assert ours == {name: comfy_keys[name] for name in ours}, "named as ComfyUI's LoraLoader names them"

    output = tmp_path / "merged.safetensors"
    assert main(["merge", "--model", checkpoint, "--lora", lora, "--output", str(output)]) == 0
    expected = cast_for_saving(merge_lora(base, load_file(lora), comfy_keys), "fp16")
    merged = load_file(str(output))
    assert set(merged) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(merged[key], tensor), key
