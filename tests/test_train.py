"""The training loop on the tiny built-in model: resume, cache, faults, precision, callbacks."""
import glob
import logging
import dataclasses
import os

import pytest
import torch

from trainer_core.adapters.lora import LoRAConfig
from trainer_core.adapters.hypernetwork import HypernetworkConfig
from trainer_core.config import TrainConfig
from trainer_core.dataset import regularization_set
from trainer_core.errors import TrainerInputError, TrainingCancelled, TrainingStopped
from trainer_core.formats import load_lora
from trainer_core.jobs import HypernetworkJob, LoRAJob, TrainingJob
from trainer_core.train import Callbacks, train_hypernetwork, train_lora



def config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), output_name="run", steps=4, learning_rate=1e-3, seed=3)
    values.update(overrides)
    return TrainConfig(**values)


def unet_output(parts, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 4, 8, 8), generator=g)
    context = parts.encode_text(["skkmtn"])
    with torch.no_grad():
        return parts.predict_noise(x, torch.tensor([500]), context)


def test_training_writes_final_file_with_the_returned_state_dict(parts, dataset, tmp_path):
    result = train_lora(parts, dataset, LoRAConfig(), config(tmp_path))
    assert result.final_path == os.path.join(str(tmp_path), "run.safetensors")
    on_disk, metadata = load_lora(result.final_path)
    assert set(on_disk) == set(result.kohya_state_dict)
    for key, tensor in on_disk.items():
        assert torch.equal(tensor, result.kohya_state_dict[key]), key
    assert metadata["ss_steps"] == "4"
    assert [s for s, _ in result.losses] == [1, 2, 3, 4]
    up = [t for k, t in on_disk.items() if k.endswith("lora_up.weight")]
    assert any(t.abs().max() > 0 for t in up), "the LoRA did not change from its zero init"


def test_base_model_is_bit_identical_after_training(parts, dataset, tmp_path):
    before = unet_output(parts)
    train_lora(parts, dataset, LoRAConfig(train_text_encoder=True), config(tmp_path, steps=2))
    assert torch.equal(before, unet_output(parts))


@pytest.mark.parametrize("latent_sampling", ["once", "random"])
def test_resume_from_intermediate_save_matches_uninterrupted_run(parts, dataset, tmp_path, latent_sampling):
    full = train_lora(parts, dataset, LoRAConfig(dropout=0.1),
                      config(tmp_path, output_name="full", steps=6, save_every_steps=3,
                             latent_sampling=latent_sampling))
    assert os.path.basename(full.saved_paths[0]) == "full_3.safetensors"
    resumed = train_lora(parts, dataset, LoRAConfig(dropout=0.1),
                         config(tmp_path, output_name="resumed", steps=6, latent_sampling=latent_sampling,
                                resume_from=os.path.join(str(tmp_path), "full_3.safetensors")))
    assert resumed.losses == full.losses, "the loss curve must continue where it stopped"
    for key, tensor in full.kohya_state_dict.items():
        assert torch.equal(tensor, resumed.kohya_state_dict[key]), key


def test_once_encodes_each_picture_to_the_mean_one_time_and_random_draws_every_step(parts, dataset, tmp_path):
    calls = []
    encode = parts.encode_images

    def recording(pixels, generator=None):
        calls.append(generator)
        return encode(pixels, generator)
    counted = dataclasses.replace(parts, encode_images=recording)
    train_lora(counted, dataset, LoRAConfig(), config(tmp_path, output_name="once", steps=2 * len(dataset)))
    assert len(calls) == len(dataset) and calls == [None] * len(dataset)
    calls.clear()
    train_lora(counted, dataset, LoRAConfig(), config(tmp_path, output_name="random", steps=2 * len(dataset),
                                                      latent_sampling="random"))
    assert len(calls) == 2 * len(dataset) and all(isinstance(g, torch.Generator) for g in calls)


