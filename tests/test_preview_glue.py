"""LossChart, TriggerComparison and StepComparisonGrid without ComfyUI: schemas, validation, and
what execute() asks of the bridge.

The pack is loaded with the stand-ins of tests/test_nodes_glue.py (comfy_api, folder_paths); the
ComfyUI bridge is replaced by a fake that makes flat-coloured "pictures" and records its calls, so
these tests check our code only. tests/integration/test_preview_nodes.py runs the same nodes in
a real ComfyUI.
"""
import os
import sys
import types

import pytest
import torch

from test_nodes_glue import pack  # noqa: F401  (the pack loaded with ComfyUI stand-ins)

OUR_NODES = ("LossChart", "TriggerComparison", "StepComparisonGrid")
SIZE = 64
SETTINGS = dict(negative_prompt="blurry", seed=7, steps=3, cfg=6.5, sampler_name="euler", scheduler="normal",
                width=SIZE, height=SIZE)


def schema_inputs(pack, node_id):
    return {socket.id: socket for socket in pack.nodes[node_id].define_schema().inputs}


class FakeBridge(types.SimpleNamespace):
    """Records the pictures asked for; each is one flat colour that names its MODEL and prompt."""

    def __init__(self):
        super().__init__(calls=[], pictures=[], samplers=[])

    def losses_from_loss_map(self, loss_map):
        return [(i, float(v)) for i, v in enumerate(loss_map["loss"], start=1)]

    def check_sd1(self, model):
        self.calls.append(("check_sd1", model))

    def apply_lora(self, model, clip, state_dict, strength_model=1.0, strength_clip=1.0):
        self.calls.append(("apply_lora", model, clip, sorted(state_dict), strength_model, strength_clip))
        marker = float(state_dict["lora_unet_x.alpha"])
        return f"{model}+lora{marker:g}", f"{clip}+lora{marker:g}"

    def KSamplerPictures(self, vae, seed, steps, cfg, sampler_name, scheduler, width, height, count, node_id=None):
        bridge = self
        self.samplers.append(dict(vae=vae, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
                                  scheduler=scheduler, width=width, height=height, count=count, node_id=node_id))

        class Pictures:
            def picture(self, model, clip, prompt, negative_prompt):
                bridge.pictures.append((model, clip, prompt, negative_prompt))
                shade = len(bridge.pictures) / 10
                return torch.full((1, height, width, 3), shade)
        return Pictures()


@pytest.fixture
def bridge(pack, monkeypatch):
    fake = FakeBridge()
    monkeypatch.setattr(pack.module("nodes"), "comfy_bridge", fake, raising=False)
    return fake


@pytest.fixture
def full_paths(pack, monkeypatch):
    """folder_paths.get_full_path, which the shared stand-in lacks: None for a missing file."""
    def get_full_path(kind, name):
        path = os.path.join(pack.folder_paths.folders[kind], name)
        return path if os.path.exists(path) else None
    monkeypatch.setattr(pack.folder_paths, "get_full_path", get_full_path, raising=False)


@pytest.fixture
def node_ids(pack, monkeypatch):
    for node_id in OUR_NODES:
        monkeypatch.setattr(pack.nodes[node_id], "hidden", types.SimpleNamespace(unique_id="31"))


# ---------------------------------------------------------------------------------------------
# Schemas


def test_nodes_are_registered_in_the_training_category_with_descriptions(pack):
    for node_id in OUR_NODES:
        schema = pack.nodes[node_id].define_schema()
        assert schema.node_id == node_id and schema.category == "training"
        assert len(schema.description) > 100, node_id
        for socket in schema.inputs + schema.outputs:
            assert socket.tooltip and len(socket.tooltip) > 20, f"{node_id}.{socket.id or socket.display_name}"


def test_comparison_defaults_follow_the_brief_and_ksampler(pack):
    expected = {"prompt": "skkmtn, orange round creature", "instance_token": "skkmtn", "steps": 20, "cfg": 7.0,
                "width": 512, "height": 512, "seed": 0, "sampler_name": "euler", "scheduler": "normal"}
    for node_id in ("TriggerComparison", "StepComparisonGrid"):
        inputs = schema_inputs(pack, node_id)
        assert {name: inputs[name].default for name in expected} == expected, node_id
        assert inputs["seed"].control_after_generate is False, "the same seed on every queue keeps rows comparable"
        assert inputs["width"].min == 64 and inputs["width"].step == 8
    assert schema_inputs(pack, "StepComparisonGrid")["strength"].default == 1.0


def test_sampler_and_scheduler_choices_are_the_lists_of_the_comfyui_that_loaded_the_pack(pack, monkeypatch):
    ksampler = types.SimpleNamespace(SAMPLERS=["euler", "dpmpp_2m"], SCHEDULERS=["normal", "karras"])
    monkeypatch.setitem(sys.modules, "comfy.samplers", types.SimpleNamespace(KSampler=ksampler))
    for node_id in ("TriggerComparison", "StepComparisonGrid"):
        inputs = schema_inputs(pack, node_id)
        assert inputs["sampler_name"].options == ["euler", "dpmpp_2m"]
        assert inputs["scheduler"].options == ["normal", "karras"]


