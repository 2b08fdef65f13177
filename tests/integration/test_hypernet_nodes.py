"""HypernetTrain and ApplyHypernetwork in a real ComfyUI, on the tiny SD1 checkpoint.

The hypernetwork example workflow runs headless (64 px, 4 training steps, 2 sampling steps);
then the same KSampler is fed the hypernetwork four ways: HypernetTrain's MODEL, core's
HypernetworkLoader on the saved .pt, ApplyHypernetwork on the trained object and on the file.
"""
import asyncio
import copy
import json
import os

import pytest
import torch

from comfy_harness import COMFYUI_PATH, REPO
from workflow_to_prompt import api_prompt

WORKFLOW = os.path.join(REPO, "example_workflows", "hypernet_train_then_generate.json")
RESOLUTION = 64
NAME = "skkmtn_hypernet"


def node_ids(prompt, class_type):
    return sorted((i for i, node in prompt.items() if node["class_type"] == class_type), key=int)


class HypernetExample:
    """The example workflow as an API prompt, shrunk for a CPU, with its nodes found by role."""

    def __init__(self, comfyui, checkpoint, **train_overrides):
        with open(WORKFLOW, encoding="utf-8") as f:
            prompt = api_prompt(json.load(f), comfyui.node_classes)
        self.checkpoint = node_ids(prompt, "CheckpointLoaderSimple")[0]
        self.train = node_ids(prompt, "HypernetTrain")[0]
        samplers = node_ids(prompt, "KSampler")
        self.trained_sampler = next(i for i in samplers if prompt[i]["inputs"]["model"][0] == self.train)
        self.base_sampler = next(i for i in samplers if i != self.trained_sampler)
        prompt[self.checkpoint]["inputs"]["ckpt_name"] = checkpoint
        for i in node_ids(prompt, "LoadDataset"):
            prompt[i]["inputs"]["resolution"] = RESOLUTION
        for i in node_ids(prompt, "EmptyLatentImage"):
            prompt[i]["inputs"].update(width=RESOLUTION, height=RESOLUTION)
        for i in samplers:
            prompt[i]["inputs"]["steps"] = 2
        # A LoRA-sized learning rate, so 4 steps move the hypernetwork visibly (the lr warning is logged).
        prompt[self.train]["inputs"].update(steps=4, save_every_steps=2, learning_rate=1e-3, **train_overrides)
        self.prompt = prompt

    def with_model_from(self, key, class_type, **inputs):
        """The prompt plus a KSampler (and decoder) fed by a new model node `key`."""
        prompt = copy.deepcopy(self.prompt)
        model_node, sampler = f"{key}0", f"{key}1"
        prompt[model_node] = {"class_type": class_type,
                              "inputs": {"model": [self.checkpoint, 0], **inputs}}
        prompt[sampler] = copy.deepcopy(prompt[self.trained_sampler])
        prompt[sampler]["inputs"]["model"] = [model_node, 0]
        prompt[f"{key}2"] = {"class_type": "PreviewImage", "inputs": {"images": [f"{key}3", 0]}}
        prompt[f"{key}3"] = {"class_type": "VAEDecode",
                             "inputs": {"samples": [sampler, 0], "vae": [self.checkpoint, 2]}}
        return prompt, sampler


def latents(run, sampler):
    return run.output(sampler)["samples"]


@pytest.fixture(scope="module")
def core_hypernetwork_loader(comfyui):
    """Core's HypernetworkLoader (comfy_extras, which the harness does not load by itself)."""
    import nodes
    if "HypernetworkLoader" not in comfyui.node_classes:
        path = os.path.join(COMFYUI_PATH, "comfy_extras", "nodes_hypernetwork.py")
        assert asyncio.run(nodes.load_custom_node(path, module_parent="comfy_extras"))


@pytest.fixture(scope="module")
def trained(comfyui, tiny_checkpoint, core_hypernetwork_loader):
    # Dropout on: equality with core's loader below also shows it never acts while generating.
    example = HypernetExample(comfyui, tiny_checkpoint, dropout=True)
    progress_before = len(comfyui.progress)
    run = comfyui.run(example.prompt)
    run.assert_succeeded()
    return {"example": example, "run": run, "progress": comfyui.progress[progress_before:]}


def test_example_workflow_holds_the_nodes_defaults_in_the_right_widgets(comfyui):
    with open(WORKFLOW, encoding="utf-8") as f:
        prompt = api_prompt(json.load(f), comfyui.node_classes)
    train = prompt[node_ids(prompt, "HypernetTrain")[0]]["inputs"]
    widgets = {k: v for k, v in train.items() if not isinstance(v, list)}
    assert widgets == {**comfyui.widget_defaults("HypernetTrain"), "save_every_steps": 500}


