"""EmbeddingTrain without ComfyUI: its schema, name validation, and what execute() hands to
trainer_core and the bridge. The pack is loaded with the stand-ins of tests/test_nodes_glue.py;
tests/integration/test_embedding_nodes.py runs the same node in a real ComfyUI."""
import os
import random
import types

import pytest

from fake_bridge import FakeBridge
from test_nodes_glue import SAMPLES, pack  # noqa: F401  (the pack loaded with ComfyUI stand-ins)

INPUTS = dict(
    name="skk_emb", mode="dreamartist", vectors=2, negative_vectors=5, init_text="creature", steps=9,
    learning_rate=0.0, cfg_scale=4.0, cfg_scale_high=6.0, cfg_curve="cos", negative_lr_weight=0.5,
    prompt_template="subject", batch_size=1, gradient_accumulation=2, precision="fp32",
    gradient_checkpointing=False, seed=4, save_every_steps=3, file_format="a1111_pt", resume_from="none",
    overwrite=True, force_retrain=False)


@pytest.fixture
def node(pack, monkeypatch):
    """EmbeddingTrain with a fake bridge and a fake train_embedding that records its arguments."""
    bridge = FakeBridge()
    monkeypatch.setattr(pack.module("nodes"), "comfy_bridge", bridge, raising=False)
    train = pack.module("trainer_core.train")
    folder = pack.folder_paths.folders["embeddings"]
    recorded = {}

    def fake_train_embedding(parts, dataset, embedding_config, train_config, regularization=None, callbacks=None,
                             embedding_folders=None):
        recorded.update(parts=parts, dataset=dataset, config=embedding_config, train_config=train_config,
                        callbacks=callbacks, folders=embedding_folders)
        final = os.path.join(folder, f"{train_config.output_name}{embedding_config.suffix}")
        return train.TrainResult(adapter=None, final_path=final, losses=[(1, 0.5), (2, 0.25)])
    monkeypatch.setattr(train, "train_embedding", fake_train_embedding)
    cls = pack.nodes["EmbeddingTrain"]
    monkeypatch.setattr(cls, "hidden", types.SimpleNamespace(unique_id="7", prompt="PROMPT"))
    dataset_module = pack.module("trainer_core.dataset")
    dataset = dataset_module.ImageDataset.from_folder(
        dataset_module.DatasetConfig(folder=SAMPLES, instance_token="skkmtn", resolution=64))
    return types.SimpleNamespace(cls=cls, bridge=bridge, recorded=recorded, folder=folder, dataset=dataset)


def run(node, **overrides):
    return node.cls.execute(model="MODEL", clip="CLIP", vae="VAE", dataset=node.dataset, **{**INPUTS, **overrides})


def test_schema_is_in_the_training_category_with_a_tooltip_on_every_socket(pack):
    schema = pack.nodes["EmbeddingTrain"].define_schema()
    assert schema.category == "training"
    assert schema.display_name == "Train Embedding (Textual Inversion / DreamArtist)"
    assert all(socket.tooltip for socket in schema.inputs + schema.outputs)


def test_dreamartist_options_reach_the_trainer_and_the_pair_comes_back(node):
    output = run(node)
    recorded, config, train_config = node.recorded, node.recorded["config"], node.recorded["train_config"]
    assert (config.mode, config.vectors, config.negative_vectors) == ("dreamartist", 2, 5)
    assert config.init_text == "creature"
    assert (config.cfg_scale, config.cfg_scale_high, config.cfg_curve, config.negative_lr_weight) == (4.0, 6.0, "cos", 0.5)
    assert config.file_format == "a1111_pt"
    assert train_config.learning_rate == 3e-3, "0 = DreamArtist's default"
    assert (train_config.output_dir, train_config.output_name) == (node.folder, "skk_emb")
    assert (train_config.steps, train_config.gradient_accumulation, train_config.seed) == (9, 2, 4)
    assert (train_config.save_every_steps, train_config.overwrite, train_config.resume_from) == (3, True, "")
    assert recorded["folders"] == [node.folder]
    caption = recorded["dataset"].caption(0, random.Random(0))
    assert "embedding:skk_emb" in caption and "skkmtn" not in caption
    assert ("add_embedding_support", "CLIP") in node.bridge.calls
    assert ("training_context", "unet", "text_encoder") in node.bridge.calls
    clip, positive, negative, loss, files = output.values
    assert (clip, positive, negative) == ("CLIP+embeddings", "embedding:skk_emb", "embedding:skk_emb-neg")
    assert loss == {"loss": [0.5, 0.25]} and files == "skk_emb.pt, skk_emb-neg.pt"


def test_textual_inversion_has_no_negative_text_and_its_own_default_learning_rate(node):
    output = run(node, mode="textual_inversion", file_format="safetensors", learning_rate=0.0)
    assert node.recorded["train_config"].learning_rate == 5e-3
    assert output.values[1:3] == ("embedding:skk_emb", "")
    assert output.values[4] == "skk_emb.safetensors"
    assert run(node, learning_rate=0.01) and node.recorded["train_config"].learning_rate == 0.01


@pytest.mark.parametrize("name, problem", [("../x", "path"), ("a b", "space"), ("", "empty")])
def test_bad_names_fail_validation_before_queueing(pack, name, problem):
    assert problem in pack.nodes["EmbeddingTrain"].validate_inputs(name=name)
    assert pack.nodes["EmbeddingTrain"].validate_inputs(name="skk_emb") is True


def test_regularization_is_accepted_but_not_trained_on_and_the_console_says_so(node, caplog):
    with caplog.at_level("WARNING"):
        output = run(node, mode="textual_inversion", regularization="REG")
    assert output.values[1] == "embedding:skk_emb"
    assert "regularization" not in node.recorded or node.recorded.get("regularization") is None
    assert any("not trained on" in record.getMessage() for record in caplog.records)
    schema = node.cls.define_schema()
    socket = next(s for s in schema.inputs if s.id == "regularization")
    assert socket.optional
