"""LossChart, TriggerComparison, StepComparisonGrid and the live training preview in a real ComfyUI.

The LoRA example workflow runs headless on the tiny SD1 checkpoint, shrunk as in
test_lora_workflow.py (64 px, 4 training steps, a save at step 2, 2 sampling steps), with a sample
preview every 2 training steps. Core's own nodes (CLIPTextEncode, EmptyLatentImage, KSampler,
VAEDecode, LoraLoader) are added to the same prompt to make the pictures the comparison nodes
must equal.
"""
import json
import os

import pytest
import torch

from comfy_harness import REPO
from workflow_to_prompt import api_prompt

SIZE = 64
SAMPLING_STEPS = 2
NAME = "preview_lora"
CLIENT = "tests"
HYPERNET_WORKFLOW = os.path.join(REPO, "example_workflows", "hypernet_train_then_generate.json")


def node_ids(prompt, class_type):
    return sorted((i for i, node in prompt.items() if node["class_type"] == class_type), key=int)


def only(prompt, class_type):
    found = node_ids(prompt, class_type)
    assert len(found) == 1, f"the example workflow has one {class_type}"
    return found[0]


def shrunk(prompt, **train_overrides):
    """The example prompt at test size: every picture 64 px, every sampler 2 steps."""
    for class_type in ("LoadDataset", "RegImages"):
        for i in node_ids(prompt, class_type):
            prompt[i]["inputs"]["resolution"] = SIZE
    for i in node_ids(prompt, "RegImages"):
        prompt[i]["inputs"]["blank_count"] = 2
    for i in node_ids(prompt, "EmptyLatentImage"):
        prompt[i]["inputs"].update(width=SIZE, height=SIZE)
    for class_type in ("KSampler", "TriggerComparison", "StepComparisonGrid"):
        for i in node_ids(prompt, class_type):
            prompt[i]["inputs"]["steps"] = SAMPLING_STEPS
    for class_type in ("TriggerComparison", "StepComparisonGrid"):
        for i in node_ids(prompt, class_type):
            prompt[i]["inputs"].update(width=SIZE, height=SIZE)
    for class_type in ("LoRATrain", "HypernetTrain"):
        for i in node_ids(prompt, class_type):
            prompt[i]["inputs"].update({"steps": 4, "save_every_steps": 2, **train_overrides})
    return prompt


