"""Choices made before the first step: the memory plan, "auto" gradient checkpointing, CPU threads
and precision; on the tiny built-in model."""
import dataclasses
import logging
import os
import platform
import re
import sys

import pytest
import torch

from trainer_core import memory_plan, runtime
from trainer_core.adapters.lora import LoRAConfig
from trainer_core.config import TrainConfig
from trainer_core.errors import TrainerInputError
from trainer_core.jobs import LoRAJob
from trainer_core.train import Callbacks, train_lora

MIB = 2 ** 20


def config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), output_name="run", steps=2, learning_rate=1e-3, seed=3, precision="fp32")
    values.update(overrides)
    return TrainConfig(**values)


def plan(parts, dataset, tmp_path, batch=1, resolution=64, checkpointing=False, optimizer="AdamW"):
    job = LoRAJob(parts, LoRAConfig(rank=4, alpha=4), config(tmp_path), dataset)
    return memory_plan.plan_memory(parts, job, batch, resolution, None, optimizer, checkpointing)


def test_estimate_grows_with_resolution_and_batch_and_shrinks_with_checkpointing(parts, dataset, tmp_path):
    small, large = plan(parts, dataset, tmp_path, resolution=64), plan(parts, dataset, tmp_path, resolution=128)
    batch = plan(parts, dataset, tmp_path, batch=4)
    assert 0 < small.added() < large.added() < 6 * small.added()
    # Activations grow in proportion to the pictures in the batch.
    assert batch.activations.kept == pytest.approx(4 * small.activations.kept, rel=0.2)
    for p in (small, large, batch):
        assert p.added(checkpointing=True) < p.added(checkpointing=False)
        assert p.peak() == p.in_use + p.adapter + p.kernel_workspace + p.activations.with_checkpointing(False)
    # Adam keeps two fp32 moments per trained weight besides the weight and its gradient.
    trained = sum(t.numel() for t in LoRAJob(parts, LoRAConfig(rank=4, alpha=4), config(tmp_path), dataset)
                  .module.parameters())
    assert small.adapter == trained * 16


def test_plan_is_logged_in_one_parsable_line_before_training(parts, dataset, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="trainer_core"):
        train_lora(parts, dataset, LoRAConfig(), config(tmp_path))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory plan:")]
    assert len(lines) == 1
    assert re.match(r"memory plan: estimated peak \d+ MiB \(.*gradient checkpointing off.*free on cpu: \d+ MiB\)$",
                    lines[0])


def _free(monkeypatch, nbytes):
    monkeypatch.setattr(memory_plan, "free_memory", lambda device: nbytes)


def test_auto_turns_checkpointing_on_only_when_the_run_would_not_fit_without_it(parts, dataset, tmp_path,
                                                                               monkeypatch, caplog):
    needs = plan(parts, dataset, tmp_path)
    between = (needs.added(True) + needs.added(False)) / 2 / memory_plan.USABLE_SHARE
    used = {}
    original = runtime.Runtime.gradient_checkpointing

    def record(self):
        used["checkpointing"] = original.fget(self)
        return used["checkpointing"]
    monkeypatch.setattr(runtime.Runtime, "gradient_checkpointing", property(record))
    _free(monkeypatch, int(between))
    with caplog.at_level(logging.INFO, logger="trainer_core"):
        train_lora(parts, dataset, LoRAConfig(), config(tmp_path, output_name="tight"))
    assert used["checkpointing"] is True
    assert "gradient checkpointing auto: on" in caplog.text

    _free(monkeypatch, 100 * needs.added(False))
    train_lora(parts, dataset, LoRAConfig(), config(tmp_path, output_name="roomy"))
    assert used["checkpointing"] is False


def test_a_run_that_cannot_fit_stops_before_training_naming_settings_that_fit(parts, dataset, tmp_path,
                                                                              monkeypatch):
    big = plan(parts, dataset, tmp_path, batch=4, resolution=128)
    # Enough for checkpointing, a smaller batch or a smaller picture, not for these settings as they are.
    big = dataclasses.replace(big, free=int(big.added(False) * 0.95 / memory_plan.USABLE_SHARE))
    monkeypatch.setattr(runtime, "plan_memory", lambda *a, **k: big)
    steps = []
    with pytest.raises(TrainerInputError) as refused:
        train_lora(parts, dataset, LoRAConfig(), config(tmp_path, gradient_checkpointing="off", batch_size=4),
                   callbacks=Callbacks(on_step=lambda s, t, l: steps.append(s)))
    message = str(refused.value)
    assert steps == [] and not os.path.exists(os.path.join(str(tmp_path), "run.safetensors"))
    assert "not enough memory" in message and "MiB" in message
    assert "gradient_checkpointing on" in message
    assert "batch_size 3" in message or "batch_size 2" in message or "batch_size 1" in message
    assert re.search(r"resolution \d+", message)


