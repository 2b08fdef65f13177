"""HypernetTrain, ApplyHypernetwork and MergeLoRAToCkpt without ComfyUI: schemas, validation,
and what execute() hands to trainer_core and the bridge.

The pack is loaded with the stand-ins of tests/test_nodes_glue.py (comfy_api, folder_paths);
the ComfyUI bridge is replaced by a fake, so these tests check our code only. The integration
tests (tests/integration/test_hypernet_nodes.py, test_merge_node.py) run the same nodes in a
real ComfyUI.
"""
import os
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fake_bridge import FakeBridge
from test_nodes_glue import pack  # noqa: F401  (the pack loaded with ComfyUI stand-ins)

OUR_NODES = ("HypernetTrain", "ApplyHypernetwork", "MergeLoRAToCkpt")


@pytest.fixture(autouse=True)
def full_paths(pack, monkeypatch):
    """folder_paths.get_full_path, which the shared stand-in lacks: None for a missing file."""
    def get_full_path(kind, name):
        path = os.path.join(pack.folder_paths.folders[kind], name)
        return path if os.path.exists(path) else None
    monkeypatch.setattr(pack.folder_paths, "get_full_path", get_full_path, raising=False)


def schema_inputs(pack, node_id):
    return {socket.id: socket for socket in pack.nodes[node_id].define_schema().inputs}


# ---------------------------------------------------------------------------------------------
# Schemas


def test_nodes_are_registered_in_the_training_category_with_descriptions(pack):
    for node_id in OUR_NODES:
        schema = pack.nodes[node_id].define_schema()
        assert schema.node_id == node_id and schema.category == "training"
        assert len(schema.description) > 100, node_id


def test_every_input_and_output_has_a_tooltip_and_sane_default(pack):
    for node_id in OUR_NODES:
        schema = pack.nodes[node_id].define_schema()
        ids = [socket.id for socket in schema.inputs]
        assert len(ids) == len(set(ids)), node_id
        for socket in schema.inputs + schema.outputs:
            assert socket.tooltip and len(socket.tooltip) > 20, f"{node_id}.{socket.id or socket.display_name}"
        for socket in schema.inputs:
            default = getattr(socket, "default", None)
            if getattr(socket, "options", None) is not None:
                assert default in socket.options, f"{node_id}.{socket.id}"
            if getattr(socket, "min", None) is not None:
                assert socket.min <= default <= socket.max, f"{node_id}.{socket.id}"


def test_hypernet_train_defaults_follow_the_guides(pack):
    inputs = schema_inputs(pack, "HypernetTrain")
    expected = {"learning_rate": 1e-5, "layer_structure": "1,2,2,1", "activation": "mish", "steps": 2000,
                "batch_size": 1, "gradient_accumulation": 1, "optimizer": "AdamW", "precision": "auto",
                "gradient_checkpointing": False, "layer_norm": False, "dropout": False,
                "weight_initialization": "Normal", "output_name": "skkmtn_hypernet", "save_every_steps": 0,
                "sample_every_steps": 0, "prompt_template": "none (captions)", "latent_sampling": "once",
                "resume_from": "none", "overwrite": False, "force_retrain": False, "loss_csv": False}
    assert {name: inputs[name].default for name in expected} == expected
    assert inputs["seed"].control_after_generate is False, "a new seed every queue would retrain every time"
    assert inputs["regularization"].optional


def test_hypernet_train_offers_the_shipped_templates_and_the_trainers_latent_sampling(pack):
    inputs = schema_inputs(pack, "HypernetTrain")
    templates = pack.module("trainer_core.prompt_templates").available_templates()
    assert inputs["prompt_template"].options == ["none (captions)"] + templates
    assert {"hypernetwork", "subject_filewords", "style_filewords"} <= set(templates)
    assert inputs["latent_sampling"].options == list(pack.module("trainer_core.config").LATENT_SAMPLING)
    activations = pack.module("trainer_core.adapters.hypernetwork").ACTIVATIONS
    assert inputs["activation"].options == list(activations)