def test_example_workflow_runs_headless_and_saves_the_hypernetwork(comfyui, trained):
    run, example = trained["run"], trained["example"]
    files = os.listdir(comfyui.folders["hypernetworks"])
    assert {f"{NAME}.pt", f"{NAME}_2.pt"} <= set(files)
    assert not [f for f in files if ".tmp" in f or f.startswith(".")]
    assert run.output(example.train, 3) == f"{NAME}.pt"
    loss = run.output(example.train, 2)["loss"]
    assert len(loss) == 4 and all(isinstance(v, float) for v in loss)
    steps = [value for node, value, _, _ in trained["progress"] if node == example.train]
    assert max(steps) == 4, "the node's progress bar reached the last step"
    assert any(preview for node, _, _, preview in trained["progress"] if node == example.train), \
        "the loss chart was shown on the node"
    assert not torch.equal(latents(run, example.trained_sampler), latents(run, example.base_sampler))


def test_core_loader_and_apply_hypernetwork_sample_exactly_like_hypernet_train(comfyui, trained):
    run, example = trained["run"], trained["example"]
    expected = latents(run, example.trained_sampler)
    variants = {
        "core HypernetworkLoader on the .pt": ("HypernetworkLoader", {"hypernetwork_name": f"{NAME}.pt", "strength": 1.0}),
        "ApplyHypernetwork on the trained object": (
            "ApplyHypernetwork", {"hypernetwork_name": "none", "strength": 1.0, "hypernetwork": [example.train, 1]}),
        "ApplyHypernetwork on the .pt": ("ApplyHypernetwork", {"hypernetwork_name": f"{NAME}.pt", "strength": 1.0}),
    }
    for index, (label, (class_type, inputs)) in enumerate(variants.items()):
        prompt, sampler = example.with_model_from(f"9{index}", class_type, **inputs)
        other = comfyui.run(prompt)
        other.assert_succeeded()
        difference = (latents(other, sampler) - expected).abs().max().item()
        print(f"\n{label}: max latent difference to HypernetTrain's MODEL {difference:.3g}")
        assert torch.equal(latents(other, sampler), expected), label


def test_apply_hypernetwork_strength_matches_core_loader_and_leaves_the_input_model_alone(comfyui, trained):
    example = trained["example"]
    core_prompt, core_sampler = example.with_model_from(
        "80", "HypernetworkLoader", hypernetwork_name=f"{NAME}.pt", strength=0.5)
    ours_prompt, ours_sampler = example.with_model_from(
        "81", "ApplyHypernetwork", hypernetwork_name="none", strength=0.5, hypernetwork=[example.train, 1])
    core, ours = comfyui.run(core_prompt), comfyui.run(ours_prompt)
    core.assert_succeeded()
    ours.assert_succeeded()
    assert torch.equal(latents(core, core_sampler), latents(ours, ours_sampler))
    assert not torch.equal(latents(ours, ours_sampler), latents(trained["run"], example.trained_sampler))
    base_model = ours.output(example.checkpoint, 0)
    assert "patches" not in base_model.model_options["transformer_options"], "the input MODEL was patched"
    assert torch.equal(latents(ours, example.base_sampler), latents(trained["run"], example.base_sampler))


def test_requeue_after_restart_loads_the_saved_hypernetwork_without_training(comfyui, trained):
    example = trained["example"]
    final = os.path.join(comfyui.folders["hypernetworks"], f"{NAME}.pt")
    written = os.stat(final).st_mtime_ns
    progress_before = len(comfyui.progress)
    again = comfyui.run(example.prompt, executor=comfyui.new_executor())
    again.assert_succeeded()
    assert [p for p in comfyui.progress[progress_before:] if p[0] == example.train] == [], \
        "no training step ran: the saved file was loaded"
    assert os.stat(final).st_mtime_ns == written
    assert torch.equal(latents(again, example.trained_sampler), latents(trained["run"], example.trained_sampler))


def test_pack_registers_the_hypernetwork_and_merge_nodes_with_tooltips(comfyui):
    for node_id in ("HypernetTrain", "ApplyHypernetwork", "MergeLoRAToCkpt"):
        info = comfyui.node_classes[node_id].GET_NODE_INFO_V1()
        assert info["category"] == "training" and info["description"], node_id
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert all(info["output_tooltips"]), node_id