def test_checkpointing_setting_values_and_cache_key():
    assert [memory_plan.check_setting(v) for v in (True, False, "on", "off", "auto")] == \
        ["on", "off", "on", "off", "auto"]
    with pytest.raises(TrainerInputError, match="gradient_checkpointing"):
        TrainConfig(output_dir="x", gradient_checkpointing="sometimes").validate()
    # Explicit values key as the booleans did before "auto" existed: earlier files stay cache hits.
    assert TrainConfig(gradient_checkpointing="on").learning_key() == TrainConfig(gradient_checkpointing=True).learning_key()
    assert TrainConfig(gradient_checkpointing="off").learning_key()["gradient_checkpointing"] is False


def test_training_threads_are_chosen_by_timing_and_the_callers_setting_comes_back(parts, dataset, tmp_path,
                                                                                  monkeypatch, caplog):
    timings = {1: 0.010, 2: 0.030}  # as measured with one other busy process on 2 cores
    monkeypatch.setattr(runtime.UNetProbe, "compare",
                        lambda self, choices, latent, setup=None: {n: timings[n] for n in choices})
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []
    try:
        with caplog.at_level(logging.INFO, logger="trainer_core"):
            train_lora(parts, dataset, LoRAConfig(), config(tmp_path),
                       callbacks=Callbacks(on_step=lambda s, t, l: seen.append(torch.get_num_threads())))
        assert seen == [1, 1]
        assert torch.get_num_threads() == 2, "the caller's thread count is restored"
        assert re.search(r"training threads: 1 of 2 \(.*10 ms with 1, 30 ms with 2", caplog.text)
    finally:
        torch.set_num_threads(previous)


def test_precision_auto_on_a_cpu(monkeypatch, parts):
    cpu = torch.device("cpu")
    probe = runtime.UNetProbe(parts, 64)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(runtime.UNetProbe, "compare", lambda *a, **k: pytest.fail("no bf16 units: no timing"))
    assert runtime.resolve_precision("auto", cpu, probe) is None
    assert runtime.resolve_precision("bf16", cpu, probe) is None, "never the slow path"

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(runtime.UNetProbe, "compare", lambda *a, **k: {"fp32": 0.044, "bf16": 0.091})
    assert runtime.resolve_precision("auto", cpu, probe) is None, "the tiny model at 64 px: fp32 is faster"
    monkeypatch.setattr(runtime.UNetProbe, "compare", lambda *a, **k: {"fp32": 0.87, "bf16": 0.65})
    assert runtime.resolve_precision("auto", cpu, probe) == torch.bfloat16
    assert runtime.resolve_precision("auto", cpu, probe, resumed="float32") is None
    assert runtime.resolve_precision("fp16", cpu, probe) is None
    assert runtime.resolve_precision("fp32", cpu, probe) is None


def test_probe_times_the_real_unet_with_and_without_bf16(parts):
    times = runtime.UNetProbe(parts, 64).compare({"fp32": None, "bf16": torch.bfloat16}, 8)
    assert set(times) == {"fp32", "bf16"} and all(t > 0 for t in times.values())


def test_bf16_autocast_keeps_lora_weights_fp32_and_resume_keeps_the_choice(parts, dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(runtime.UNetProbe, "compare", lambda *a, **k: {"fp32": 1.0, "bf16": 0.5})
    full = train_lora(parts, dataset, LoRAConfig(), config(tmp_path, output_name="full", precision="auto", steps=4,
                                                           save_every_steps=2))
    assert {t.dtype for t in full.kohya_state_dict.values()} == {torch.float32}
    assert all(p.dtype == torch.float32 for p in full.adapter.parameters())
    # The resumed run must not time again and pick otherwise: it continues bit for bit.
    monkeypatch.setattr(runtime.UNetProbe, "compare", lambda *a, **k: {"fp32": 0.5, "bf16": 1.0})
    resumed = train_lora(parts, dataset, LoRAConfig(), config(
        tmp_path, output_name="resumed", precision="auto", steps=4,
        resume_from=os.path.join(str(tmp_path), "full_2.safetensors")))
    assert resumed.losses == full.losses
    for key, tensor in full.kohya_state_dict.items():
        assert torch.equal(tensor, resumed.kohya_state_dict[key]), key


def test_the_probe_recomputes_every_block_as_checkpointing_does_and_leaves_the_unet_as_it_was(parts, monkeypatch):
    # Its bf16 pass would otherwise keep a bf16 copy of every weight for its backward pass.
    recomputed = []
    original = memory_plan.checkpoint

    def recording(function, *args, **kwargs):
        recomputed.append(function)
        return original(function, *args, **kwargs)
    monkeypatch.setattr(memory_plan, "checkpoint", recording)
    blocks = memory_plan.checkpointed_blocks(parts.unet)
    runtime.UNetProbe(parts, 64).compare({"fp32": None}, 8)
    passes = runtime.PROBE_REPEATS + 1
    assert blocks and len(recomputed) == passes * len(blocks)
    assert not any("forward" in vars(block) for block in blocks), "the blocks' own forward is back"


def test_freed_memory_is_handed_back_after_the_probes_the_plan_and_each_new_encode(parts, dataset, tmp_path,
                                                                                 monkeypatch):
    from trainer_core import train
    events = []
    monkeypatch.setattr(runtime, "release_freed_memory", lambda: events.append("release"))
    monkeypatch.setattr(train, "release_freed_memory", lambda: events.append("release after encoding"))
    plan_memory = runtime.plan_memory
    monkeypatch.setattr(runtime, "plan_memory", lambda *a, **k: events.append("plan") or plan_memory(*a, **k))
    encode = parts.encode_images

    def recording(pixels, generator=None):
        events.append("encode")
        return encode(pixels, generator)
    steps = len(dataset) + 2
    train_lora(dataclasses.replace(parts, encode_images=recording), dataset, LoRAConfig(),
               config(tmp_path, steps=steps),
               callbacks=Callbacks(on_step=lambda s, t, l: events.append("step")))
    assert events[:3] == ["release", "plan", "release"]
    steps_events, current = [], []
    for event in events[3:]:
        if event == "step":
            steps_events.append(current)
            current = []
        else:
            current.append(event)
    # Each picture is encoded once (latent_sampling "once") and that step releases afterwards; later steps
    # encode nothing and release nothing.
    assert steps_events[:len(dataset)] == [["encode", "release after encoding"]] * len(dataset)
    assert steps_events[len(dataset):] == [[]] * (steps - len(dataset))


def test_release_freed_memory_trims_glibc_and_does_nothing_elsewhere(monkeypatch):
    trimmed = []
    find_trim = memory_plan._malloc_trim.__wrapped__
    monkeypatch.setattr(memory_plan, "_malloc_trim", lambda: lambda pad: trimmed.append(pad))
    assert memory_plan.release_freed_memory() is True and trimmed == [0]
    monkeypatch.setattr(memory_plan, "_malloc_trim", lambda: None)
    assert memory_plan.release_freed_memory() is False
    monkeypatch.setattr(memory_plan.sys, "platform", "darwin")
    assert find_trim() is None


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                    reason="malloc_trim is glibc's")
def test_release_freed_memory_runs_on_linux_with_glibc():
    assert memory_plan.release_freed_memory() is True


