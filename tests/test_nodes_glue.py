"""The node glue without ComfyUI: schemas, validation, and what execute() hands to trainer_core.

ComfyUI's `comfy_api.latest` and `folder_paths` are replaced by small stand-ins that record what
the nodes declare, and the ComfyUI bridge by a fake, so these tests check our code only; the
integration tests (tests/integration) run the same nodes inside a real ComfyUI.
"""
import asyncio
import importlib
import importlib.util
import os
import random
import shutil
import sys
import types

import pytest
import torch

from fake_bridge import FakeBridge

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK = "sd1_trainer_glue"
SAMPLES = os.path.join(REPO, "sample_dataset")
OUR_NODES = ("LoadDataset", "RegImages", "LoRATrain")


# ---------------------------------------------------------------------------------------------
# Stand-ins for comfy_api.latest (io, ui, ComfyExtension) and folder_paths


class _Socket:
    """An io.X.Input / io.X.Output: keeps every argument as an attribute."""

    def __init__(self, id=None, *args, **options):
        self.id, self.args = id, args
        self.optional = options.pop("optional", False)
        self.tooltip = options.pop("tooltip", None)
        self.__dict__.update(options)


class _SocketType:
    def __init__(self, io_type):
        self.io_type = io_type
        self.Input = type(f"{io_type}Input", (_Socket,), {"io_type": io_type})
        self.Output = type(f"{io_type}Output", (_Socket,), {"io_type": io_type})


class _Schema:
    def __init__(self, node_id, inputs=(), outputs=(), hidden=(), **fields):
        self.node_id, self.inputs, self.outputs, self.hidden = node_id, list(inputs), list(outputs), hidden
        self.__dict__.update(fields)


class _NodeOutput:
    def __init__(self, *values, ui=None, **_):
        self.values, self.ui = values, ui


class _ComfyNode:
    hidden = None