def test_file_choices_list_saved_files_of_the_right_kind(pack):
    folders = pack.folder_paths.folders
    for folder, name in (("hypernetworks", "style.pt"), ("hypernetworks", "notes.txt"),
                         ("loras", "mine.safetensors"), ("loras", "old.ckpt")):
        open(os.path.join(folders[folder], name), "wb").close()
    try:
        assert schema_inputs(pack, "HypernetTrain")["resume_from"].options == ["none", "style.pt"]
        assert schema_inputs(pack, "ApplyHypernetwork")["hypernetwork_name"].options == ["none", "style.pt"]
        assert schema_inputs(pack, "MergeLoRAToCkpt")["lora_name"].options == ["none", "mine.safetensors"]
    finally:
        for folder, name in (("hypernetworks", "style.pt"), ("hypernetworks", "notes.txt"),
                             ("loras", "mine.safetensors"), ("loras", "old.ckpt")):
            os.remove(os.path.join(folders[folder], name))


def test_merge_defaults_save_an_fp16_checkpoint_without_overwriting(pack):
    inputs = schema_inputs(pack, "MergeLoRAToCkpt")
    expected = {"output_name": "merged_model", "save_precision": "fp16", "save_file": True, "overwrite": False,
                "lora_name": "none", "strength_model": 1.0, "strength_clip": 1.0}
    assert {name: inputs[name].default for name in expected} == expected
    assert inputs["save_precision"].options == ["fp16", "fp32"]
    lora_train_lora_output = pack.nodes["LoRATrain"].define_schema().outputs[2]
    assert inputs["lora"].optional and inputs["lora"].io_type == lora_train_lora_output.io_type, \
        "LoRATrain's lora output plugs into the merge"


def test_hypernetwork_socket_connects_train_to_apply(pack):
    train = pack.nodes["HypernetTrain"].define_schema()
    apply = schema_inputs(pack, "ApplyHypernetwork")
    lora_train = pack.nodes["LoRATrain"].define_schema()
    assert [o.io_type for o in train.outputs] == [
        "MODEL", "HYPERNETWORK", lora_train.outputs[3].io_type, "STRING"], "the loss is LoRATrain's LOSS_MAP"
    assert apply["hypernetwork"].io_type == "HYPERNETWORK" and apply["hypernetwork"].optional
    assert (apply["strength"].min, apply["strength"].max, apply["strength"].default) == (-10.0, 10.0, 1.0)


def test_hypernet_train_refuses_settings_comfyui_would_load_differently(pack):
    node = pack.nodes["HypernetTrain"]
    good = dict(layer_structure="1,2,2,1", activation="mish", layer_norm=False, activate_output=False,
                weight_initialization="Normal")
    assert node.validate_inputs(**good) is True
    message = node.validate_inputs(**{**good, "layer_norm": True})
    assert isinstance(message, str) and "activate_output" in message
    assert "layer_structure" in node.validate_inputs(**{**good, "layer_structure": "2,1"})


# ---------------------------------------------------------------------------------------------
# The fake bridge (tests/fake_bridge.py) in place of ComfyUI


def use_bridge(pack, monkeypatch, node_id, bridge, unique_id="7"):
    monkeypatch.setattr(pack.module("nodes"), "comfy_bridge", bridge, raising=False)
    node = pack.nodes[node_id]
    monkeypatch.setattr(node, "hidden", types.SimpleNamespace(unique_id=unique_id, prompt="PROMPT"))
    return node


def small_hypernetwork(pack, widths=(8, 16)):
    hypernetwork = pack.module("trainer_core.adapters.hypernetwork")
    return hypernetwork.Hypernetwork(list(widths), hypernetwork.HypernetworkConfig())


# ---------------------------------------------------------------------------------------------
# HypernetTrain


HYPERNET_INPUTS = dict(
    output_name="skkmtn_hypernet", steps=9, learning_rate=2e-5, layer_structure="1,2,1", activation="relu",
    layer_norm=False, dropout=True, last_layer_dropout=True, activate_output=True,
    weight_initialization="XavierNormal", batch_size=2, gradient_accumulation=3, optimizer="Prodigy",
    precision="fp32", gradient_checkpointing=True, prompt_template="style_filewords", latent_sampling="random", seed=5, save_every_steps=3,
    sample_every_steps=4, resume_from="none", overwrite=True, force_retrain=True, loss_csv=True)


