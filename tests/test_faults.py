"""Bad input, faults and safety at the trainer_core level: every failure gives an error that
names the file or field and the fix, no file is lost or left half-written, and no file we read
can run code.

Cases already proven elsewhere are not repeated here: image modes, broken images, captions and
dataset options (test_dataset.py), output-name cleaning and atomic writes (test_formats.py),
wrong LoRA files (test_lora.py), wrong hypernetwork files (test_hypernetwork.py), checkpoints
that are not SD1.x (test_backend_diffusers.py), NaN loss, cancel and bad training options
(test_train.py).
"""
import errno
import glob
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from trainer_core import formats
from trainer_core.adapters.hypernetwork import Hypernetwork, HypernetworkConfig, load_hypernetwork
from trainer_core.adapters.lora import LoRAConfig
from trainer_core.backends.diffusers import load_parts
from trainer_core.config import TrainConfig
from trainer_core.dataset import DatasetConfig, ImageDataset
from trainer_core.errors import TrainerInputError, TrainingCancelled, TrainingStopped
from trainer_core.formats import load_lora, load_training_state
from trainer_core.train import Callbacks, train_hypernetwork, train_lora

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(REPO, "sample_dataset")
HYPERNET_LR = 1e-5  # A1111's default; higher rates only add a warning to the log


@pytest.fixture(scope="module")
def saved(parts, dataset, tmp_path_factory):
    """A LoRA (rank 4, alpha 4, AdamW) and a hypernetwork ("1,2,1", mish) saved by 2-step runs."""
    folder = tmp_path_factory.mktemp("saved")
    lora = train_lora(parts, dataset, LoRAConfig(rank=4, alpha=4), config(folder, output_name="lora", steps=2))
    hypernet = train_hypernetwork(parts, dataset, HypernetworkConfig(layer_structure="1,2,1"),
                                  config(folder, output_name="hypernet", steps=2, learning_rate=HYPERNET_LR))
    return {"lora": lora.final_path, "hypernetwork": hypernet.final_path}


def config(folder, **overrides):
    values = dict(output_dir=str(folder), output_name="run", steps=4, learning_rate=1e-3, seed=3)
    values.update(overrides)
    return TrainConfig(**values)


def temp_files(folder):
    return glob.glob(os.path.join(str(folder), "*.tmp")) + glob.glob(os.path.join(str(folder), ".*.tmp"))


def saved_names(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith((".safetensors", ".pt")))


def unet_output(parts):
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return parts.predict_noise(x, torch.tensor([500]), parts.encode_text(["skkmtn"]))


# --- dataset ---------------------------------------------------------------------------------


def test_empty_folder_says_there_are_no_images(tmp_path):
    with pytest.raises(TrainerInputError, match="no images in") as error:
        ImageDataset.from_folder(DatasetConfig(folder=str(tmp_path), instance_token="skkmtn", resolution=64))
    assert str(tmp_path) in str(error.value)


def test_image_broken_after_the_folder_was_read_stops_training_naming_it(parts, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(SAMPLES, data)
    dataset = ImageDataset.from_folder(DatasetConfig(folder=str(data), instance_token="skkmtn", resolution=64))
    (data / "skkmtn_03.png").write_bytes(b"")  # every image is used within the first 5 steps
    with pytest.raises(TrainerInputError, match="skkmtn_03.png"):
        train_lora(parts, dataset, LoRAConfig(), config(out, steps=10, save_every_steps=2))
    assert not (out / "run.safetensors").exists()
    for name in saved_names(out):
        load_lora(out / name)
    assert not temp_files(out)


# --- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter, options, field", [
    ("lora", {"rank": 4096}, "rank"),
    ("hypernetwork", {"layer_structure": "2,1"}, "layer_structure"),
    ("hypernetwork", {"layer_structure": "1,2,2"}, "layer_structure"),
])
def test_adapter_options_that_do_not_fit_are_refused_before_any_file(parts, dataset, tmp_path, adapter, options,
                                                                      field):
    with pytest.raises(TrainerInputError, match=field):
        if adapter == "lora":
            train_lora(parts, dataset, LoRAConfig(**options), config(tmp_path))
        else:
            train_hypernetwork(parts, dataset, HypernetworkConfig(**options),
                               config(tmp_path, learning_rate=HYPERNET_LR))
    assert os.listdir(tmp_path) == []


