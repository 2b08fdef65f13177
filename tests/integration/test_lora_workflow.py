"""The example workflow, run headless in a real ComfyUI on a tiny SD1 checkpoint.

Sizes are cut down (64 px, 4 training steps, 2 sampling steps) so it runs in seconds on a CPU.
"""
import copy
import logging
import os
import shutil

import pytest
import torch

RESOLUTION = 64
SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "sample_dataset")


def node_ids(prompt, class_type):
    return sorted((i for i, node in prompt.items() if node["class_type"] == class_type), key=int)


def upstream(prompt, node_id):
    """The sub-prompt that computes node_id: it and everything it reads from."""
    keep, todo = {}, [node_id]
    while todo:
        current = todo.pop()
        if current in keep:
            continue
        keep[current] = copy.deepcopy(prompt[current])
        todo += [value[0] for value in prompt[current]["inputs"].values() if isinstance(value, list)]
    return keep


class Example:
    """The example workflow as an API prompt, shrunk for a CPU, with its nodes found by role."""

    def __init__(self, comfyui, checkpoint, **train_overrides):
        prompt = comfyui.example_prompt()
        self.checkpoint = node_ids(prompt, "CheckpointLoaderSimple")[0]
        self.train = node_ids(prompt, "LoRATrain")[0]
        samplers = node_ids(prompt, "KSampler")
        self.regularization = node_ids(prompt, "RegImages")[0]
        self.class_pictures = prompt[self.regularization]["inputs"]["images"][0]
        self.class_sampler = prompt[self.class_pictures]["inputs"]["samples"][0]
        self.trained_sampler = next(i for i in samplers if prompt[i]["inputs"]["model"][0] == self.train)
        self.base_sampler = next(i for i in samplers if i not in (self.trained_sampler, self.class_sampler))
        prompt[self.checkpoint]["inputs"]["ckpt_name"] = checkpoint
        for i in node_ids(prompt, "LoadDataset") + node_ids(prompt, "RegImages"):
            prompt[i]["inputs"]["resolution"] = RESOLUTION
        for i in node_ids(prompt, "EmptyLatentImage"):
            prompt[i]["inputs"].update(width=RESOLUTION, height=RESOLUTION)
        for i in samplers:
            prompt[i]["inputs"]["steps"] = 2
        for i in node_ids(prompt, "TriggerComparison") + node_ids(prompt, "StepComparisonGrid"):
            prompt[i]["inputs"].update(steps=2, width=RESOLUTION, height=RESOLUTION)
        prompt[self.train]["inputs"].update({"steps": 4, "save_every_steps": 2, **train_overrides})
        self.prompt = prompt

    def preview_of(self, sampler, prompt=None):
        prompt = prompt or self.prompt
        return next(i for i, node in prompt.items() if node["class_type"] == "PreviewImage"
                    and sampler in upstream(prompt, i))

    def base_only(self):
        return upstream(self.prompt, self.preview_of(self.base_sampler))

    def with_lora_loader(self, lora_name):
        """The trained branch, with core's LoraLoader on the saved file instead of LoRATrain."""
        prompt = copy.deepcopy(self.prompt)
        prompt[self.train] = {"class_type": "LoraLoader", "inputs": {
            "model": [self.checkpoint, 0], "clip": [self.checkpoint, 1], "lora_name": lora_name,
            "strength_model": 1.0, "strength_clip": 1.0}}
        return upstream(prompt, self.preview_of(self.trained_sampler, prompt))


def not_loaded_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()
            or r.getMessage().startswith("NOT LOADED")]


def sample(comfyui, run, example):
    """KSampler on the base branch's cached MODEL and conditioning, outside the executor."""
    import nodes
    inputs = example.prompt[example.base_sampler]["inputs"]
    model = run.output(example.checkpoint, 0)
    positive = run.output(inputs["positive"][0])
    negative = run.output(inputs["negative"][0])
    latent = run.output(inputs["latent_image"][0])
    with torch.inference_mode():
        return nodes.common_ksampler(model, inputs["seed"], inputs["steps"], inputs["cfg"], inputs["sampler_name"],
                                     inputs["scheduler"], positive, negative, latent)[0]["samples"]


