"""Textual inversion and DreamArtist on the tiny model: files, what trains, resume, names."""
import os
import random

import pytest
import torch
from safetensors import safe_open

from trainer_core.adapters.embedding import (EmbeddingConfig, check_embedding_name, embedding_dataset,
                                             load_embedding, negative_captions)
from trainer_core.backends.diffusers import tiny_parts
from trainer_core.config import TrainConfig
from trainer_core.dataset import DatasetConfig, ImageDataset
from trainer_core.errors import TrainerInputError
from trainer_core.train import train_embedding

from learning import concept_images

NAME = "skk_emb"
TEMPLATE = ["a photo of [name], [filewords]", "a picture of [name]"]


@pytest.fixture(scope="module")
def parts():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_parts()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset():
    images = concept_images(4)
    captions = ["skkmtn, orange ring", "skkmtn", "an orange skkmtn on grey", None]
    base = ImageDataset.from_images(images, captions, DatasetConfig(instance_token="skkmtn", class_token="ring",
                                                                    resolution=64))
    return embedding_dataset(base, NAME, TEMPLATE)


def config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), output_name=NAME, steps=4, learning_rate=5e-3, seed=3)
    values.update(overrides)
    return TrainConfig(**values)


def train(parts, dataset, tmp_path, mode="textual_inversion", **overrides):
    embedding = {k: overrides.pop(k) for k in list(overrides) if k in EmbeddingConfig.__dataclass_fields__}
    return train_embedding(parts, dataset, EmbeddingConfig(mode=mode, **embedding), config(tmp_path, **overrides))


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_captions_call_the_embedding_and_the_trigger_word_becomes_it(dataset):
    rng = random.Random(0)
    captions = {dataset.caption(i, rng) for i in range(len(dataset)) for _ in range(8)}
    assert all(f"embedding:{NAME}" in c for c in captions), captions
    assert not any("skkmtn" in c for c in captions), captions
    assert "a photo of embedding:skk_emb, an orange embedding:skk_emb on grey" in captions
    assert "a photo of embedding:skk_emb, ring" in captions  # no caption file: the class word
    assert negative_captions(["a photo of embedding:skk_emb, x", "embedding:skk_embx"], NAME) == \
        ["a photo of embedding:skk_emb-neg, x", "embedding:skk_embx"]


def test_safetensors_file_holds_emb_params_and_metadata(parts, dataset, tmp_path):
    result = train(parts, dataset, tmp_path, vectors=2)
    path = tmp_path / f"{NAME}.safetensors"
    assert result.final_path == str(path)
    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == ["emb_params"]
        tensor, metadata = f.get_tensor("emb_params"), f.metadata()
    assert tensor.shape == (2, 32) and tensor.dtype == torch.float32
    assert torch.equal(tensor, result.adapter.positive.detach())
    assert metadata["name"] == NAME and metadata["step"] == "4" and metadata["vectors"] == "2"
    assert metadata["mode"] == "textual_inversion"
    assert metadata["sd_checkpoint"] == parts.base_model_hash[:10]
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"


def test_a1111_pt_file_loads_with_weights_only(parts, dataset, tmp_path):
    result = train(parts, dataset, tmp_path, file_format="a1111_pt", vectors=3)
    payload = torch.load(tmp_path / f"{NAME}.pt", weights_only=True)
    assert set(payload) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint",
                            "sd_checkpoint_name"}
    assert list(payload["string_to_param"]) == ["*"] and list(payload["string_to_token"]) == ["*"]
    assert torch.equal(payload["string_to_param"]["*"], result.adapter.positive.detach())
    assert payload["name"] == NAME and payload["step"] == 4
    assert payload["sd_checkpoint"] == parts.base_model_hash[:10]


def test_dreamartist_writes_positive_and_negative_with_intermediate_saves(parts, dataset, tmp_path):
    result = train(parts, dataset, tmp_path, mode="dreamartist", save_every_steps=2)
    files = sorted(f for f in os.listdir(tmp_path) if not f.endswith(".trainstate"))
    assert files == [f"{NAME}-2-neg.safetensors", f"{NAME}-2.safetensors", f"{NAME}-neg.safetensors",
                     f"{NAME}.safetensors"]
    positive, _, _ = load_embedding(str(tmp_path / f"{NAME}.safetensors"))
    negative, step, metadata = load_embedding(str(tmp_path / f"{NAME}-neg.safetensors"))
    assert positive.shape == (3, 32) and negative.shape == (6, 32) and step == 4
    assert metadata["name"] == f"{NAME}-neg" and metadata["mode"] == "dreamartist"
    assert torch.equal(negative, result.adapter.negative.detach())


def test_only_the_embedding_vectors_change(parts, dataset, tmp_path):
    before = [state(m) for m in (parts.unet, parts.text_encoder)]
    token_table = parts.text_encoder.get_input_embeddings().weight.clone()
    trained = {}
    for mode in ("textual_inversion", "dreamartist"):
        trained[mode] = train(parts, dataset, tmp_path / mode, mode=mode).adapter
    after = [state(m) for m in (parts.unet, parts.text_encoder)]
    for old, new in zip(before, after):
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    assert torch.equal(parts.text_encoder.get_input_embeddings().weight, token_table)
    assert all(not p.requires_grad for m in (parts.unet, parts.text_encoder) for p in m.parameters())
    # ...and they did change: the init word "*" is where they started.
    start = parts.token_embeddings(parts.tokenize("*"))[0]
    assert not torch.allclose(trained["textual_inversion"].positive.detach()[0], start)