# --- names and paths -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../escape", "/etc/evil", "sub/dir\\name", 'a:b*?"<>|', "..\\..\\up"])
def test_output_name_with_path_parts_writes_only_inside_the_output_folder(parts, dataset, tmp_path, name):
    out = tmp_path / "out"
    result = train_lora(parts, dataset, LoRAConfig(), config(out, output_name=name, steps=2, save_every_steps=1))
    assert os.listdir(tmp_path) == ["out"]
    assert all(os.path.dirname(path) == str(out) for path in result.saved_paths)
    assert len(saved_names(out)) == 2  # the step-1 save and the final file


def test_existing_file_where_an_intermediate_save_goes_is_refused_before_training(parts, dataset, tmp_path):
    (tmp_path / "run_2.safetensors").write_bytes(b"the user's own file")
    steps = []
    with pytest.raises(TrainerInputError, match="run_2.safetensors.*overwrite"):
        train_lora(parts, dataset, LoRAConfig(), config(tmp_path, steps=4, save_every_steps=2),
                   callbacks=Callbacks(on_step=lambda s, t, l: steps.append(s)))
    assert steps == []
    assert os.listdir(tmp_path) == ["run_2.safetensors"]
    assert (tmp_path / "run_2.safetensors").read_bytes() == b"the user's own file"


def test_existing_hypernetwork_from_elsewhere_is_not_overwritten(parts, dataset, tmp_path):
    foreign = Hypernetwork([32], HypernetworkConfig(layer_structure="1,2,1")).to_a1111("theirs", 900)
    torch.save(foreign, tmp_path / "run.pt")
    before = (tmp_path / "run.pt").read_bytes()
    with pytest.raises(TrainerInputError, match="run.pt.*overwrite"):
        train_hypernetwork(parts, dataset, HypernetworkConfig(), config(tmp_path, learning_rate=HYPERNET_LR))
    assert (tmp_path / "run.pt").read_bytes() == before
    assert os.listdir(tmp_path) == ["run.pt"]


# --- models ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, payload", [
    ("hypernetwork", lambda: Hypernetwork([32], HypernetworkConfig(layer_structure="1,2,1")).to_a1111("h", 1)),
    ("embedding", lambda: {"string_to_param": {"*": torch.zeros(2, 768)}, "name": "x", "step": 1}),
])
def test_adapter_file_given_as_the_model_is_refused_naming_what_it_is(tmp_path, kind, payload):
    path = tmp_path / f"{kind}.pt"
    torch.save(payload(), path)
    with pytest.raises(TrainerInputError, match=kind) as error:
        load_parts(str(path))
    assert str(path) in str(error.value)


# --- files we read: no code runs ----------------------------------------------------------------


