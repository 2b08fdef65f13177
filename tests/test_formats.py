"""File formats: atomic writes, safe output names, kohya LoRA files, training state."""
import hashlib
import json
import os
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from trainer_core.errors import TrainerInputError
from trainer_core.formats import (
    OutputExistsError,
    atomic_write,
    describe_state_dict,
    load_lora,
    load_training_state,
    lora_metadata,
    safe_output_path,
    save_lora,
    save_training_state,
)


def write_text(text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return write


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


# --- atomic_write ----------------------------------------------------------------------


def test_atomic_write_writes_through_a_hidden_temp_file_in_the_same_folder(tmp_path):
    seen = []

    def write(tmp):
        seen.append(tmp)
        write_text("new")(tmp)

    atomic_write(tmp_path / "out.txt", write)
    assert read(tmp_path / "out.txt") == "new"
    tmp = seen[0]
    assert os.path.dirname(tmp) == str(tmp_path)
    assert os.path.basename(tmp).startswith(".") and tmp.endswith(".tmp")
    assert os.listdir(tmp_path) == ["out.txt"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_written_file_gets_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "out.txt", write_text("x"))
    finally:
        os.umask(umask)
    assert os.stat(tmp_path / "out.txt").st_mode & 0o777 == 0o644


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_a_file_its_writer_makes_private_still_gets_the_umask_mode(tmp_path, umask, mode):
    # safetensors replaces the file it writes with a 0600 one; A1111 or ComfyUI running as
    # another user could not read such a LoRA.
    previous = os.umask(umask)
    try:
        atomic_write(tmp_path / "out.safetensors", lambda tmp: save_file({"x": torch.zeros(2)}, tmp))
    finally:
        os.umask(previous)
    assert os.stat(tmp_path / "out.safetensors").st_mode & 0o777 == mode


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, error):
    target = tmp_path / "out.txt"
    target.write_text("old", encoding="utf-8")

    def write(tmp):
        write_text("half")(tmp)
        raise error

    with pytest.raises(type(error)):
        atomic_write(target, write, overwrite=True)
    assert read(target) == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_existing_file_is_kept_unless_overwrite(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(OutputExistsError) as info:
        atomic_write(target, write_text("new"))
    assert isinstance(info.value, TrainerInputError) and isinstance(info.value, FileExistsError)
    assert "overwrite" in str(info.value)
    assert read(target) == "old" and os.listdir(tmp_path) == ["out.txt"]
    atomic_write(target, write_text("new"), overwrite=True)
    assert read(target) == "new"


def test_file_appearing_during_the_write_is_not_replaced(tmp_path):
    target = tmp_path / "out.txt"

    def write(tmp):
        write_text("mine")(tmp)
        target.write_text("someone else's", encoding="utf-8")

    with pytest.raises(OutputExistsError):
        atomic_write(target, write)
    assert read(target) == "someone else's" and os.listdir(tmp_path) == ["out.txt"]


def test_atomic_write_creates_the_folder(tmp_path):
    atomic_write(tmp_path / "loras" / "a.txt", write_text("x"))
    assert read(tmp_path / "loras" / "a.txt") == "x"


# --- safe_output_path ------------------------------------------------------------------


def inside(folder, path):
    real = os.path.realpath(folder)
    return os.path.commonpath([real, os.path.realpath(path)]) == real and os.path.dirname(path) == str(folder)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("my_lora", "my_lora.safetensors"),
        ("my_lora.safetensors", "my_lora.safetensors"),
        ("../x", "__x.safetensors"),
        ("/abs", "_abs.safetensors"),
        ("a/b", "a_b.safetensors"),
        ("a\\b", "a_b.safetensors"),
        ("a:b", "a_b.safetensors"),
        ('w<>"|?*', "w______.safetensors"),
        ("tab\there", "tab_here.safetensors"),
        ("CON", "_CON.safetensors"),
        ("nul.txt", "_nul.txt.safetensors"),
        ("com1", "_com1.safetensors"),
        (".hidden", "hidden.safetensors"),
        ("trailing. ", "trailing.safetensors"),
        ("猫のLoRA", "猫のLoRA.safetensors"),
    ],
)
def test_output_names_are_cleaned_into_the_folder(tmp_path, name, expected):
    path = safe_output_path(tmp_path, name, ".safetensors")
    assert os.path.basename(path) == expected
    assert inside(tmp_path, path)