@pytest.mark.parametrize("mode", ["textual_inversion", "dreamartist"])
def test_resume_continues_bit_for_bit(parts, dataset, tmp_path, mode):
    straight = train(parts, dataset, tmp_path / "straight", mode=mode, steps=4)
    train(parts, dataset, tmp_path / "resumed", mode=mode, steps=4, save_every_steps=2)
    for name in os.listdir(tmp_path / "resumed"):
        if not name.startswith(f"{NAME}-2"):
            os.remove(tmp_path / "resumed" / name)
    resumed = train(parts, dataset, tmp_path / "resumed", mode=mode, steps=4,
                    resume_from=str(tmp_path / "resumed" / f"{NAME}-2.safetensors"))
    assert not resumed.from_cache
    for name, vectors in straight.adapter.by_name().items():
        assert torch.equal(vectors, resumed.adapter.by_name()[name]), name
    assert [loss for _, loss in straight.losses] == [loss for _, loss in resumed.losses]


def test_requeue_loads_the_file_instead_of_training(parts, dataset, tmp_path):
    first = train(parts, dataset, tmp_path, mode="dreamartist")
    again = train(parts, dataset, tmp_path, mode="dreamartist")
    assert again.from_cache and again.losses == first.losses
    for name, vectors in first.adapter.by_name().items():
        assert torch.equal(vectors, again.adapter.by_name()[name])


def test_dreamartist_at_scale_one_predicts_like_textual_inversion(parts, dataset, tmp_path):
    from trainer_core.adapters.embedding import EmbeddingJob
    train_config = config(tmp_path)
    ti = EmbeddingJob(parts, EmbeddingConfig(), train_config, dataset)
    da = EmbeddingJob(parts, EmbeddingConfig(mode="dreamartist", cfg_scale=1.0), train_config, dataset)
    with torch.no_grad():
        da.module.positive.copy_(ti.module.positive)
    noisy, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    captions = [f"a photo of embedding:{NAME}"] * 2
    with torch.no_grad(), ti.attached():
        expected = ti.predict(noisy, timesteps, captions)
    with torch.no_grad(), da.attached():
        combined = da.predict(noisy, timesteps, captions)
        negative = parts.predict_noise(noisy, timesteps, parts.encode_text(negative_captions(captions, NAME)))
    assert torch.allclose(combined, expected, atol=1e-5)
    assert not torch.allclose(negative, expected, atol=1e-3), "the negative prompt reads its own vectors"


def test_training_cfg_scale_varies_with_the_timestep():
    t = torch.tensor([0, 999])
    assert EmbeddingConfig(cfg_scale=3.0).cfg_scales(t, 1000).tolist() == [3.0, 3.0]
    for curve in ("linear", "cos", "cos2"):
        scales = EmbeddingConfig(cfg_scale=1.0, cfg_scale_high=5.0, cfg_curve=curve).cfg_scales(t, 1000)
        assert torch.allclose(scales, torch.tensor([1.0, 5.0]), atol=1e-6), curve
    middle = EmbeddingConfig(cfg_scale=1.0, cfg_scale_high=5.0, cfg_curve="cos2").cfg_scales(torch.tensor([500]), 1000)
    assert 1.0 < float(middle) < 3.0  # cos2 rises slowly at first


@pytest.mark.parametrize("name, problem", [
    ("", "empty"), ("sub/skk", "path"), ("..\\skk", "path"), ("skk emb", "space"), ("skk.pt", "without it"),
    ("(skk)", "letters, digits"), ("-skk", "letters, digits"),
])
def test_bad_names_are_refused(name, problem):
    with pytest.raises(TrainerInputError, match=problem):
        check_embedding_name(name)


def test_an_ordinary_word_is_refused_as_a_name(parts, dataset, tmp_path):
    with pytest.raises(TrainerInputError, match="ordinary word"):
        train(parts, dataset, tmp_path, output_name="cat")
    assert os.listdir(tmp_path) == []


def test_an_existing_embedding_of_that_name_stops_training_unless_overwrite(parts, dataset, tmp_path):
    theirs = tmp_path / f"{NAME}.safetensors"
    theirs.write_bytes(b"someone else's embedding")
    with pytest.raises(TrainerInputError, match="already exists"):
        train(parts, dataset, tmp_path)
    assert theirs.read_bytes() == b"someone else's embedding"
    result = train(parts, dataset, tmp_path, overwrite=True)
    assert torch.equal(load_embedding(str(theirs))[0], result.adapter.positive.detach())


def test_a_file_of_the_same_name_with_another_extension_or_folder_is_refused(parts, dataset, tmp_path):
    (tmp_path / "downloaded").mkdir()
    (tmp_path / "downloaded" / f"{NAME}-neg.pt").write_bytes(b"x")
    train(parts, dataset, tmp_path, mode="textual_inversion")  # the TI run writes no -neg file
    with pytest.raises(TrainerInputError, match="would find it instead"):
        train(parts, dataset, tmp_path, mode="dreamartist", overwrite=True, force_retrain=True)


def test_dreamartist_resume_from_the_negative_file_points_to_the_positive_one(parts, dataset, tmp_path):
    train(parts, dataset, tmp_path, mode="dreamartist")
    with pytest.raises(TrainerInputError, match="Pick the positive file, skk_emb.safetensors"):
        train(parts, dataset, tmp_path, mode="dreamartist", steps=6, output_name="skk_emb2",
              resume_from=str(tmp_path / f"{NAME}-neg.safetensors"))


def test_resume_with_other_vector_counts_names_the_field(parts, dataset, tmp_path):
    train(parts, dataset, tmp_path, vectors=2)
    with pytest.raises(TrainerInputError, match="set vectors to 2"):
        train(parts, dataset, tmp_path, vectors=3, steps=6, output_name="skk_emb2",
              resume_from=str(tmp_path / f"{NAME}.safetensors"))