@pytest.fixture(scope="module")
def trained(comfyui, tiny_checkpoint):
    """One training run of the example workflow, after a base-only run on the same executor."""
    example = Example(comfyui, tiny_checkpoint)
    base_run = comfyui.run(example.base_only())
    model = base_run.output(example.checkpoint, 0)
    weights_before = {k: v.clone() for k, v in model.model.state_dict().items()}
    samples_before = sample(comfyui, base_run, example)
    progress_before = len(comfyui.progress)
    run = comfyui.run(example.prompt)
    error = run.message("execution_error")
    assert error is None, f"{error['exception_message']}\n{''.join(error['traceback'])}"
    return {"example": example, "run": run, "base_run": base_run, "weights_before": weights_before,
            "samples_before": samples_before, "progress": comfyui.progress[progress_before:]}


def test_example_workflow_runs_to_completion_and_writes_the_lora_files(comfyui, trained):
    run, example = trained["run"], trained["example"]
    assert "execution_success" in run.events
    assert {"skkmtn_lora.safetensors", "skkmtn_lora_2.safetensors"} <= set(comfyui.lora_files())
    assert run.output(example.train, 4) == "skkmtn_lora.safetensors"
    steps = [value for node, value, total, _ in trained["progress"] if node == example.train]
    assert max(steps) == 4, "the node's progress bar reached the last step"
    loss = run.output(example.train, 3)["loss"]
    assert len(loss) == 4 and all(isinstance(v, float) for v in loss)
    lora = run.output(example.train, 2)
    assert any(k.startswith("lora_unet_") and k.endswith("lora_up.weight") for k in lora)
    from safetensors import safe_open
    with safe_open(os.path.join(comfyui.folders["loras"], "skkmtn_lora.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_sd_model_name"] == "tiny_sd1.safetensors" and metadata["ss_steps"] == "4"


def test_trained_model_samples_differently_from_the_base_model(trained):
    run, example = trained["run"], trained["example"]
    with_lora = run.output(example.trained_sampler)["samples"]
    base = run.output(example.base_sampler)["samples"]
    assert with_lora.shape == base.shape
    assert not torch.equal(with_lora, base), "the LoRA applied to MODEL changed nothing"


def test_saved_file_in_core_lora_loader_samples_exactly_like_the_trained_model(comfyui, trained, caplog):
    run, example = trained["run"], trained["example"]
    caplog.set_level(logging.WARNING)
    loader_run = comfyui.run(example.with_lora_loader("skkmtn_lora.safetensors"))
    assert "execution_success" in loader_run.events
    assert not_loaded_warnings(caplog) == []
    assert torch.equal(loader_run.output(example.trained_sampler)["samples"],
                       run.output(example.trained_sampler)["samples"])


def test_training_leaves_the_base_model_unchanged(comfyui, trained):
    import comfy.model_management
    run, example = trained["run"], trained["example"]
    model = run.output(example.checkpoint, 0)
    assert model is trained["base_run"].output(example.checkpoint, 0), "training used the cached MODEL"
    # ComfyUI patches LoRAs into the weights of the model a sampler last used; loading the
    # base MODEL puts its own (unpatched) weights back.
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    after = model.model.state_dict()
    assert after.keys() == trained["weights_before"].keys()
    assert all(torch.equal(after[k], v) for k, v in trained["weights_before"].items())
    assert all(p.grad is None for p in model.model.parameters()), "no gradient left on the base weights"
    assert torch.equal(sample(comfyui, run, example), trained["samples_before"])


def test_requeue_reuses_the_result_without_training(comfyui, trained):
    example = trained["example"]
    final = os.path.join(comfyui.folders["loras"], "skkmtn_lora.safetensors")
    written = os.stat(final).st_mtime_ns
    executor = comfyui.new_executor()  # an empty in-memory cache, as after restarting ComfyUI

    progress_before = len(comfyui.progress)
    after_restart = comfyui.run(example.prompt, executor=executor)
    assert "execution_success" in after_restart.events
    assert example.train not in after_restart.cached_nodes()
    assert [p for p in comfyui.progress[progress_before:] if p[0] == example.train] == [], \
        "no training step ran: the saved file was loaded"
    assert os.stat(final).st_mtime_ns == written
    assert torch.equal(after_restart.output(example.trained_sampler)["samples"],
                       trained["run"].output(example.trained_sampler)["samples"])

    queued_again = comfyui.run(example.prompt, executor=executor)
    assert example.train in queued_again.cached_nodes(), "ComfyUI's own cache skips the node"
    assert example.class_sampler in queued_again.cached_nodes(), "the class pictures are not drawn again"


def test_class_pictures_are_drawn_by_the_base_model_and_trained_with_the_class_prompt(comfyui, trained):
    import random
    run, example = trained["run"], trained["example"]
    sampler = example.prompt[example.class_sampler]["inputs"]
    assert sampler["model"] == [example.checkpoint, 0], "the base model draws the class pictures"
    class_prompt = example.prompt[example.regularization]["inputs"]["class_prompt"]
    assert example.prompt[sampler["positive"][0]]["inputs"]["text"] == class_prompt
    assert example.prompt[example.regularization]["inputs"]["blank_count"] == 0
    pictures = run.output(example.class_pictures)
    regularization = run.output(example.regularization).dataset
    batch = example.prompt[sampler["latent_image"][0]]["inputs"]["batch_size"]
    assert pictures.shape[0] == len(regularization) == batch == 4
    assert {regularization.caption(i, random.Random(0)) for i in range(len(regularization))} == {class_prompt}
    first = regularization.pixels(0, flip=False)
    assert torch.allclose((first.permute(1, 2, 0) + 1) / 2, pictures[0].float(), atol=1 / 255 + 1e-6)


def test_cancel_mid_run_stops_cleanly_and_leaves_only_loadable_files(comfyui, tiny_checkpoint, caplog):
    import comfy.model_management
    example = Example(comfyui, tiny_checkpoint, output_name="cancelled", steps=6)

    def press_cancel_at_step_3(node_id, value, total):
        if node_id == example.train and value == 3:
            comfy.model_management.interrupt_current_processing()
    comfyui.on_progress = press_cancel_at_step_3
    try:
        run = comfyui.run(example.prompt)
    finally:
        comfyui.on_progress = None

    assert "execution_interrupted" in run.events and "execution_error" not in run.events
    files = [f for f in comfyui.lora_files() if f.startswith("cancelled")]
    assert "cancelled_2.safetensors" in files
    assert "cancelled.safetensors" not in files and "cancelled_4.safetensors" not in files
    assert not [f for f in os.listdir(comfyui.folders["loras"]) if ".tmp" in f or f.startswith(".")]

    caplog.set_level(logging.WARNING)
    loader_run = comfyui.run(example.with_lora_loader("cancelled_2.safetensors"))
    assert "execution_success" in loader_run.events
    assert not_loaded_warnings(caplog) == []

    example.prompt[example.train]["inputs"]["resume_from"] = "cancelled_2.safetensors"
    resumed = comfyui.run(example.prompt)
    assert "execution_success" in resumed.events
    assert "cancelled.safetensors" in comfyui.lora_files()
    assert len(resumed.output(example.train, 3)["loss"]) == 6, "the loss curve continues from step 2"


def test_an_empty_instance_token_is_refused_before_anything_runs(comfyui, tiny_checkpoint):
    example = Example(comfyui, tiny_checkpoint)
    dataset = node_ids(example.prompt, "LoadDataset")[0]
    example.prompt[dataset]["inputs"]["instance_token"] = " "
    _, _, outputs_to_run, node_errors = comfyui.validate(example.prompt)
    assert example.preview_of(example.trained_sampler) not in outputs_to_run
    details = node_errors[dataset]["errors"][0]["details"]
    assert "instance_token is empty" in details and "skkmtn" in details


def test_editing_a_caption_changes_the_dataset_fingerprint_comfyui_caches_on(comfyui, tiny_checkpoint):
    folder = os.path.join(comfyui.folders["input"], "my_pictures")
    shutil.copytree(SAMPLES, folder)
    example = Example(comfyui, tiny_checkpoint)
    dataset = node_ids(example.prompt, "LoadDataset")[0]
    example.prompt[dataset]["inputs"]["folder"] = "my_pictures"
    assert comfyui.validate(example.prompt)[0], "the new input subfolder is offered in the folder list"
    before = comfyui.fingerprint(example.prompt, dataset)
    assert before == comfyui.fingerprint(example.prompt, dataset)
    with open(os.path.join(folder, "skkmtn_03.txt"), "w", encoding="utf-8") as f:
        f.write("skkmtn, orange round creature, a new caption")
    assert comfyui.fingerprint(example.prompt, dataset) != before


def test_lora_and_loss_outputs_plug_into_core_training_nodes(comfyui, trained):
    example = trained["example"]
    prompt = copy.deepcopy(example.prompt)
    sampler = copy.deepcopy(prompt[example.trained_sampler])
    sampler["inputs"]["model"] = ["900", 0]
    # Core's Save LoRA Weights node: SaveLoRANode up to ComfyUI 0.3.6x, SaveLoRA since.
    save_lora = next(name for name in ("SaveLoRA", "SaveLoRANode") if name in comfyui.node_classes)
    prompt.update({
        "900": {"class_type": "LoraModelLoader",
                "inputs": {"model": [example.checkpoint, 0], "lora": [example.train, 2], "strength_model": 1.0}},
        "901": sampler,
        "902": {"class_type": "VAEDecode", "inputs": {"samples": ["901", 0], "vae": [example.checkpoint, 2]}},
        "903": {"class_type": "PreviewImage", "inputs": {"images": ["902", 0]}},
        "904": {"class_type": save_lora, "inputs": {"lora": [example.train, 2], "prefix": "loras/core_saved"}},
        "905": {"class_type": "LossGraphNode", "inputs": {"loss": [example.train, 3], "filename_prefix": "loss"}},
    })
    run = comfyui.run(prompt)
    error = run.message("execution_error")
    assert error is None, error and error["exception_message"]
    # The LoRA trains the UNet only here, so core's model-only loader gives the same picture.
    assert torch.equal(run.output("901")["samples"], trained["run"].output(example.trained_sampler)["samples"])
    saved_folder = os.path.join(comfyui.folders["output"], "loras")
    saved = [f for f in os.listdir(saved_folder) if f.startswith("core_saved")]
    assert len(saved) == 1
    from safetensors.torch import load_file
    assert set(load_file(os.path.join(saved_folder, saved[0]))) == set(run.output(example.train, 2))


def test_text_encoder_lora_trains_through_comfyuis_clip_and_loads_in_core_lora_loader(comfyui, tiny_checkpoint,
                                                                                      caplog):
    # With gradient checkpointing too: ComfyUI's transformer blocks are recomputed in backward.
    example = Example(comfyui, tiny_checkpoint, output_name="with_te", train_text_encoder=True, steps=2,
                      save_every_steps=0, gradient_checkpointing=True)
    run = comfyui.run(example.prompt)
    error = run.message("execution_error")
    assert error is None, error and f"{error['exception_message']}\n{''.join(error['traceback'])}"
    lora = run.output(example.train, 2)
    text_encoder_up = [t for k, t in lora.items() if k.startswith("lora_te_") and k.endswith("lora_up.weight")]
    assert len(text_encoder_up) == 72 and any(t.abs().max() > 0 for t in text_encoder_up)

    caplog.set_level(logging.WARNING)
    loader_run = comfyui.run(example.with_lora_loader("with_te.safetensors"))
    assert not_loaded_warnings(caplog) == []
    assert torch.equal(loader_run.output(example.trained_sampler)["samples"],
                       run.output(example.trained_sampler)["samples"])