class CoreNodes:
    """Adds core nodes to a prompt: the KSampler picture a comparison cell must equal."""

    def __init__(self, prompt, settings, vae):
        self.prompt, self.settings, self.vae = prompt, settings, vae
        self.next_id = 900

    def add(self, class_type, **inputs):
        node_id = str(self.next_id)
        self.next_id += 1
        self.prompt[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id

    def picture(self, model, clip, text):
        """CLIPTextEncode x2 -> EmptyLatentImage -> KSampler -> VAEDecode -> PreviewImage; the decode's id."""
        s = self.settings
        positive = self.add("CLIPTextEncode", clip=clip, text=text)
        negative = self.add("CLIPTextEncode", clip=clip, text=s["negative_prompt"])
        latent = self.add("EmptyLatentImage", width=s["width"], height=s["height"], batch_size=1)
        sampler = self.add("KSampler", model=model, positive=[positive, 0], negative=[negative, 0],
                           latent_image=[latent, 0], seed=s["seed"], steps=s["steps"], cfg=s["cfg"],
                           sampler_name=s["sampler_name"], scheduler=s["scheduler"], denoise=1.0)
        decoded = self.add("VAEDecode", samples=[sampler, 0], vae=self.vae)
        self.add("PreviewImage", images=[decoded, 0])
        return decoded

    def lora_loader(self, checkpoint, lora_name, strength):
        return self.add("LoraLoader", model=[checkpoint, 0], clip=[checkpoint, 1], lora_name=lora_name,
                        strength_model=strength, strength_clip=strength)


def cell(grid, row, column, rows, columns, size=SIZE):
    """One picture of a labelled grid (trainer_core.plots.labelled_grid): the pictures fill its
    bottom-right corner, the labels are left of and above them."""
    top = grid.shape[1] - (rows - row) * size
    left = grid.shape[2] - (columns - column) * size
    return grid[0, top:top + size, left:left + size]


def as_8_bit(image):
    return (image.float().clamp(0, 1) * 255).round()


@pytest.fixture(scope="module")
def example(comfyui, tiny_checkpoint):
    """One run of the shrunk example workflow (with a sample preview every 2 steps) plus the core
    nodes to compare with, recording every progress-hook call."""
    import comfy.utils
    prompt = shrunk(comfyui.example_prompt(), output_name=NAME, sample_every_steps=2)
    checkpoint, train = only(prompt, "CheckpointLoaderSimple"), only(prompt, "LoRATrain")
    trigger, steps_grid = only(prompt, "TriggerComparison"), only(prompt, "StepComparisonGrid")
    prompt[checkpoint]["inputs"]["ckpt_name"] = tiny_checkpoint
    settings = prompt[trigger]["inputs"]
    assert settings["trained_model"] == [train, 0] and settings["base_model"] == [checkpoint, 0]
    assert prompt[steps_grid]["inputs"]["lora_name"] == [train, 4], "fed by LoRATrain's file name"

    core = CoreNodes(prompt, settings, vae=[checkpoint, 2])
    without_token = settings["prompt"].replace("skkmtn, ", "")
    assert settings["instance_token"] == "skkmtn" and "skkmtn" not in without_token
    pictures = {
        "trained, with token": core.picture([train, 0], [train, 1], settings["prompt"]),
        "trained, no token": core.picture([train, 0], [train, 1], without_token),
        "base, with token": core.picture([checkpoint, 0], [checkpoint, 1], settings["prompt"]),
    }
    core.settings = prompt[steps_grid]["inputs"]
    for lora_name in (f"{NAME}_2.safetensors", f"{NAME}.safetensors"):
        loader = core.lora_loader(checkpoint, lora_name, core.settings["strength"])
        pictures[lora_name] = core.picture([loader, 0], [loader, 1], core.settings["prompt"])

    hook_calls = []
    harness_hook = comfy.utils.PROGRESS_BAR_HOOK

    def recording_hook(value, total, preview, prompt_id=None, node_id=None):
        hook_calls.append((node_id, value, total, preview))
        return harness_hook(value, total, preview, prompt_id=prompt_id, node_id=node_id)

    # A browser that asks for previews with their node id, as ComfyUI's current frontend does.
    comfyui.executor.server.sockets_metadata = {CLIENT: {"feature_flags": {"supports_preview_metadata": True}}}
    comfy.utils.set_progress_bar_global_hook(recording_hook)
    try:
        # LoraLoader reads the saves, so the training part runs first.
        first = comfyui.run({k: v for k, v in prompt.items() if int(k) < 900})
        run = comfyui.run(prompt)
    finally:
        comfy.utils.set_progress_bar_global_hook(harness_hook)
        comfyui.executor.server.sockets_metadata = {}
    for done in (first, run):
        error = done.message("execution_error")
        assert error is None, f"{error['exception_message']}\n{''.join(error['traceback'])}"
    return {"run": run, "first": first, "train": train, "trigger": trigger, "steps_grid": steps_grid,
            "loss_chart": only(prompt, "LossChart"), "pictures": pictures, "hook_calls": hook_calls}


def test_loss_chart_draws_the_loss_of_a_real_lora_training_run(example):
    run = example["run"]
    assert len(run.output(example["train"], 3)["loss"]) == 4
    chart = run.output(example["loss_chart"])
    assert chart.shape == (1, 256, 512, 3) and chart.dtype == torch.float32
    assert 0 <= chart.min() and chart.max() <= 1
    red = (chart[0, ..., 0] > 0.7) & (chart[0, ..., 1] < 0.3) & (chart[0, ..., 2] < 0.3)
    assert red.sum() > 100, "the smoothed loss line is drawn"


def test_trigger_comparison_pictures_equal_ksampler_and_vae_decode_with_the_same_settings(example):
    run, pictures = example["run"], example["pictures"]
    grid, images = run.output(example["trigger"], 0), run.output(example["trigger"], 1)
    assert images.shape == (3, SIZE, SIZE, 3)
    for index, label in enumerate(("trained, with token", "trained, no token", "base, with token")):
        expected = run.output(pictures[label])
        difference = (images[index:index + 1] - expected).abs().max().item()
        print(f"\n{label}: max difference to KSampler + VAEDecode {difference:.3g}")
        assert difference <= 1 / 255, label
        assert torch.equal(as_8_bit(cell(grid, 0, index, 1, 3)), as_8_bit(expected[0])), f"grid cell {label}"
    assert not torch.equal(images[0], images[2]), "the trained model draws differently from the base"
    assert not torch.equal(images[0], images[1]), "removing the token changes the picture"


def test_step_comparison_grid_has_one_row_per_save_drawn_like_lora_loader(comfyui, example):
    run, pictures = example["run"], example["pictures"]
    saves = sorted(f for f in comfyui.lora_files() if f.startswith(NAME) and f.endswith(".safetensors"))
    assert saves == [f"{NAME}.safetensors", f"{NAME}_2.safetensors"]
    grid = run.output(example["steps_grid"])
    assert grid.shape[1] > 2 * SIZE and grid.shape[2] > 2 * SIZE, "two rows (step 2, final), two columns"
    for row, lora_name in enumerate((f"{NAME}_2.safetensors", f"{NAME}.safetensors")):
        expected = run.output(pictures[lora_name])
        assert torch.equal(as_8_bit(cell(grid, row, 0, 2, 2)), as_8_bit(expected[0])), lora_name
    assert not torch.equal(cell(grid, 0, 0, 2, 2), cell(grid, 0, 1, 2, 2)), "with and without the token differ"
    assert not torch.equal(cell(grid, 0, 0, 2, 2), cell(grid, 1, 0, 2, 2)), "the step-2 save differs from the final"


def test_live_training_preview_reaches_comfyuis_progress_hook_and_the_browser(example):
    from PIL import Image
    train = example["train"]
    previews = [(value, preview) for node, value, _, preview in example["hook_calls"]
                if node == train and preview is not None]
    assert previews, "LoRATrain sent no preview through comfy.utils.PROGRESS_BAR_HOOK"
    for _, preview in previews:
        kind, image, max_size = preview
        assert kind == "PNG" and isinstance(image, Image.Image) and max_size
    # sample_every_steps=2: at steps 2 and 4 the loss chart (512 x 256) has the 64 px sample beside it.
    with_sample = {value for value, (_, image, _) in previews if image.size == (512 + SIZE, 256)}
    assert with_sample == {2, 4}
    # ComfyUI's own progress handler forwards each preview to the browser with the node's id.
    sent = [data for event, data in example["first"].messages if not isinstance(event, str)]
    sent_for_train = [image for (image, metadata) in sent if metadata["node_id"] == train]
    assert len(sent_for_train) == len(previews)
    assert any(image[1].size == (512 + SIZE, 256) for image in sent_for_train)


def test_every_live_sample_of_the_last_step_shows_the_trained_lora(example):
    import numpy as np
    last = [np.asarray(preview[1])[:SIZE, 512:] for node, value, _, preview in example["hook_calls"]
            if node == example["train"] and preview is not None and value == 4 and preview[1].size[0] > 512]
    assert last and all(np.array_equal(sample, last[0]) for sample in last)


def test_comparison_nodes_show_progress_over_all_their_pictures(example):
    calls = example["hook_calls"]
    trigger = [(value, total) for node, value, total, _ in calls if node == example["trigger"]]
    assert trigger and trigger[-1] == (3 * SAMPLING_STEPS, 3 * SAMPLING_STEPS)
    grid = [(value, total) for node, value, total, _ in calls if node == example["steps_grid"]]
    assert grid and grid[-1] == (4 * SAMPLING_STEPS, 4 * SAMPLING_STEPS)


def test_a_prompt_without_the_instance_token_is_refused_before_anything_runs(comfyui, tiny_checkpoint):
    prompt = shrunk(comfyui.example_prompt())
    prompt[only(prompt, "CheckpointLoaderSimple")]["inputs"]["ckpt_name"] = tiny_checkpoint
    for class_type in ("TriggerComparison", "StepComparisonGrid"):
        node = only(prompt, class_type)
        prompt[node]["inputs"]["prompt"] = "orange round creature"
        _, _, outputs_to_run, node_errors = comfyui.validate(prompt)
        details = node_errors[node]["errors"][0]["details"]
        assert "instance token 'skkmtn'" in details, details
        prompt[node]["inputs"]["prompt"] = "skkmtn, orange round creature"


def test_hypernetwork_example_plots_its_loss(comfyui, tiny_checkpoint):
    with open(HYPERNET_WORKFLOW, encoding="utf-8") as f:
        prompt = api_prompt(json.load(f), comfyui.node_classes)
    train, chart = only(prompt, "HypernetTrain"), only(prompt, "LossChart")
    assert prompt[chart]["inputs"]["loss"] == [train, 2]
    prompt[only(prompt, "CheckpointLoaderSimple")]["inputs"]["ckpt_name"] = tiny_checkpoint
    prompt = shrunk(prompt, output_name="preview_hypernet", steps=2, save_every_steps=0)
    preview = next(i for i in node_ids(prompt, "PreviewImage") if prompt[i]["inputs"]["images"] == [chart, 0])
    run = comfyui.run({i: node for i, node in prompt.items() if i in _upstream(prompt, preview)})
    error = run.message("execution_error")
    assert error is None, error and error["exception_message"]
    assert run.output(chart).shape == (1, 256, 512, 3)


def _upstream(prompt, node_id):
    keep, todo = set(), [node_id]
    while todo:
        current = todo.pop()
        if current not in keep:
            keep.add(current)
            todo += [value[0] for value in prompt[current]["inputs"].values() if isinstance(value, list)]
    return keep


def test_sampler_and_scheduler_choices_are_ksamplers(comfyui):
    ksampler = comfyui.node_classes["KSampler"].INPUT_TYPES()["required"]
    for node_id in ("TriggerComparison", "StepComparisonGrid"):
        info = comfyui.node_classes[node_id].GET_NODE_INFO_V1()["input"]["required"]
        for name in ("sampler_name", "scheduler"):
            kind, options = info[name][0], info[name][1]
            assert kind == "COMBO" and options["options"] == list(ksampler[name][0]), f"{node_id}.{name}"