def test_without_comfyui_the_schema_still_builds_with_the_default_sampler(pack, monkeypatch):
    monkeypatch.delitem(sys.modules, "comfy.samplers", raising=False)
    inputs = schema_inputs(pack, "TriggerComparison")
    assert (inputs["sampler_name"].options, inputs["scheduler"].options) == (["euler"], ["normal"])


def test_sockets_connect_to_the_training_nodes(pack):
    lora_train = pack.nodes["LoRATrain"].define_schema().outputs
    hypernet_train = pack.nodes["HypernetTrain"].define_schema().outputs
    loss = schema_inputs(pack, "LossChart")["loss"]
    assert loss.io_type == lora_train[3].io_type == hypernet_train[2].io_type
    trigger = schema_inputs(pack, "TriggerComparison")
    assert [trigger[n].io_type for n in ("trained_model", "trained_clip", "base_model", "base_clip", "vae")] == \
        ["MODEL", "CLIP", "MODEL", "CLIP", "VAE"]
    lora_name = schema_inputs(pack, "StepComparisonGrid")["lora_name"]
    assert lora_name.io_type == lora_train[4].io_type == "STRING", "LoRATrain's lora_name plugs in"
    for node_id in OUR_NODES:
        assert all(o.io_type == "IMAGE" for o in pack.nodes[node_id].define_schema().outputs), node_id


# ---------------------------------------------------------------------------------------------
# Token handling


@pytest.mark.parametrize("prompt, expected", [
    ("skkmtn, orange round creature", "orange round creature"),
    ("a photo of skkmtn dog, smiling", "a photo of dog, smiling"),
    ("orange, SKKMTN, creature", "orange, creature"),
    ("skkmtnx creature, skkmtn", "skkmtnx creature"),
])
def test_without_token_removes_the_whole_word_and_tidies_commas(pack, prompt, expected):
    assert pack.module("nodes.preview").without_token(prompt, "skkmtn") == expected


def test_a_prompt_without_the_instance_token_is_refused_with_the_fix(pack):
    for node_id in ("TriggerComparison", "StepComparisonGrid"):
        node = pack.nodes[node_id]
        message = node.validate_inputs(prompt="orange round creature", instance_token="skkmtn")
        assert "instance token 'skkmtn'" in message and "skkmtn, orange round creature" in message
        assert "instance_token is empty" in node.validate_inputs(prompt="skkmtn", instance_token=" ")
        assert node.validate_inputs(prompt="Skkmtn, creature", instance_token="skkmtn") is True
        assert node.validate_inputs(prompt=None, instance_token="skkmtn") is True, "a connected prompt"


# ---------------------------------------------------------------------------------------------
# LossChart


def test_loss_chart_draws_a_loss_map_as_one_image(pack, bridge):
    chart = pack.nodes["LossChart"].execute(loss={"loss": [0.5, 0.4, torch.tensor(0.3)]}).values[0]
    assert chart.shape == (1, 256, 512, 3) and chart.dtype == torch.float32
    assert 0 <= chart.min() and chart.max() <= 1 and chart.std() > 0


def test_loss_chart_of_an_empty_loss_map_is_still_a_picture(pack, bridge):
    chart = pack.nodes["LossChart"].execute(loss={"loss": []}).values[0]
    assert chart.shape == (1, 256, 512, 3)


# ---------------------------------------------------------------------------------------------
# TriggerComparison


def run_trigger(pack, **overrides):
    inputs = dict(trained_model="TRAINED", trained_clip="TRAINED_CLIP", base_model="BASE", base_clip="BASE_CLIP",
                  vae="VAE", prompt="skkmtn, orange round creature", instance_token="skkmtn", **SETTINGS)
    return pack.nodes["TriggerComparison"].execute(**{**inputs, **overrides})


def test_trigger_comparison_samples_trained_with_and_without_token_and_base_with_token(pack, bridge, node_ids):
    grid, images = run_trigger(pack).values
    assert bridge.pictures == [
        ("TRAINED", "TRAINED_CLIP", "skkmtn, orange round creature", "blurry"),
        ("TRAINED", "TRAINED_CLIP", "orange round creature", "blurry"),
        ("BASE", "BASE_CLIP", "skkmtn, orange round creature", "blurry"),
    ]
    assert bridge.samplers == [dict(vae="VAE", seed=7, steps=3, cfg=6.5, sampler_name="euler", scheduler="normal",
                                    width=SIZE, height=SIZE, count=3, node_id="31")]
    assert images.shape == (3, SIZE, SIZE, 3)
    assert [round(v, 3) for v in images[:, 0, 0, 0].tolist()] == [0.1, 0.2, 0.3]
    # labelled_grid: the labels left and above, the three pictures at their own size in the
    # bottom-right corner.
    assert grid.shape[0] == 1 and grid.shape[1] > SIZE and grid.shape[2] > 3 * SIZE
    for column in range(3):
        left = grid.shape[2] - (3 - column) * SIZE
        cell = grid[0, -SIZE:, left:left + SIZE]
        assert torch.allclose(cell, images[column].expand_as(cell), atol=1 / 255)