def test_checkpointing_recomputes_whole_transformers_and_resnets_or_the_blocks_of_unknown_transformers(parts):
    blocks = memory_plan.checkpointed_blocks(parts.unet)
    kinds = {type(block).__name__ for block in blocks}
    assert kinds == {"Transformer2DModel", "ResnetBlock2D"}
    # A transformer is recomputed as a whole: its proj_in / proj_out (LoRA targets) with it, nothing twice.
    inside = {id(m) for block in blocks for m in block.modules() if m is not block}
    assert not inside & {id(block) for block in blocks}
    assert len(blocks) == sum(type(m).__name__ in kinds for m in parts.unet.modules())

    class OtherTransformer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj_in = torch.nn.Linear(4, 4)
            self.transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
    other = torch.nn.Sequential(OtherTransformer())
    assert memory_plan.checkpointed_blocks(other) == list(other[0].transformer_blocks)


class FakeMallopt:
    """glibc's mallopt, recording the mmap threshold it is given."""

    def __init__(self):
        self.thresholds = []

    def __call__(self, parameter, value):
        assert parameter == memory_plan.M_MMAP_THRESHOLD
        self.thresholds.append(value)
        return 1


def _fake_glibc(monkeypatch):
    mallopt, trimmed = FakeMallopt(), []
    monkeypatch.setattr(memory_plan, "_glibc_function", lambda name: mallopt if name == "mallopt" else None)
    monkeypatch.setattr(memory_plan, "release_freed_memory", lambda: trimmed.append(True))
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    return mallopt, trimmed


def test_freed_memory_return_sets_the_mmap_threshold_for_the_run_and_puts_glibcs_maximum_back(monkeypatch):
    mallopt, trimmed = _fake_glibc(monkeypatch)
    with memory_plan.FreedMemoryReturn(torch.device("cpu")) as returning:
        assert returning.active and mallopt.thresholds == [4 << 20]
    assert mallopt.thresholds == [4 << 20, 32 << 20] and trimmed == [True] and not returning.active
    with memory_plan.FreedMemoryReturn(torch.device("cuda")) as returning:
        assert not returning.active
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    with memory_plan.FreedMemoryReturn(torch.device("cpu")) as returning:
        assert not returning.active, "the user's own malloc setting is left alone"
    assert mallopt.thresholds == [4 << 20, 32 << 20]


@pytest.mark.parametrize("checkpointing", ["on", "off"])
def test_a_checkpointing_cpu_run_trains_with_freed_memory_returned_and_others_without(parts, dataset, tmp_path,
                                                                                     monkeypatch, checkpointing):
    mallopt, _ = _fake_glibc(monkeypatch)
    during_steps = []
    train_lora(parts, dataset, LoRAConfig(), config(tmp_path, gradient_checkpointing=checkpointing),
               callbacks=Callbacks(on_step=lambda s, t, l: during_steps.append(mallopt.thresholds[-1])))
    expected = (4 << 20) if checkpointing == "on" else (32 << 20)
    assert during_steps == [expected, expected]
    assert mallopt.thresholds == [4 << 20, 32 << 20], "set before the probes, glibc's maximum after"