@pytest.fixture
def hypernet_node(pack, monkeypatch):
    """HypernetTrain with a fake bridge and a fake train_hypernetwork that records its arguments."""
    bridge = FakeBridge()
    node = use_bridge(pack, monkeypatch, "HypernetTrain", bridge)
    train = pack.module("trainer_core.train")
    adapter = small_hypernetwork(pack).train()
    final_path = os.path.join(pack.folder_paths.folders["hypernetworks"], "skkmtn_hypernet.pt")
    recorded = {}

    def fake_train_hypernetwork(parts, dataset, hypernetwork_config, train_config, regularization=None,
                                callbacks=None):
        recorded.update(parts=parts, dataset=dataset, hypernetwork_config=hypernetwork_config,
                        train_config=train_config, regularization=regularization, callbacks=callbacks)
        if recorded.get("raise"):
            raise recorded["raise"]
        return train.TrainResult(adapter=adapter, final_path=final_path, losses=[(1, 0.5), (2, 0.25)])
    monkeypatch.setattr(train, "train_hypernetwork", fake_train_hypernetwork)
    dataset = pack.nodes["LoadDataset"].execute(instance_token="skkmtn", resolution=64).values[0]
    return types.SimpleNamespace(node=node, bridge=bridge, recorded=recorded, adapter=adapter, dataset=dataset,
                                 errors=pack.module("trainer_core.errors"))


def run_hypernet_node(hypernet_node, **overrides):
    return hypernet_node.node.execute(model="MODEL", clip="CLIP", vae="VAE", dataset=hypernet_node.dataset,
                                      regularization="REG", **{**HYPERNET_INPUTS, **overrides})


def test_hypernet_train_hands_every_option_to_the_trainer(hypernet_node, pack):
    run_hypernet_node(hypernet_node)
    recorded, config = hypernet_node.recorded, hypernet_node.recorded["train_config"]
    assert recorded["regularization"] == "REG" and recorded["callbacks"] == "callbacks"
    assert config.output_dir == pack.folder_paths.folders["hypernetworks"]
    for name in ("output_name", "steps", "learning_rate", "batch_size", "gradient_accumulation", "optimizer",
                 "precision", "gradient_checkpointing", "latent_sampling", "seed", "save_every_steps",
                 "sample_every_steps", "overwrite", "force_retrain", "loss_csv"):
        assert getattr(config, name) == HYPERNET_INPUTS[name], name
    assert config.resume_from == ""
    network = recorded["hypernetwork_config"]
    for name in ("layer_structure", "activation", "layer_norm", "dropout", "last_layer_dropout", "activate_output",
                 "weight_initialization"):
        assert getattr(network, name) == HYPERNET_INPUTS[name], name
    calls = hypernet_node.bridge.calls
    assert ("check_sd1", "MODEL") in calls and ("build_parts", "MODEL", "CLIP", "VAE") in calls
    assert ("progress", 9, "7") in calls
    assert ("training_context", "unet") in calls, "only the UNet is frozen: the CLIP is not trained"
    assert recorded["parts"].base_model_name == "checkpoint of node 7 in PROMPT"


def test_hypernet_train_captions_a_copy_of_the_dataset_through_the_template(hypernet_node, pack):
    run_hypernet_node(hypernet_node)
    used = hypernet_node.recorded["dataset"]
    lines = pack.module("trainer_core.prompt_templates").read_template("style_filewords")
    assert used is not hypernet_node.dataset and used.config.template_lines == lines
    assert hypernet_node.dataset.config.template_lines is None, "the cached LoadDataset output is unchanged"
    assert used.items is hypernet_node.dataset.items

    run_hypernet_node(hypernet_node, prompt_template="none (captions)")
    assert hypernet_node.recorded["dataset"] is hypernet_node.dataset