@pytest.mark.parametrize("name", ["", "   ", "..", "/", "...", ". .", None])
def test_output_names_without_usable_characters_are_refused(tmp_path, name):
    with pytest.raises(TrainerInputError, match="output_name"):
        safe_output_path(tmp_path, name, ".safetensors")


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"")
    with pytest.raises(OutputExistsError):
        safe_output_path(tmp_path, "a", ".safetensors")
    assert safe_output_path(tmp_path, "a", ".safetensors", overwrite=True) == str(tmp_path / "a.safetensors")


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_link_pointing_outside_the_folder_is_refused(tmp_path):
    folder, outside = tmp_path / "loras", tmp_path / "elsewhere"
    folder.mkdir()
    outside.mkdir()
    os.symlink(outside / "x.safetensors", folder / "x.safetensors")
    with pytest.raises(TrainerInputError, match="outside"):
        safe_output_path(folder, "x", ".safetensors", overwrite=True)


@settings(max_examples=300, deadline=None)
@given(name=st.text(max_size=300))
def test_any_output_name_is_refused_or_lands_inside_the_folder(tmp_path_factory, name):
    folder = tmp_path_factory.getbasetemp() / "fuzz"
    try:
        path = safe_output_path(folder, name, ".safetensors")
    except TrainerInputError:
        return
    stem = os.path.basename(path)[: -len(".safetensors")]
    assert inside(folder, path)
    assert stem and not stem.startswith(".") and not stem.endswith((".", " "))
    assert not set(stem) & set('<>:"/\\|?*') and all(ord(c) >= 32 for c in stem)
    assert len(stem.encode("utf-8")) <= 150


# --- kohya LoRA files ------------------------------------------------------------------


def lora_state(rank=2):
    generator = torch.Generator().manual_seed(0)
    te = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    return {
        "lora_unet_a_proj_in.lora_down.weight": torch.randn(rank, 6, 1, 1, generator=generator).half(),
        "lora_unet_a_proj_in.lora_up.weight": torch.randn(10, rank, 1, 1, generator=generator).half(),
        "lora_unet_a_proj_in.alpha": torch.tensor(1.0).half(),
        f"{te}.lora_down.weight": torch.randn(rank, 5, generator=generator).half(),
        f"{te}.lora_up.weight": torch.randn(7, rank, generator=generator).half(),
        f"{te}.alpha": torch.tensor(1.0).half(),
    }


def test_lora_round_trip_keeps_tensors_and_string_metadata(tmp_path):
    state = lora_state()
    metadata = lora_metadata(output_name="cat", rank=2, alpha=1.0, steps=10, seed=42)
    path = tmp_path / "cat.safetensors"
    save_lora(path, state, metadata)
    loaded, loaded_metadata = load_lora(path)
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) and loaded[k].dtype == state[k].dtype for k in state)
    assert all(isinstance(v, str) for v in loaded_metadata.values())
    assert {k: loaded_metadata[k] for k in metadata} == metadata
    assert loaded_metadata["ss_steps"] == "10" and loaded_metadata["ss_seed"] == "42"
    assert os.listdir(tmp_path) == ["cat.safetensors"]


def test_sshs_model_hash_is_the_sha256_of_the_tensor_bytes_in_the_file(tmp_path):
    path = tmp_path / "cat.safetensors"
    save_lora(path, lora_state(), lora_metadata(output_name="cat", rank=2, alpha=1.0))
    data = path.read_bytes()
    header_size = int.from_bytes(data[:8], "little")
    _, metadata = load_lora(path)
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header_size:]).hexdigest()
    assert len(metadata["sshs_legacy_hash"]) == 8


def test_save_lora_refuses_to_overwrite(tmp_path):
    path = tmp_path / "cat.safetensors"
    save_lora(path, lora_state(), {})
    with pytest.raises(OutputExistsError):
        save_lora(path, lora_state(rank=3), {})
    assert load_lora(path)[0]["lora_unet_a_proj_in.lora_down.weight"].shape[0] == 2


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".PTH"])
def test_pickled_lora_files_are_refused_with_a_conversion_hint(tmp_path, suffix):
    path = tmp_path / f"old{suffix}"
    torch.save(lora_state(), path)
    with pytest.raises(TrainerInputError, match="safetensors"):
        load_lora(path)


def test_checkpoint_saved_as_safetensors_is_refused_as_not_a_lora(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, path)
    expected = "model.safetensors.*full Stable Diffusion checkpoint.*expected a kohya LoRA"
    with pytest.raises(TrainerInputError, match=expected):
        load_lora(path)