def test_requeue_with_same_settings_trains_nothing(parts, dataset, tmp_path):
    first = train_lora(parts, dataset, LoRAConfig(), config(tmp_path))
    steps = []
    again = train_lora(parts, dataset, LoRAConfig(), config(tmp_path),
                       callbacks=Callbacks(on_step=lambda s, t, l: steps.append(s)))
    assert again.from_cache and steps == []
    assert again.losses == first.losses
    for key, tensor in first.kohya_state_dict.items():
        assert torch.equal(tensor, again.kohya_state_dict[key])
    forced = train_lora(parts, dataset, LoRAConfig(), config(tmp_path, force_retrain=True),
                        callbacks=Callbacks(on_step=lambda s, t, l: steps.append(s)))
    assert not forced.from_cache and steps == [1, 2, 3, 4]


def test_existing_file_from_other_settings_is_not_overwritten(parts, dataset, tmp_path):
    train_lora(parts, dataset, LoRAConfig(), config(tmp_path))
    before = open(os.path.join(str(tmp_path), "run.safetensors"), "rb").read()
    with pytest.raises(TrainerInputError, match="overwrite"):
        train_lora(parts, dataset, LoRAConfig(rank=2, alpha=2), config(tmp_path))
    assert open(os.path.join(str(tmp_path), "run.safetensors"), "rb").read() == before
    result = train_lora(parts, dataset, LoRAConfig(rank=2, alpha=2), config(tmp_path, overwrite=True))
    assert result.kohya_state_dict[next(k for k in result.kohya_state_dict if "lora_down" in k)].shape[0] == 2