def test_hypernet_train_returns_the_patched_model_the_network_the_loss_and_the_file_name(hypernet_node):
    output = run_hypernet_node(hypernet_node)
    model, hypernetwork, loss, name = output.values
    assert model == "MODEL+hypernetwork@1"
    assert hypernetwork is hypernet_node.adapter and not hypernetwork.training, "handed on in eval mode"
    assert ("apply_hypernetwork", "MODEL", hypernet_node.adapter, 1.0) in hypernet_node.bridge.calls
    assert loss == {"loss": [0.5, 0.25]}
    assert name == "skkmtn_hypernet.pt"
    assert output.ui["preview"].shape[0] == 1 and output.ui["preview"].shape[-1] == 3


def test_hypernet_train_resumes_from_the_chosen_file_in_the_hypernetworks_folder(hypernet_node, pack):
    run_hypernet_node(hypernet_node, resume_from="skkmtn_hypernet_500.pt")
    assert hypernet_node.recorded["train_config"].resume_from == os.path.join(
        pack.folder_paths.folders["hypernetworks"], "skkmtn_hypernet_500.pt")


def test_hypernet_train_turns_a_cancelled_run_into_comfyuis_interrupt(hypernet_node):
    hypernet_node.recorded["raise"] = hypernet_node.errors.TrainingCancelled("cancelled", last_save=None, step=3)
    with pytest.raises(FakeBridge.Interrupted):
        run_hypernet_node(hypernet_node)


# ---------------------------------------------------------------------------------------------
# ApplyHypernetwork


@pytest.fixture
def apply_node(pack, monkeypatch):
    bridge = FakeBridge()
    return types.SimpleNamespace(node=use_bridge(pack, monkeypatch, "ApplyHypernetwork", bridge), bridge=bridge)


def test_apply_hypernetwork_applies_the_connected_network_at_the_strength(apply_node, pack):
    network = small_hypernetwork(pack)
    output = apply_node.node.execute(model="MODEL", hypernetwork_name="none", strength=0.5, hypernetwork=network)
    assert output.values == ("MODEL+hypernetwork@0.5",)
    assert ("apply_hypernetwork", "MODEL", network, 0.5) in apply_node.bridge.calls


def test_apply_hypernetwork_loads_a_file_from_the_hypernetworks_folder(apply_node, pack):
    hypernetwork = pack.module("trainer_core.adapters.hypernetwork")
    path = os.path.join(pack.folder_paths.folders["hypernetworks"], "glue_style.pt")
    saved = small_hypernetwork(pack, widths=(8, 24))
    hypernetwork.save_hypernetwork(path, saved, name="glue_style", step=10)
    try:
        apply_node.node.execute(model="MODEL", hypernetwork_name="glue_style.pt", strength=1.0)
        _, model, loaded, strength = next(c for c in apply_node.bridge.calls if c[0] == "apply_hypernetwork")
        assert (model, strength, loaded.widths) == ("MODEL", 1.0, [8, 24])
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), saved.state_dict().values()))
        before = apply_node.node.fingerprint_inputs(hypernetwork_name="glue_style.pt")
        hypernetwork.save_hypernetwork(path, saved, name="glue_style", step=20, overwrite=True)
        assert apply_node.node.fingerprint_inputs(hypernetwork_name="glue_style.pt") != before, \
            "a retrained file under the same name reruns the node"
    finally:
        os.remove(path)


def test_apply_hypernetwork_needs_exactly_one_source(apply_node, pack):
    errors = pack.module("trainer_core.errors")
    with pytest.raises(errors.TrainerInputError, match="no hypernetwork"):
        apply_node.node.execute(model="MODEL", hypernetwork_name="none", strength=1.0)
    with pytest.raises(errors.TrainerInputError, match="none to use the connected one"):
        apply_node.node.execute(model="MODEL", hypernetwork_name="style.pt", strength=1.0,
                                hypernetwork=small_hypernetwork(pack))


# ---------------------------------------------------------------------------------------------
# MergeLoRAToCkpt, on a two-layer "checkpoint"