def test_corrupt_or_missing_lora_files_are_refused(tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(TrainerInputError, match="not a readable safetensors"):
        load_lora(broken)
    with pytest.raises(TrainerInputError, match="not found"):
        load_lora(tmp_path / "missing.safetensors")


def test_lora_without_up_weights_is_refused(tmp_path):
    path = tmp_path / "half.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(2, 3)}, path)
    with pytest.raises(TrainerInputError, match="incomplete"):
        load_lora(path)


@pytest.mark.parametrize(
    "keys, kind",
    [
        (["lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight", "lora_unet_x.alpha"], "kohya LoRA"),
        (["lora_unet_x.hada_w1_a"], "LyCORIS"),
        (["lora_unet_x.diff"], "LyCORIS"),
        (["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"], "diffusers/PEFT"),
        (["diffusion_model.input_blocks.1.1.proj_in.lora_up.weight"], "ComfyUI-format"),
        ([320, 768], "hypernetwork"),
        (["first_stage_model.decoder.conv_in.weight"], "checkpoint"),
    ],
)
def test_describe_state_dict_recognises_common_files(keys, kind):
    assert kind in describe_state_dict(keys)


def test_lora_metadata_has_kohya_keys_as_strings():
    metadata = lora_metadata(
        output_name="skkmtn",
        rank=8,
        alpha=4.0,
        base_model_name="v1-5.safetensors",
        base_model_hash="abcd1234",
        max_train_steps=1400,
        steps=700,
        learning_rate=1e-3,
        unet_lr=1e-3,
        text_encoder_lr=5e-5,
        num_train_images=20,
        tag_frequency={"skkmtn": 20, "girl": 18},
        dataset_dirs={"20_skkmtn": {"n_repeats": 20, "img_count": 20}},
        seed=1234,
        training_started_at=1700000000.5,
        trigger_phrase="skkmtn",
        extra={"ss_optimizer": "AdamW8bit"},
    )
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "8" and metadata["ss_network_alpha"] == "4.0"
    assert metadata["ss_resolution"] == "(512, 512)"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert metadata["ss_clip_skip"] == "None" and metadata["ss_seed"] == "1234"
    assert metadata["ss_sd_model_name"] == "v1-5.safetensors" and metadata["ss_sd_model_hash"] == "abcd1234"
    assert metadata["ss_training_started_at"] == "1700000000.5"
    assert json.loads(metadata["ss_tag_frequency"]) == {"20_skkmtn": {"skkmtn": 20, "girl": 18}}
    assert json.loads(metadata["ss_dataset_dirs"]) == {"20_skkmtn": {"n_repeats": 20, "img_count": 20}}
    assert metadata["ss_optimizer"] == "AdamW8bit"
    assert metadata["modelspec.sai_model_spec"] == "1.0.0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.title"] == "skkmtn" and metadata["modelspec.trigger_phrase"] == "skkmtn"
    assert metadata["modelspec.resolution"] == "512x512"


# --- training state --------------------------------------------------------------------


def test_training_state_round_trip(tmp_path):
    parameter = torch.nn.Parameter(torch.randn(3, 3))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3)
    parameter.sum().backward()
    optimizer.step()
    state = {
        "optimizer": optimizer.state_dict(),
        "step": 7,
        "python_rng": random.getstate(),
        "torch_rng": torch.get_rng_state(),
        "loss_history": [0.5, 0.25],
        "config": {"rank": 4, "learning_rate": 1e-3, "folder": "data"},
    }
    path = tmp_path / "run.state"
    save_training_state(path, state)
    loaded = load_training_state(path)
    assert loaded["step"] == 7 and loaded["loss_history"] == [0.5, 0.25] and loaded["config"] == state["config"]
    assert torch.equal(loaded["torch_rng"], state["torch_rng"])
    random.setstate(loaded["python_rng"])
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 3))], lr=1e-3)
    fresh.load_state_dict(loaded["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    save_training_state(path, {**state, "step": 8})
    assert load_training_state(path)["step"] == 8
    with pytest.raises(OutputExistsError):
        save_training_state(path, state, overwrite=False)


class NotAllowed:
    pass


@pytest.mark.parametrize(
    "payload",
    [{"step": 1}, [1, 2, 3], {"format": "sd1-trainer-state", "format_version": 99}, {"x": NotAllowed()}],
)
def test_foreign_files_are_not_training_states(tmp_path, payload):
    path = tmp_path / "foreign.pt"
    torch.save(payload, path)
    with pytest.raises(TrainerInputError, match="foreign.pt"):
        load_training_state(path)


def test_safetensors_file_is_not_a_training_state(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file(lora_state(), path)
    with pytest.raises(TrainerInputError, match="not a training state"):
        load_training_state(path)