def test_trigger_comparison_refuses_a_prompt_without_the_token_before_sampling(pack, bridge, node_ids):
    errors = pack.module("trainer_core.errors")
    with pytest.raises(errors.TrainerInputError, match="instance token 'skkmtn'"):
        run_trigger(pack, prompt="orange round creature")
    assert bridge.pictures == []


# ---------------------------------------------------------------------------------------------
# StepComparisonGrid


@pytest.fixture
def saved_loras(pack):
    """A final LoRA with two intermediate saves (written out of step order), plus files beside them
    that are not its saves. Each file's alpha is its step, so the fake bridge can tell them apart."""
    from safetensors.torch import save_file
    folder = pack.folder_paths.folders["loras"]
    written = []
    for name, step in {"mine.safetensors": 30, "mine_20.safetensors": 20, "mine_5.safetensors": 5}.items():
        tensors = {"lora_unet_x.lora_down.weight": torch.zeros(1, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 1),
                   "lora_unet_x.alpha": torch.tensor(float(step))}
        written.append(os.path.join(folder, name))
        save_file(tensors, written[-1], {"ss_steps": str(step)})
    for other in ("mine_5.safetensors.trainstate", "mine_v2.safetensors", "other_10.safetensors"):
        written.append(os.path.join(folder, other))
        open(written[-1], "wb").close()
    yield folder
    for path in written:
        os.remove(path)


def run_steps(pack, **overrides):
    inputs = dict(model="BASE", clip="BASE_CLIP", vae="VAE", lora_name="mine.safetensors",
                  prompt="skkmtn, orange round creature", instance_token="skkmtn", strength=0.8, **SETTINGS)
    return pack.nodes["StepComparisonGrid"].execute(**{**inputs, **overrides})


def test_step_grid_finds_the_saves_beside_the_final_file_in_step_order(pack, saved_loras):
    saves = pack.module("nodes.preview").lora_saves(os.path.join(saved_loras, "mine.safetensors"))
    assert [(step, os.path.basename(path)) for step, path in saves] == [
        (5, "mine_5.safetensors"), (20, "mine_20.safetensors")]


def test_step_grid_draws_one_row_per_save_with_and_without_the_token(pack, bridge, saved_loras, full_paths,
                                                                     node_ids):
    grid = run_steps(pack).values[0]
    assert ("check_sd1", "BASE") in bridge.calls
    applied = [call for call in bridge.calls if call[0] == "apply_lora"]
    assert [call[1:3] + call[4:] for call in applied] == [("BASE", "BASE_CLIP", 0.8, 0.8)] * 3
    assert [model for model, _, _, _ in bridge.pictures] == [
        "BASE+lora5", "BASE+lora5", "BASE+lora20", "BASE+lora20", "BASE+lora30", "BASE+lora30"]
    assert [prompt for _, _, prompt, _ in bridge.pictures] == [
        "skkmtn, orange round creature", "orange round creature"] * 3
    assert bridge.samplers[0]["count"] == 6 and bridge.samplers[0]["node_id"] == "31"
    assert grid.shape[1] > 3 * SIZE and grid.shape[2] > 2 * SIZE


def test_step_grid_labels_rows_with_their_step_and_the_final_file(pack):
    preview = pack.module("nodes.preview")
    assert preview.final_label({"ss_steps": "1400"}) == "step 1400 (final)"
    assert preview.final_label({}) == "final"


def test_step_grid_names_the_missing_file_and_the_fix(pack, bridge, full_paths, node_ids):
    errors = pack.module("trainer_core.errors")
    with pytest.raises(errors.TrainerInputError, match="lora_name: 'gone.safetensors' is not a file in models/loras"):
        run_steps(pack, lora_name="gone.safetensors")
    assert bridge.pictures == []


def test_step_grid_reruns_when_a_save_is_rewritten(pack, saved_loras, full_paths):
    node = pack.nodes["StepComparisonGrid"]
    before = node.fingerprint_inputs(lora_name="mine.safetensors")
    assert before == node.fingerprint_inputs(lora_name="mine.safetensors")
    path = os.path.join(saved_loras, "mine_5.safetensors")
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert node.fingerprint_inputs(lora_name="mine.safetensors") != before
    assert node.fingerprint_inputs(lora_name=None) is None, "connected: the training node decides"