def test_nan_loss_stops_with_step_and_keeps_last_good_save(parts, dataset, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = parts.predict_noise

    def poisoned(x, t, c):
        calls["n"] += 1
        out = original(x, t, c)
        return out * float("nan") if calls["n"] > 4 else out

    monkeypatch.setattr(parts, "predict_noise", poisoned)
    with pytest.raises(TrainingStopped, match=r"step 5.*learning_rate") as stopped:
        train_lora(parts, dataset, LoRAConfig(), config(tmp_path, steps=8, save_every_steps=2))
    assert stopped.value.last_save.endswith("run_4.safetensors")
    load_lora(stopped.value.last_save)
    assert not os.path.exists(os.path.join(str(tmp_path), "run.safetensors"))
    assert not glob.glob(os.path.join(str(tmp_path), "*.tmp")) + glob.glob(os.path.join(str(tmp_path), ".*.tmp"))


def test_cancel_stops_within_a_step_and_leaves_valid_saves(parts, dataset, tmp_path):
    seen = []
    callbacks = Callbacks(on_step=lambda s, t, l: seen.append(s), should_stop=lambda: len(seen) >= 5)
    with pytest.raises(TrainingCancelled) as cancelled:
        train_lora(parts, dataset, LoRAConfig(), config(tmp_path, steps=10, save_every_steps=2), callbacks=callbacks)
    assert seen == [1, 2, 3, 4, 5]
    assert cancelled.value.last_save.endswith("run_4.safetensors")
    names = sorted(os.listdir(tmp_path))
    assert [n for n in names if n.endswith(".safetensors")] == ["run_2.safetensors", "run_4.safetensors"]
    assert not [n for n in names if n.endswith(".tmp")]


def test_regularization_images_add_a_prior_loss(parts, dataset, tmp_path):
    reg = regularization_set(class_prompt="orange creature", blank_count=4, resolution=64, prior_loss_weight=1.0)
    plain = train_lora(parts, dataset, LoRAConfig(), config(tmp_path, output_name="plain", steps=2))
    with_reg = train_lora(parts, dataset, LoRAConfig(), config(tmp_path, output_name="reg", steps=2),
                          regularization=reg)
    assert with_reg.losses[0][1] > plain.losses[0][1], "the prior loss is added to the instance loss"


def test_regularization_pictures_follow_the_dataset_resolution_by_default(parts, dataset, tmp_path, monkeypatch):
    sizes, encode = [], parts.encode_images

    def recording(pixels, generator=None):
        sizes.append(tuple(pixels.shape[-2:]))
        return encode(pixels, generator)

    monkeypatch.setattr(parts, "encode_images", recording)
    reg = regularization_set(class_prompt="orange creature", blank_count=2)  # resolution not given
    train_lora(parts, dataset, LoRAConfig(), config(tmp_path, steps=2), regularization=reg)
    resolution = dataset.config.resolution
    assert sizes and set(sizes) == {(resolution, resolution)}, "the class pictures at the dataset's size"


def test_gradient_accumulation_and_checkpointing_train(parts, dataset, tmp_path):
    plain = train_lora(parts, dataset, LoRAConfig(), config(tmp_path, output_name="plain", steps=2))
    checkpointed = train_lora(parts, dataset, LoRAConfig(),
                              config(tmp_path, output_name="ckpt", steps=2, gradient_checkpointing=True))
    for key, tensor in plain.kohya_state_dict.items():
        assert torch.allclose(tensor, checkpointed.kohya_state_dict[key], atol=1e-6), key
    accumulated = train_lora(parts, dataset, LoRAConfig(),
                             config(tmp_path, output_name="acc", steps=2, gradient_accumulation=3))
    assert len(accumulated.losses) == 2


def test_half_precision_on_cpu_falls_back_to_fp32(parts, dataset, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        result = train_lora(parts, dataset, LoRAConfig(), config(tmp_path, steps=1, precision="fp16",
                                                                  optimizer="AdamW8bit"))
    assert "fp32" in caplog.text and "AdamW" in caplog.text
    assert all(t.dtype == torch.float32 for t in result.kohya_state_dict.values())


@pytest.mark.parametrize("field,value,match", [
    ("steps", 0, "steps"), ("steps", -3, "steps"), ("learning_rate", 0.0, "learning_rate"),
    ("learning_rate", -1e-3, "learning_rate"), ("learning_rate", float("nan"), "learning_rate"),
    ("batch_size", 99, "batch_size"), ("optimizer", "SGD", "optimizer"),
])
def test_bad_options_name_the_field(parts, dataset, tmp_path, field, value, match):
    with pytest.raises(TrainerInputError, match=match):
        train_lora(parts, dataset, LoRAConfig(), config(tmp_path, **{field: value}))
    assert os.listdir(tmp_path) == []


def test_save_interval_zero_writes_only_the_final_file(parts, dataset, tmp_path):
    result = train_lora(parts, dataset, LoRAConfig(), config(tmp_path, steps=3, save_every_steps=0, loss_csv=True))
    assert [os.path.basename(p) for p in result.saved_paths] == ["run.safetensors"]
    assert open(os.path.join(str(tmp_path), "run_loss.csv")).read().startswith("step,loss\n1,")


def test_preview_callback_gets_a_loss_chart(parts, dataset, tmp_path):
    previews = []
    train_lora(parts, dataset, LoRAConfig(), config(tmp_path, steps=2, sample_every_steps=2),
               callbacks=Callbacks(on_preview=lambda step, image: previews.append((step, image))))
    assert previews and previews[-1][0] == 2
    assert previews[-1][1].width > 512, "the sample image sits beside the loss chart"


def test_hypernetwork_training_warns_about_a_lora_sized_learning_rate(parts, dataset, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        train_hypernetwork(parts, dataset, HypernetworkConfig(), config(tmp_path, steps=1, learning_rate=1e-5))
    assert "learning_rate" not in caplog.text
    with caplog.at_level(logging.WARNING):
        train_hypernetwork(parts, dataset, HypernetworkConfig(),
                           config(tmp_path, output_name="high", steps=1, learning_rate=1e-3))
    assert "learning_rate 0.001 is high" in caplog.text


@pytest.mark.parametrize("job_class, adapter_config", [(LoRAJob, LoRAConfig()), (HypernetworkJob, HypernetworkConfig())])
def test_each_job_follows_the_training_job_contract(parts, dataset, tmp_path, job_class, adapter_config):
    job = job_class(parts, adapter_config, config(tmp_path), dataset)
    assert isinstance(job, TrainingJob)
    assert job.output_path("x") == os.path.join(str(tmp_path), "x" + job.suffix)
    assert isinstance(job.describe(), dict) and job.param_groups()