class RunsCodeWhenUnpickled:
    """A pickle that runs a shell command when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def write_malicious(path, marker):
    torch.save({"step": 1, "payload": RunsCodeWhenUnpickled(marker)}, str(path))


def test_the_malicious_payload_really_runs_under_an_unsafe_load(tmp_path):
    # Proves the safety tests below would notice if a loader ran pickled code.
    marker = tmp_path / "ran"
    write_malicious(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def _train_lora_from(parts, dataset, out, resume):
    return train_lora(parts, dataset, LoRAConfig(), config(out, output_name="next", steps=4, resume_from=str(resume)))


def _copy_save(source, folder):
    folder.mkdir(exist_ok=True)
    for path in glob.glob(source + "*"):
        shutil.copy(path, folder)
    return folder / os.path.basename(source)


MALICIOUS_CASES = ["hypernetwork_file", "hypernetwork_resume", "lora_resume_pt", "trainstate_of_resume",
                   "trainstate_beside_output", "optimizer_sidecar", "model_ckpt"]


@pytest.mark.parametrize("case", MALICIOUS_CASES)
def test_malicious_pickle_never_runs(parts, dataset, saved, tmp_path, case):
    marker, out, evil = tmp_path / "ran", tmp_path / "out", tmp_path / "evil.pt"
    write_malicious(evil, marker)
    if case == "hypernetwork_file":
        with pytest.raises(TrainerInputError, match="evil.pt"):
            load_hypernetwork(evil)
    elif case == "hypernetwork_resume":
        with pytest.raises(TrainerInputError, match="evil.pt"):
            train_hypernetwork(parts, dataset, HypernetworkConfig(layer_structure="1,2,1"),
                               config(out, learning_rate=HYPERNET_LR, resume_from=str(evil)))
    elif case == "lora_resume_pt":
        with pytest.raises(TrainerInputError, match="evil.pt"):
            _train_lora_from(parts, dataset, out, evil)
    elif case == "trainstate_of_resume":
        resume = _copy_save(saved["lora"], tmp_path / "old")
        write_malicious(str(resume) + ".trainstate", marker)
        with pytest.raises(TrainerInputError, match="trainstate"):
            _train_lora_from(parts, dataset, out, resume)
    elif case == "trainstate_beside_output":
        existing = _copy_save(saved["lora"], out)
        write_malicious(str(existing) + ".trainstate", marker)
        with pytest.raises(TrainerInputError, match="trainstate"):
            train_lora(parts, dataset, LoRAConfig(rank=4, alpha=4), config(out, output_name="lora", steps=2))
    elif case == "optimizer_sidecar":
        # An A1111 hypernetwork: no .trainstate, so its `.optim` sidecar is read; it must be ignored.
        resume = _copy_save(saved["hypernetwork"], tmp_path / "old")
        os.remove(str(resume) + ".trainstate")
        write_malicious(str(resume) + ".optim", marker)
        result = train_hypernetwork(parts, dataset, HypernetworkConfig(layer_structure="1,2,1"),
                                    config(out, learning_rate=HYPERNET_LR, resume_from=str(resume)))
        assert result.losses[0][0] == 3, "resumed after the file's step 2 with a fresh optimizer"
    else:
        shutil.copy(evil, tmp_path / "model.ckpt")
        with pytest.raises(TrainerInputError, match="safetensors"):
            load_parts(str(tmp_path / "model.ckpt"))
    assert not marker.exists(), "loading the file ran code from it"
    assert not [n for n in (os.listdir(out) if out.exists() else []) if n.startswith("next")]


# --- files we read: the wrong kind ----------------------------------------------------------------


def test_lora_file_as_hypernetwork_resume_says_what_it_is(parts, dataset, saved, tmp_path):
    with pytest.raises(TrainerInputError, match="is a LoRA"):
        train_hypernetwork(parts, dataset, HypernetworkConfig(layer_structure="1,2,1"),
                           config(tmp_path, learning_rate=HYPERNET_LR, resume_from=saved["lora"]))
    assert os.listdir(tmp_path) == []


def test_training_state_file_as_lora_resume_is_refused_naming_it(parts, dataset, saved, tmp_path):
    with pytest.raises(TrainerInputError, match=r"lora\.safetensors\.trainstate"):
        _train_lora_from(parts, dataset, tmp_path, saved["lora"] + ".trainstate")
    assert os.listdir(tmp_path) == []


def test_lora_resume_with_another_rank_names_both_ranks(parts, dataset, saved, tmp_path):
    with pytest.raises(TrainerInputError, match="rank 4 but this network has rank 2"):
        train_lora(parts, dataset, LoRAConfig(rank=2, alpha=2), config(tmp_path, resume_from=saved["lora"]))
    assert os.listdir(tmp_path) == []



def test_hypernetwork_file_as_lora_resume_says_it_is_a_hypernetwork(parts, dataset, saved, tmp_path):
    with pytest.raises(TrainerInputError, match="hypernetwork"):
        _train_lora_from(parts, dataset, tmp_path, saved["hypernetwork"])



def test_hypernetwork_resume_with_another_layer_structure_names_it(parts, dataset, saved, tmp_path):
    with pytest.raises(TrainerInputError, match="layer_structure"):
        train_hypernetwork(parts, dataset, HypernetworkConfig(layer_structure="1,3,1"),
                           config(tmp_path, learning_rate=HYPERNET_LR, resume_from=saved["hypernetwork"]))
    assert os.listdir(tmp_path) == []



def test_hypernetwork_resume_with_another_activation_names_it(parts, dataset, saved, tmp_path):
    with pytest.raises(TrainerInputError, match="activation"):
        train_hypernetwork(parts, dataset, HypernetworkConfig(layer_structure="1,2,1", activation="relu"),
                           config(tmp_path, learning_rate=HYPERNET_LR, resume_from=saved["hypernetwork"]))



def test_lora_resume_with_another_alpha_names_it(parts, dataset, saved, tmp_path):
    with pytest.raises(TrainerInputError, match="alpha"):
        train_lora(parts, dataset, LoRAConfig(rank=4, alpha=1), config(tmp_path, resume_from=saved["lora"]))



def test_resume_with_another_optimizer_names_it_or_starts_the_optimizer_fresh(parts, dataset, saved, tmp_path):
    try:
        result = train_lora(parts, dataset, LoRAConfig(rank=4, alpha=4),
                            config(tmp_path, optimizer="Prodigy", resume_from=saved["lora"]))
    except TrainerInputError as error:
        assert "optimizer" in str(error)
    else:
        assert result.losses[-1][0] == 4


# --- faults during training --------------------------------------------------------------------


def test_out_of_memory_stops_with_memory_saving_options_and_the_last_save(parts, dataset, tmp_path, monkeypatch):
    calls, real = [], parts.predict_noise

    def predict_noise(x, t, context):
        # Training steps only: the memory plan (fake tensors) and the CPU timing probe
        # (input with gradients) run the UNet before the first step.
        if type(x) is torch.Tensor and not x.requires_grad:
            calls.append(1)
        if len(calls) == 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(x, t, context)

    monkeypatch.setattr(parts, "predict_noise", predict_noise)
    with pytest.raises(TrainingStopped) as stopped:
        train_lora(parts, dataset, LoRAConfig(), config(tmp_path, steps=8, save_every_steps=2))
    message = str(stopped.value)
    assert "out of memory at step 5" in message
    for option in ("batch_size", "resolution", "gradient_checkpointing", "AdamW8bit", "rank"):
        assert option in message
    assert stopped.value.last_save == str(tmp_path / "run_4.safetensors") and "run_4.safetensors" in message
    assert not isinstance(stopped.value, TrainingCancelled)
    load_lora(stopped.value.last_save)
    assert saved_names(tmp_path) == ["run_2.safetensors", "run_4.safetensors"]
    assert not temp_files(tmp_path)


def fail_lora_write(monkeypatch, at_call, error):
    """The `at_call`-th LoRA file write leaves half a temp file and raises `error`."""
    import safetensors.torch
    real, calls = safetensors.torch.save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == at_call:
            with open(filename, "wb") as f:
                f.write(b"half a file")
            raise error
        return real(tensors, filename, metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def assert_intact_save(path, step):
    load_lora(path)
    assert load_training_state(str(path) + ".trainstate")["step"] == step


def test_disk_full_during_a_save_keeps_the_previous_save_and_says_what_to_do(parts, dataset, tmp_path, monkeypatch):
    fail_lora_write(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(TrainingStopped) as stopped:
        train_lora(parts, dataset, LoRAConfig(), config(tmp_path, steps=6, save_every_steps=2))
    message = str(stopped.value)
    assert "run_4.safetensors" in message and "Free disk space" in message and "resume" in message
    assert stopped.value.last_save == str(tmp_path / "run_2.safetensors") and "run_2.safetensors" in message
    assert_intact_save(tmp_path / "run_2.safetensors", 2)
    assert saved_names(tmp_path) == ["run_2.safetensors"]
    assert not temp_files(tmp_path)
def test_disk_full_while_writing_the_training_state_does_not_block_the_resume(parts, dataset, tmp_path,
                                                                               monkeypatch):
    real, calls = torch.save, []

    def save(obj, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:  # the training state of the step-4 save
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, filename, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", save)
        with pytest.raises(TrainingStopped):
            train_lora(parts, dataset, LoRAConfig(), config(tmp_path, steps=6, save_every_steps=2))
    assert not temp_files(tmp_path)
    result = train_lora(parts, dataset, LoRAConfig(),
                        config(tmp_path, steps=6, save_every_steps=2,
                               resume_from=str(tmp_path / "run_2.safetensors")))
    assert [s for s, _ in result.losses] == list(range(1, 7))


def make_read_only(monkeypatch, folder):
    """chmod 0o555, plus a refusing temp-file maker when running as root (root ignores the mode)."""
    os.chmod(folder, 0o555)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        def refuse(where, name):
            raise PermissionError(errno.EACCES, "Permission denied", os.path.join(where, name))
        monkeypatch.setattr(formats, "_new_temp_file", refuse)


def test_folder_turning_read_only_mid_run_keeps_the_previous_save(parts, dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def on_step(step, total, loss):
        if step == 3:
            make_read_only(monkeypatch, out)

    try:
        with pytest.raises(TrainingStopped) as stopped:
            train_lora(parts, dataset, LoRAConfig(), config(out, steps=6, save_every_steps=2),
                       callbacks=Callbacks(on_step=on_step))
    finally:
        os.chmod(out, 0o755)
    message = str(stopped.value)
    assert "run_4.safetensors" in message and "writable" in message and "run_2.safetensors" in message
    assert_intact_save(out / "run_2.safetensors", 2)
    assert saved_names(out) == ["run_2.safetensors"]
    assert not temp_files(out)
def test_read_only_output_folder_is_refused_before_training(parts, dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    steps = []
    make_read_only(monkeypatch, out)
    try:
        with pytest.raises(TrainerInputError, match="output_dir"):
            train_lora(parts, dataset, LoRAConfig(), config(out, steps=3),
                       callbacks=Callbacks(on_step=lambda s, t, l: steps.append(s)))
    finally:
        os.chmod(out, 0o755)
    assert steps == []


def test_cancel_during_an_intermediate_save_keeps_the_earlier_save(parts, dataset, tmp_path, monkeypatch):
    fail_lora_write(monkeypatch, 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        train_lora(parts, dataset, LoRAConfig(), config(tmp_path, steps=6, save_every_steps=2))
    assert_intact_save(tmp_path / "run_2.safetensors", 2)
    assert saved_names(tmp_path) == ["run_2.safetensors"]
    assert not temp_files(tmp_path)


def test_cancel_while_replacing_a_file_keeps_the_old_file(parts, dataset, tmp_path, monkeypatch):
    train_lora(parts, dataset, LoRAConfig(), config(tmp_path, steps=2))
    before = (tmp_path / "run.safetensors").read_bytes()
    fail_lora_write(monkeypatch, 1, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        train_lora(parts, dataset, LoRAConfig(), config(tmp_path, steps=2, force_retrain=True))
    assert (tmp_path / "run.safetensors").read_bytes() == before
    assert_intact_save(tmp_path / "run.safetensors", 2)
    assert not temp_files(tmp_path)



def test_temp_file_left_by_a_killed_save_is_removed_by_the_next_run(parts, dataset, tmp_path):
    stale = tmp_path / ".run.safetensors.0badc0de.tmp"
    stale.write_bytes(b"half a file")
    train_lora(parts, dataset, LoRAConfig(), config(tmp_path, steps=2))
    assert not stale.exists()


def test_killed_cli_run_resumes_from_its_last_save_with_an_unbroken_loss_curve(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "trainer_core", "train", "--output-dir", str(out), "--name", "run",
               "--steps", "120", "--save-every", "20", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    first_save = out / "run_20.safetensors"
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(str(first_save) + ".trainstate"):  # written last in a save
            assert first.poll() is None, "the first run ended before its first save"
            assert time.monotonic() < deadline, "no save within 120 s"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == -signal.SIGKILL
    assert not (out / "run.safetensors").exists()
    at_kill = load_training_state(str(first_save) + ".trainstate")

    resumed = subprocess.run(command + ["--resume", str(first_save)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "steps 21..120" in resumed.stderr
    final = load_training_state(str(out / "run.safetensors") + ".trainstate")
    assert final["step"] == 120
    assert [step for step, _ in final["losses"]] == list(range(1, 121))
    assert final["losses"][:20] == at_kill["losses"]
    assert load_lora(out / "run.safetensors")[1]["ss_steps"] == "120"
    assert not temp_files(out)


# --- trainings back to back on the same model ------------------------------------------------------


def hook_count(parts):
    modules = [m for root in (parts.unet, parts.text_encoder) for m in root.modules()]
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in modules)


def test_trainings_back_to_back_leave_the_model_and_each_other_alone(parts, dataset, tmp_path, monkeypatch):
    before, hooks = unet_output(parts), hook_count(parts)
    first = train_lora(parts, dataset, LoRAConfig(), config(tmp_path, output_name="first", steps=3))
    train_lora(parts, dataset, LoRAConfig(train_text_encoder=True, dropout=0.1),
               config(tmp_path, output_name="other", steps=2, gradient_checkpointing=True))
    train_hypernetwork(parts, dataset, HypernetworkConfig(), config(tmp_path, output_name="hn", steps=2,
                                                                     learning_rate=HYPERNET_LR))
    with monkeypatch.context() as patch:  # a run that dies mid-step must clean up too
        def broken(*args):
            raise RuntimeError("boom")
        patch.setattr(parts, "predict_noise", broken)
        with pytest.raises(RuntimeError, match="boom"):
            train_lora(parts, dataset, LoRAConfig(), config(tmp_path, output_name="broken", steps=2))
    again = train_lora(parts, dataset, LoRAConfig(), config(tmp_path, output_name="again", steps=3))
    assert torch.equal(unet_output(parts), before)
    assert hook_count(parts) == hooks
    assert not [m for m in parts.unet.modules() if "forward" in vars(m)], "checkpointing left a patched forward"
    assert not any(p.requires_grad for root in (parts.unet, parts.text_encoder) for p in root.parameters())
    assert again.losses == first.losses
    for key, tensor in first.kohya_state_dict.items():
        assert torch.equal(again.kohya_state_dict[key], tensor), key



def test_training_leaves_the_callers_random_state_alone(parts, dataset, tmp_path):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    train_lora(parts, dataset, LoRAConfig(dropout=0.1), config(tmp_path, steps=2))
    assert torch.equal(torch.get_rng_state(), state)