RANK = 2


def kohya_lora(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "lora_unet_w.lora_down.weight": torch.randn(RANK, 3, generator=generator),
        "lora_unet_w.lora_up.weight": torch.randn(4, RANK, generator=generator),
        "lora_unet_w.alpha": torch.tensor(1.0),
        "lora_te_x.lora_down.weight": torch.randn(RANK, 5, generator=generator),
        "lora_te_x.lora_up.weight": torch.randn(6, RANK, generator=generator),
        "lora_te_x.alpha": torch.tensor(2.0),
    }


@pytest.fixture
def merge_node(pack, monkeypatch):
    base = {"model.diffusion_model.w.weight": torch.randn(4, 3),
            "cond_stage_model.transformer.text_model.x.weight": torch.randn(6, 5),
            "first_stage_model.decoder.weight": torch.randn(2, 2),
            "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    key_map = {"lora_unet_w": "model.diffusion_model.w.weight",
               "lora_te_x": "cond_stage_model.transformer.text_model.x.weight"}
    bridge = FakeBridge(state_dict=base, key_map=key_map)
    node = use_bridge(pack, monkeypatch, "MergeLoRAToCkpt", bridge)
    folder = pack.folder_paths.folders["checkpoints"]
    yield types.SimpleNamespace(node=node, bridge=bridge, base=base, folder=folder,
                                errors=pack.module("trainer_core.errors"))
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))


MERGE_INPUTS = dict(lora_name="none", strength_model=1.0, strength_clip=0.5, output_name="merged_model",
                    save_precision="fp16", save_file=True, overwrite=False)


def run_merge_node(merge_node, lora=None, **overrides):
    inputs = {**MERGE_INPUTS, **overrides}
    if lora is None and inputs["lora_name"] == "none":
        lora = kohya_lora()
    return merge_node.node.execute(model="MODEL", clip="CLIP", vae="VAE", lora=lora, **inputs)


def expected_weight(base, lora, name, strength):
    scale = float(lora[f"{name}.alpha"]) / RANK * strength
    return base + scale * lora[f"{name}.lora_up.weight"] @ lora[f"{name}.lora_down.weight"]