class _IoModule(types.ModuleType):
    """Any io.<Type> not defined here is a socket type named after it (io.Int -> "INT")."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        socket_type = _SocketType(name.upper())
        setattr(self, name, socket_type)
        return socket_type


def _stub_comfy_api():
    io = _IoModule("comfy_api.latest.io")
    io.ComfyNode, io.Schema, io.NodeOutput = _ComfyNode, _Schema, _NodeOutput
    io.Custom = _SocketType
    io.Hidden = types.SimpleNamespace(unique_id="UNIQUE_ID", prompt="PROMPT", extra_pnginfo="EXTRA_PNGINFO",
                                      dynprompt="DYNPROMPT")
    ui = types.ModuleType("comfy_api.latest.ui")
    ui.PreviewImage = lambda image, cls=None, **_: {"preview": image}

    class ComfyExtension:
        async def get_node_list(self):
            raise NotImplementedError

    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ui, latest.ComfyExtension = io, ui, ComfyExtension
    package = types.ModuleType("comfy_api")
    package.latest = latest
    return {"comfy_api": package, "comfy_api.latest": latest}


def _stub_folder_paths(root):
    folders = {name: os.path.join(root, name)
               for name in ("input", "output", "loras", "hypernetworks", "checkpoints", "embeddings")}
    for path in folders.values():
        os.makedirs(path, exist_ok=True)
    module = types.ModuleType("folder_paths")
    module.get_input_directory = lambda: folders["input"]
    module.get_folder_paths = lambda kind: [folders[kind]]
    module.get_filename_list = lambda kind: sorted(os.listdir(folders[kind]))
    module.get_full_path_or_raise = lambda kind, name: os.path.join(folders[kind], name)
    module.folders = folders
    return module


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    """The repository loaded as a package the way ComfyUI loads a custom node folder."""
    folder_paths = _stub_folder_paths(str(tmp_path_factory.mktemp("comfyui")))
    os.makedirs(os.path.join(folder_paths.folders["input"], "my_pictures"))
    with pytest.MonkeyPatch.context() as patch:
        for name, module in {**_stub_comfy_api(), "folder_paths": folder_paths}.items():
            patch.setitem(sys.modules, name, module)
        spec = importlib.util.spec_from_file_location(
            PACK, os.path.join(REPO, "__init__.py"), submodule_search_locations=[REPO])
        root = importlib.util.module_from_spec(spec)
        patch.setitem(sys.modules, PACK, root)
        spec.loader.exec_module(root)
        extension = asyncio.run(root.comfy_entrypoint())
        nodes = {cls.define_schema().node_id: cls for cls in asyncio.run(extension.get_node_list())}
        yield types.SimpleNamespace(root=root, nodes=nodes, folder_paths=folder_paths,
                                    module=lambda name: importlib.import_module(f"{PACK}.{name}"))
        for name in [n for n in sys.modules if n.startswith(PACK + ".")]:
            del sys.modules[name]


# ---------------------------------------------------------------------------------------------
# Schemas


def test_pack_exports_only_the_v3_entry_point_and_web_folder(pack):
    assert pack.root.WEB_DIRECTORY == "./web"
    assert not hasattr(pack.root, "NODE_CLASS_MAPPINGS"), "V1 mappings would hide the V3 entry point"
    assert set(OUR_NODES) <= set(pack.nodes)


def test_every_input_and_output_has_a_tooltip(pack):
    for node_id, cls in pack.nodes.items():
        schema = cls.define_schema()
        assert schema.description and schema.category == "training", node_id
        for socket in schema.inputs + schema.outputs:
            assert socket.tooltip and len(socket.tooltip) > 20, f"{node_id}.{socket.id or socket.display_name}"


def test_defaults_lie_within_their_ranges_and_options(pack):
    for node_id, cls in pack.nodes.items():
        for socket in cls.define_schema().inputs:
            default = getattr(socket, "default", None)
            if getattr(socket, "options", None) is not None:
                assert default in socket.options, f"{node_id}.{socket.id}"
            if getattr(socket, "min", None) is not None and default is not None:
                assert socket.min <= default <= socket.max, f"{node_id}.{socket.id}"


def test_input_ids_are_unique_per_node(pack):
    for node_id, cls in pack.nodes.items():
        ids = [socket.id for socket in cls.define_schema().inputs]
        assert len(ids) == len(set(ids)), node_id


def test_lora_train_defaults_follow_the_guides(pack):
    inputs = {s.id: s for s in pack.nodes["LoRATrain"].define_schema().inputs}
    expected = {"steps": 1400, "learning_rate": 1e-3, "text_encoder_learning_rate": 5e-5, "rank": 4,
                "alpha": 4.0, "batch_size": 1, "precision": "auto", "train_text_encoder": False,
                "save_every_steps": 0, "output_name": "skkmtn_lora", "resume_from": "none",
                "network_type": "lora", "conv_rank": 4, "conv_alpha": 4.0, "factor": -1}
    assert {name: inputs[name].default for name in expected} == expected
    # A seed that changed after every queue would retrain every time.
    assert inputs["seed"].control_after_generate is False


def test_dataset_folder_choices_are_the_sample_and_the_input_subfolders(pack):
    folder = next(s for s in pack.nodes["LoadDataset"].define_schema().inputs if s.id == "folder")
    assert folder.options == ["(sample) skkmtn_sample", "my_pictures"]


# ---------------------------------------------------------------------------------------------
# LoadDataset and RegImages, on the real trainer_core dataset


def test_load_dataset_reads_the_sample_folder(pack):
    dataset = pack.nodes["LoadDataset"].execute(instance_token="skkmtn", resolution=64).values[0]
    assert len(dataset) == 8
    assert dataset.config.folder == SAMPLES and dataset.config.resolution == 64


def test_load_dataset_fingerprint_changes_when_a_caption_is_edited(pack, tmp_path):
    folder = tmp_path / "pictures"
    shutil.copytree(SAMPLES, folder)
    node = pack.nodes["LoadDataset"]
    before = node.fingerprint_inputs(instance_token="skkmtn", resolution=64, folder_path=str(folder))
    assert before == node.fingerprint_inputs(instance_token="skkmtn", resolution=64, folder_path=str(folder))
    (folder / "skkmtn_01.txt").write_text("skkmtn, a different caption")
    assert before != node.fingerprint_inputs(instance_token="skkmtn", resolution=64, folder_path=str(folder))


def test_load_dataset_fingerprint_leaves_connected_images_to_their_own_node(pack):
    # ComfyUI passes a connected input as None when fingerprinting.
    assert pack.nodes["LoadDataset"].fingerprint_inputs(instance_token="skkmtn", images=None) == "connected images"


def test_load_dataset_refuses_an_empty_instance_token_with_the_fix(pack):
    message = pack.nodes["LoadDataset"].validate_inputs(instance_token="  ")
    assert isinstance(message, str) and "instance_token" in message and "skkmtn" in message
    assert pack.nodes["LoadDataset"].validate_inputs(instance_token="skkmtn") is True


def test_load_dataset_takes_an_image_batch_with_one_caption_per_line(pack):
    images = torch.rand(2, 64, 96, 3)
    dataset = pack.nodes["LoadDataset"].execute(
        instance_token="skkmtn", resolution=64, images=images, captions="skkmtn, red\nskkmtn, blue\n").values[0]
    assert len(dataset) == 2
    assert [item.text for item in dataset.items] == ["skkmtn, red", "skkmtn, blue"]
    assert dataset.items[0].size == (96, 64)


def test_load_dataset_refuses_a_folder_outside_the_input_folder(pack):
    errors = pack.module("trainer_core.errors")
    with pytest.raises(errors.TrainerInputError, match="outside ComfyUI's input folder"):
        pack.nodes["LoadDataset"].execute(instance_token="skkmtn", folder="../../etc")


def test_reg_images_makes_blank_class_images(pack):
    regularization = pack.nodes["RegImages"].execute(
        class_prompt="a creature", blank_count=3, resolution=64, prior_loss_weight=0.5).values[0]
    assert len(regularization.dataset) == 3 and regularization.prior_loss_weight == 0.5


def test_reg_images_reads_caption_files_only_when_asked(pack, tmp_path):
    from PIL import Image
    Image.new("RGB", (64, 64), (10, 200, 10)).save(tmp_path / "car.png")
    (tmp_path / "car.txt").write_text("a photo of a green car", encoding="utf-8")
    node = pack.nodes["RegImages"]
    asked = node.execute(class_prompt="a photo of a girl", folder_path=str(tmp_path), resolution=64,
                         use_caption_files=True).values[0]
    default = node.execute(class_prompt="a photo of a girl", folder_path=str(tmp_path), resolution=64).values[0]
    assert asked.dataset.caption(0, random.Random(0)) == "a photo of a green car"
    assert default.dataset.caption(0, random.Random(0)) == "a photo of a girl"
    assert node.fingerprint_inputs(class_prompt="a photo of a girl", folder_path=str(tmp_path), resolution=64,
                                   use_caption_files=True) \
        != node.fingerprint_inputs(class_prompt="a photo of a girl", folder_path=str(tmp_path), resolution=64)


def test_reg_images_refuses_an_empty_class_prompt(pack):
    assert "class_prompt" in pack.nodes["RegImages"].validate_inputs(class_prompt="")


# ---------------------------------------------------------------------------------------------
# LoRATrain, with the ComfyUI bridge and the trainer replaced


LORA_INPUTS = dict(
    output_name="skkmtn_lora", steps=7, learning_rate=1e-3, text_encoder_learning_rate=5e-5,
    train_text_encoder=True, rank=8, alpha=2.0, network_type="lokr", conv_rank=2, conv_alpha=1.0, factor=4,
    batch_size=2, gradient_accumulation=3, optimizer="AdamW",
    lr_scheduler="cosine", warmup_steps=1, precision="fp32", gradient_checkpointing=True, seed=5,
    save_every_steps=2, sample_every_steps=0, resume_from="none", overwrite=False, force_retrain=True)


@pytest.fixture
def lora_node(pack, monkeypatch):
    """LoRATrain with a fake bridge and a fake train_lora that records its arguments."""
    bridge = FakeBridge()
    monkeypatch.setattr(pack.module("nodes"), "comfy_bridge", bridge, raising=False)
    train = pack.module("trainer_core.train")
    state_dict = {"lora_unet_x.alpha": torch.tensor(2.0)}
    final_path = os.path.join(pack.folder_paths.folders["loras"], "skkmtn_lora.safetensors")
    recorded = {}

    def fake_train_lora(parts, dataset, lora_config, train_config, regularization=None, callbacks=None):
        recorded.update(parts=parts, dataset=dataset, lora_config=lora_config, train_config=train_config,
                        regularization=regularization, callbacks=callbacks)
        if recorded.get("raise"):
            raise recorded["raise"]
        return train.TrainResult(adapter=None, final_path=final_path, losses=[(1, 0.5), (2, 0.25)],
                                 kohya_state_dict=state_dict)
    monkeypatch.setattr(train, "train_lora", fake_train_lora)
    node = pack.nodes["LoRATrain"]
    monkeypatch.setattr(node, "hidden", types.SimpleNamespace(unique_id="12", prompt="PROMPT"))
    return types.SimpleNamespace(node=node, bridge=bridge, recorded=recorded, state_dict=state_dict,
                                 errors=pack.module("trainer_core.errors"))


def run_lora_node(lora_node, **overrides):
    inputs = {**LORA_INPUTS, **overrides}
    return lora_node.node.execute(model="MODEL", clip="CLIP", vae="VAE", dataset="DATASET",
                                  regularization="REG", **inputs)


def test_lora_train_hands_every_option_to_the_trainer(lora_node, pack):
    run_lora_node(lora_node)
    recorded, config = lora_node.recorded, lora_node.recorded["train_config"]
    assert recorded["dataset"] == "DATASET" and recorded["regularization"] == "REG"
    assert recorded["callbacks"] == "callbacks"
    assert recorded["parts"].base_model_name == "checkpoint of node 12 in PROMPT"
    assert (recorded["lora_config"].rank, recorded["lora_config"].alpha, recorded["lora_config"].train_text_encoder) \
        == (8, 2.0, True)
    lycoris = recorded["lora_config"]
    assert (lycoris.network_type, lycoris.conv_rank, lycoris.conv_alpha, lycoris.factor) == ("lokr", 2, 1.0, 4)
    assert config.output_dir == pack.folder_paths.folders["loras"]
    for name, value in LORA_INPUTS.items():
        if name not in ("rank", "alpha", "train_text_encoder", "resume_from", "network_type", "conv_rank",
                        "conv_alpha", "factor"):
            assert getattr(config, name) == value, name
    assert config.resume_from == ""
    assert ("check_sd1", "MODEL") in lora_node.bridge.calls
    assert ("progress", 7, "12") in lora_node.bridge.calls
    assert ("training_context", "unet", "text_encoder") in lora_node.bridge.calls


def test_lora_train_returns_the_patched_pair_the_lora_the_loss_and_the_file_name(lora_node):
    output = run_lora_node(lora_node)
    model, clip, lora, loss, name = output.values
    assert (model, clip) == ("MODEL+lora", "CLIP+lora")
    assert lora == {"lora_model": lora_node.state_dict}
    assert loss == {"loss": [0.5, 0.25]}
    assert name == "skkmtn_lora.safetensors"
    assert output.ui["preview"].shape[0] == 1 and output.ui["preview"].shape[-1] == 3


def test_lora_train_freezes_only_the_unet_when_the_text_encoder_is_not_trained(lora_node):
    run_lora_node(lora_node, train_text_encoder=False)
    assert ("training_context", "unet") in lora_node.bridge.calls


def test_lora_train_resumes_from_the_chosen_file_in_the_loras_folder(lora_node, pack):
    run_lora_node(lora_node, resume_from="skkmtn_lora_500.safetensors")
    assert lora_node.recorded["train_config"].resume_from == os.path.join(
        pack.folder_paths.folders["loras"], "skkmtn_lora_500.safetensors")


def test_lora_train_refuses_a_lora_comfyui_would_only_partly_load(lora_node):
    lora_node.bridge.unmatched = ["lora_unet_missing.lora_up.weight"]
    with pytest.raises(RuntimeError, match="lora_unet_missing"):
        run_lora_node(lora_node)


def test_lora_train_turns_a_cancelled_run_into_comfyuis_interrupt(lora_node):
    lora_node.recorded["raise"] = lora_node.errors.TrainingCancelled("cancelled", last_save=None, step=3)
    with pytest.raises(FakeBridge.Interrupted):
        run_lora_node(lora_node)


def test_lora_train_stops_the_prompt_when_cancel_came_during_the_last_step(lora_node):
    # The run finished, but the user pressed Cancel: the files are kept, the prompt stops.
    lora_node.bridge.cancel_pressed = True
    with pytest.raises(FakeBridge.Interrupted):
        run_lora_node(lora_node)