def test_merge_saves_an_ldm_layout_checkpoint_with_the_lora_in_its_weights(merge_node):
    output = run_merge_node(merge_node)
    assert output.values == ("MERGED_MODEL", "MERGED_CLIP", "merged_model.safetensors")
    lora, base = kohya_lora(), merge_node.base
    with safe_open(os.path.join(merge_node.folder, "merged_model.safetensors"), framework="pt") as f:
        saved = {key: f.get_tensor(key) for key in f.keys()}
        metadata = f.metadata()
    assert saved.keys() == base.keys()
    unet = saved["model.diffusion_model.w.weight"]
    assert unet.dtype == torch.float16
    assert torch.allclose(unet.float(), expected_weight(base["model.diffusion_model.w.weight"], lora, "lora_unet_w", 1.0),
                          atol=1e-2)
    text = saved["cond_stage_model.transformer.text_model.x.weight"].float()
    assert torch.allclose(text, expected_weight(base["cond_stage_model.transformer.text_model.x.weight"], lora,
                                                "lora_te_x", 0.5), atol=1e-2)
    assert torch.equal(saved["first_stage_model.decoder.weight"], base["first_stage_model.decoder.weight"].half())
    assert saved["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    assert metadata["merge.base_model"] == "checkpoint of node 7 in PROMPT" and metadata["merge.base_model_hash"] == "basehash"
    assert metadata["merge.lora"] == "LORA_MODEL from the workflow"
    assert (metadata["merge.strength_model"], metadata["merge.strength_clip"]) == ("1", "0.5")
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"


def test_merged_outputs_are_built_from_exactly_the_saved_tensors(merge_node):
    run_merge_node(merge_node, save_precision="fp32")
    _, built_from = next(c for c in merge_node.bridge.calls if c[0] == "models_from_checkpoint_state_dict")
    with safe_open(os.path.join(merge_node.folder, "merged_model.safetensors"), framework="pt") as f:
        assert all(torch.equal(f.get_tensor(k), built_from[k]) for k in f.keys())
    assert built_from["model.diffusion_model.w.weight"].dtype == torch.float32


def test_merge_without_saving_writes_nothing_and_returns_an_empty_name(merge_node):
    output = run_merge_node(merge_node, save_file=False)
    assert output.values == ("MERGED_MODEL", "MERGED_CLIP", "")
    assert os.listdir(merge_node.folder) == []


def test_merge_keeps_an_existing_checkpoint_unless_overwrite_is_on(merge_node):
    path = os.path.join(merge_node.folder, "merged_model.safetensors")
    save_file({"other": torch.zeros(1)}, path)
    with pytest.raises(merge_node.errors.TrainerInputError, match="merged_model.safetensors.*overwrite"):
        run_merge_node(merge_node)
    with safe_open(path, framework="pt") as f:
        assert list(f.keys()) == ["other"]
    run_merge_node(merge_node, overwrite=True)
    with safe_open(path, framework="pt") as f:
        assert "model.diffusion_model.w.weight" in f.keys()


def test_merge_queued_again_with_the_same_inputs_keeps_its_file(merge_node):
    run_merge_node(merge_node)
    path = os.path.join(merge_node.folder, "merged_model.safetensors")
    written = os.stat(path).st_mtime_ns
    assert run_merge_node(merge_node).values[2] == "merged_model.safetensors"
    assert os.stat(path).st_mtime_ns == written
    with pytest.raises(merge_node.errors.TrainerInputError, match="overwrite"):
        run_merge_node(merge_node, strength_model=0.7)


def test_merge_reads_a_lora_file_from_the_loras_folder(merge_node, pack):
    path = os.path.join(pack.folder_paths.folders["loras"], "glue_lora.safetensors")
    save_file(kohya_lora(seed=3), path)
    try:
        run_merge_node(merge_node, lora=None, lora_name="glue_lora.safetensors", save_precision="fp32")
    finally:
        os.remove(path)
    with safe_open(os.path.join(merge_node.folder, "merged_model.safetensors"), framework="pt") as f:
        assert f.metadata()["merge.lora"] == "glue_lora.safetensors"
        assert torch.allclose(f.get_tensor("model.diffusion_model.w.weight"), expected_weight(
            merge_node.base["model.diffusion_model.w.weight"], kohya_lora(seed=3), "lora_unet_w", 1.0), atol=1e-5)


def test_merge_reruns_when_the_lora_file_behind_the_name_changes(merge_node, pack):
    path = os.path.join(pack.folder_paths.folders["loras"], "glue_lora.safetensors")
    assert merge_node.node.fingerprint_inputs(lora_name="glue_lora.safetensors") == "glue_lora.safetensors"
    save_file(kohya_lora(seed=1), path)
    try:
        first = merge_node.node.fingerprint_inputs(lora_name="glue_lora.safetensors")
        save_file(kohya_lora(seed=2) | {"lora_unet_y.alpha": torch.tensor(1.0)}, path)
        assert merge_node.node.fingerprint_inputs(lora_name="glue_lora.safetensors") != first
    finally:
        os.remove(path)


def test_merge_needs_exactly_one_lora(merge_node):
    with pytest.raises(merge_node.errors.TrainerInputError, match="no LoRA"):
        merge_node.node.execute(model="MODEL", clip="CLIP", vae="VAE", **MERGE_INPUTS)
    with pytest.raises(merge_node.errors.TrainerInputError, match="lora_name to none"):
        run_merge_node(merge_node, lora=kohya_lora(), lora_name="some.safetensors")


def test_merge_keeps_a_path_like_output_name_inside_the_checkpoints_folder(merge_node):
    name = run_merge_node(merge_node, output_name="../../outside").values[2]
    assert "/" not in name and name.endswith("outside.safetensors")
    assert os.listdir(merge_node.folder) == [name]
    assert not os.path.exists(os.path.join(merge_node.folder, "..", "..", "outside.safetensors"))
