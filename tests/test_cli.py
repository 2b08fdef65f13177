"""`python -m trainer_core train`: the main paths, and bad input that must end with exit code 2
and a message naming the option, never a traceback.

These tests need no learning: the random tiny model is built once per module and handed to the
CLI in place of the demo model (tests/test_demo.py runs the demo model itself), so each run costs
only its training steps.
"""
import json
import logging
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from trainer_core import cli
from trainer_core.adapters.hypernetwork import load_hypernetwork
from trainer_core.backends import diffusers as backend
from trainer_core.cli import main
from trainer_core.formats import load_lora


@pytest.fixture(scope="module")
def tiny_parts():
    torch.set_num_threads(1)
    return backend.tiny_parts(seed=0)


@pytest.fixture
def model(monkeypatch, tiny_parts):
    """The CLI's no-model path gets the module's tiny model; `calls` counts the loads asked for."""
    calls = []

    def load(device="cpu", known_hash=""):
        calls.append(device)
        return tiny_parts

    monkeypatch.setattr(backend, "demo_parts", load)
    return calls


def train(tmp_path, *args):
    return main(["train", "--output-dir", str(tmp_path), *args])


def adapter_files(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith((".safetensors", ".pt"))) if folder.exists() else []


# --- main paths --------------------------------------------------------------------------------


def test_run_without_a_model_trains_the_demo_model_and_writes_lora_chart_and_samples(model, tmp_path, capsys,
                                                                                     caplog):
    caplog.set_level(logging.INFO, logger="trainer_core")
    assert train(tmp_path, "--steps", "30") == 0
    assert len(model) == 1, "no --model: the demo model"
    assert sorted(os.listdir(tmp_path)) == ["skkmtn_lora.safetensors", "skkmtn_lora.safetensors.trainstate",
                                            "skkmtn_lora_loss.png", "skkmtn_lora_samples.png"]
    _, metadata = load_lora(tmp_path / "skkmtn_lora.safetensors")
    assert metadata["ss_steps"] == "30" and metadata["ss_resolution"] == "(128, 128)"
    with Image.open(tmp_path / "skkmtn_lora_samples.png") as grid:
        assert grid.width >= 2 * 128 and grid.height >= 2 * 128  # base/trained x with/without the token
    with Image.open(tmp_path / "skkmtn_lora_loss.png") as chart:
        chart.verify()
    printed = capsys.readouterr().out
    assert "loss chart" in printed and "before/after samples" in printed
    saves = [r.getMessage() for r in caplog.records if r.getMessage().startswith("saved ")]
    assert saves == [f"saved {tmp_path / 'skkmtn_lora.safetensors'} (step 30)"], "each save is reported once"


def test_second_identical_run_is_a_cache_hit_said_once_with_no_save_bar_or_samples(model, tmp_path, capsys,
                                                                                    caplog, monkeypatch):
    assert train(tmp_path, "--steps", "5") == 0
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    capsys.readouterr()
    caplog.clear()
    caplog.set_level(logging.INFO, logger="trainer_core")
    sampled = []
    monkeypatch.setattr(cli, "sample_images", lambda *args, **kwargs: sampled.append(args))
    assert train(tmp_path, "--steps", "5") == 0
    out, err = capsys.readouterr()
    logged = [r.getMessage() for r in caplog.records]
    # (under pytest the log record also reaches stderr through tqdm's logging redirect)
    assert sum("already trained" in line for line in logged + out.splitlines()) == 1
    assert err.count("already trained") <= 1
    assert "--force-retrain" in next(line for line in logged if "already trained" in line)
    assert not any(line.startswith("saved") for line in logged + out.splitlines())
    assert "training:" not in err and "step/s" not in err, "no progress bar when nothing trains"
    assert sampled == [], "the before/after grid beside the file is reused"
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


def test_cache_hit_is_answered_before_the_model_loads(model, tiny_parts, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(backend, "model_hash", lambda path: tiny_parts.base_model_hash)
    assert train(tmp_path, "--steps", "5") == 0
    caplog.set_level(logging.INFO, logger="trainer_core")
    assert train(tmp_path, "--steps", "5") == 0
    assert len(model) == 1, "the finished run is recognised from the files, without loading the model"
    assert sum("already trained" in r.getMessage() for r in caplog.records) == 1
    # other settings, another model, or a lost report: the model is loaded and trained as before
    assert train(tmp_path, "--steps", "6", "--overwrite") == 0
    assert len(model) == 2
    monkeypatch.setattr(backend, "model_hash", lambda path: "another")
    assert train(tmp_path, "--steps", "6") == 0 and len(model) == 3
    monkeypatch.setattr(backend, "model_hash", lambda path: tiny_parts.base_model_hash)
    os.remove(tmp_path / "skkmtn_lora_samples.png")
    assert train(tmp_path, "--steps", "6") == 0 and len(model) == 4
    assert os.path.exists(tmp_path / "skkmtn_lora_samples.png")


def test_finished_run_continues_with_more_steps_without_overwrite(model, tmp_path, caplog):
    assert train(tmp_path, "--steps", "4", "--save-every", "2") == 0
    final = tmp_path / "skkmtn_lora.safetensors"
    first_save = (tmp_path / "skkmtn_lora_2.safetensors").read_bytes()
    caplog.set_level(logging.INFO, logger="trainer_core")
    assert train(tmp_path, "--steps", "8", "--save-every", "2", "--resume", str(final)) == 0
    assert load_lora(final)[1]["ss_steps"] == "8"
    assert load_lora(tmp_path / "skkmtn_lora_6.safetensors")[1]["ss_steps"] == "6"
    assert (tmp_path / "skkmtn_lora_2.safetensors").read_bytes() == first_save, "steps before the resume stay"
    assert any("steps 5..8" in r.getMessage() for r in caplog.records)


def test_another_run_under_the_same_name_still_needs_overwrite(model, tmp_path, capsys):
    assert train(tmp_path, "--steps", "2") == 0
    assert train(tmp_path, "--steps", "2", "--lr", "0.003") == 2
    error = capsys.readouterr().err
    assert "--overwrite" in error and "--resume" not in error
    assert train(tmp_path, "--steps", "4") == 2
    assert "It is this training at step 2: to train it further, set --resume to it" in capsys.readouterr().err


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("adapter", ["lora", "hypernetwork"])
def test_every_file_a_run_writes_is_readable_by_other_users(model, tmp_path, adapter):
    previous = os.umask(0o022)
    try:
        assert train(tmp_path, "--adapter", adapter, "--steps", "4", "--save-every", "2") == 0
    finally:
        os.umask(previous)
    modes = {name: oct(os.stat(tmp_path / name).st_mode & 0o777) for name in os.listdir(tmp_path)}
    kinds = {os.path.splitext(name)[1] for name in modes}
    assert kinds >= {".trainstate", ".png"} | ({".safetensors"} if adapter == "lora" else {".pt", ".optim"})
    assert set(modes.values()) == {"0o644"}, modes


def test_help_gives_every_flag_a_line_and_its_default(capsys):
    from trainer_core.cli import CLI_FLAGS, build_parser
    parser = build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    text = train_parser.format_help()
    for action in train_parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings[0]} has no help line"
            assert "default" in action.help or action.default not in (None, ""), action.option_strings[0]
    assert "(default: runs)" in text and "default: 1400" in text
    assert "DIFFERENT" in " ".join(text.split()) and "exactly these settings" in " ".join(text.split())
    flags = {s for action in train_parser._actions for s in action.option_strings}
    assert set(CLI_FLAGS.values()) <= flags, "every flag a message names exists"


def test_hypernetwork_adapter_writes_an_a1111_file_chart_and_samples(model, tmp_path):
    assert train(tmp_path, "--adapter", "hypernetwork", "--steps", "10") == 0
    net, step = load_hypernetwork(tmp_path / "skkmtn_hypernet.pt")
    assert step == 10 and net.config.layer_structure == "1,2,2,1"
    assert (tmp_path / "skkmtn_hypernet_loss.png").exists() and (tmp_path / "skkmtn_hypernet_samples.png").exists()


def test_embedding_and_dreamartist_adapters_write_their_embeddings(model, tmp_path, capsys):
    from trainer_core.adapters.embedding import load_embedding
    assert train(tmp_path, "--adapter", "embedding", "--steps", "4", "--vectors", "2") == 0
    vectors, step, metadata = load_embedding(str(tmp_path / "skkmtn_emb.safetensors"))
    assert vectors.shape == (2, 32) and step == 4 and metadata["mode"] == "textual_inversion"
    assert train(tmp_path, "--adapter", "dreamartist", "--steps", "4", "--save-every", "2") == 0
    assert {"skkmtn_da.safetensors", "skkmtn_da-neg.safetensors", "skkmtn_da-2.safetensors",
            "skkmtn_da-2-neg.safetensors"} <= set(adapter_files(tmp_path))
    negative, _, metadata = load_embedding(str(tmp_path / "skkmtn_da-neg.safetensors"))
    assert negative.shape == (6, 32) and metadata["mode"] == "dreamartist"
    assert (tmp_path / "skkmtn_da_samples.png").exists()
    capsys.readouterr()
    assert train(tmp_path, "--adapter", "embedding", "--name", "cat") == 2
    assert "ordinary word" in capsys.readouterr().err
    assert train(tmp_path, "--adapter", "embedding", "--name", "runs/skk") == 2
    assert "has a path in it" in capsys.readouterr().err


# --- bad input: exit code 2 and the option's name ---------------------------------------------


def sdxl_file(folder):
    path = folder / "sdxl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 2)},
              str(path))
    return path


def lora_file(folder):
    path = folder / "some_lora.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 32, 1, 1), f"{name}.lora_up.weight": torch.zeros(32, 4, 1, 1),
               f"{name}.alpha": torch.tensor(4.0)}, str(path))
    return path


# (flags, what the one error line must say, the node's field name it must not use instead)
BAD_OPTIONS = {
    "steps_zero": (["--steps", "0"], "--steps must be", None),
    "steps_negative": (["--steps", "-5"], "--steps must be", None),
    "lr_zero": (["--lr", "0"], "--lr must be", "learning_rate"),
    "lr_negative": (["--lr=-0.001"], "--lr must be", "learning_rate"),
    "lr_nan": (["--lr", "nan"], "--lr must be", "learning_rate"),
    "resolution": (["--resolution", "100"], "--resolution 100", None),
    "rank_zero": (["--rank", "0"], "--rank must be", None),
    "rank_too_large": (["--rank", "4096"], "set --rank to", None),
    "batch_larger_than_dataset": (["--batch-size", "99"], "lower --batch-size", "batch_size"),
    "save_every_negative": (["--save-every", "-1"], "--save-every must be", "save_every_steps"),
    "layer_structure": (["--adapter", "hypernetwork", "--layer-structure", "2,1"], "--layer-structure '2,1'",
                        "layer_structure"),
    "activation": (["--adapter", "hypernetwork", "--activation", "gelu"], "--activation 'gelu'", None),
    "data_missing": (["--data", "{tmp}/nowhere", "--token", "skkmtn"], "--data {tmp}/nowhere does not exist",
                     None),
    "data_missing_before_token": (["--data", "{tmp}/nowhere"], "--data {tmp}/nowhere does not exist",
                                  "instance_token"),
    "no_token": (["--data", "{tmp}"], "--token is empty", "instance_token"),
    "resume_missing": (["--resume", "{tmp}/gone.safetensors"], "--resume: ", "resume_from"),
    "reg_data_missing": (["--reg-data", "{tmp}/noreg", "--class-prompt", "a girl"],
                         "--reg-data {tmp}/noreg does not exist", None),
    "model_missing": (["--model", "{tmp}/nowhere.safetensors"], "does not exist", None),
    "model_is_a_lora": (["--model", "{lora}"], "LoRA", None),
    "model_is_sdxl": (["--model", "{sdxl}"], "SDXL", None),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_bad_option_exits_2_naming_the_option(model, tmp_path, capsys, case):
    args, expected, node_name = BAD_OPTIONS[case]
    places = {"tmp": str(tmp_path), "lora": str(lora_file(tmp_path)), "sdxl": str(sdxl_file(tmp_path))}
    out = tmp_path / "out"
    assert train(out, *[a.format(**places) for a in args]) == 2
    error = capsys.readouterr().err
    messages = [line for line in error.splitlines() if line.startswith("error: ")]
    assert len(messages) == 1 and expected.format(**places) in messages[0], error
    if node_name:
        assert node_name not in messages[0], "the CLI names its flags, not the node's fields"
    assert "Traceback" not in error
    assert adapter_files(out) == []


def test_option_of_the_wrong_type_is_refused_by_argparse_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train(tmp_path, "--steps", "many")
    assert exit_.value.code == 2 and "--steps" in capsys.readouterr().err


@pytest.mark.parametrize("content, named", [
    ({"train": {"stepz": 3}}, "stepz"),
    ({"lora": {"rnk": 4}}, "rnk"),
    ({"dataset": {"token": "x"}}, "token"),
    ({"trainer": {"steps": 3}}, "trainer"),
])
def test_config_file_with_an_unknown_key_names_it(model, tmp_path, capsys, content, named):
    path = tmp_path / "options.json"
    path.write_text(json.dumps(content))
    assert train(tmp_path / "out", "--config", str(path)) == 2
    error = capsys.readouterr().err
    assert "unknown" in error and repr(named) in error
    assert adapter_files(tmp_path / "out") == []


# --- option files, output folder and Ctrl-C ------------------------------------------------------



@pytest.mark.parametrize("content", [None, "{not json", '{"train": 5}'])
def test_unreadable_config_file_exits_2_naming_it(model, tmp_path, capsys, content):
    path = tmp_path / "options.json"
    if content is not None:
        path.write_text(content)
    assert train(tmp_path / "out", "--config", str(path)) == 2
    assert "options.json" in capsys.readouterr().err



def test_bad_options_are_refused_before_the_model_loads(monkeypatch, tmp_path, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(backend, "demo_parts", no_model)
    assert train(tmp_path, "--steps", "0") == 2
    assert "--steps" in capsys.readouterr().err



def test_output_dir_that_is_a_file_exits_2_naming_it(model, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert train(tmp_path / "afile", "--steps", "1") == 2
    assert "afile" in capsys.readouterr().err



def test_ctrl_c_names_the_last_save_and_how_to_resume(model, tiny_parts, monkeypatch, tmp_path, capsys):
    calls, real = [], tiny_parts.predict_noise

    def predict_noise(*args):
        # Training steps only: the memory plan (fake tensors) and the CPU timing probe
        # (input with gradients) run the UNet before the first step.
        if type(args[0]) is torch.Tensor and not args[0].requires_grad:
            calls.append(1)
        if len(calls) == 13:  # step 7: each step runs a sample picture and a regularization picture
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(tiny_parts, "predict_noise", predict_noise)
    try:
        code = train(tmp_path, "--steps", "10", "--save-every", "2")
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C ended the CLI with a traceback")
    error = capsys.readouterr().err
    assert code == 130 and "skkmtn_lora_6.safetensors" in error and "--resume" in error


def test_demo_defaults_bring_the_class_word_and_the_captioned_regularization_set(tmp_path):
    from trainer_core import demo
    from trainer_core.cli import build_parser, configs_from_args
    configs = configs_from_args(build_parser().parse_args(["train"]))
    assert configs["dataset"].instance_prompt == "skkmtn circle" and configs["dataset"].ignore_caption_files
    assert configs["regularization"] == dict(folder=demo.REGULARIZATION_DIR, use_caption_files=True,
                                             class_prompt="circle", blank_count=0)
    # a real model, or the user's own regularization choice, gets none of the demo's words
    real = configs_from_args(build_parser().parse_args(["train", "--model", str(tmp_path)]))
    assert real["dataset"].instance_prompt == "skkmtn" and "folder" not in real["regularization"]
    assert not real["dataset"].ignore_caption_files
    assert configs_from_args(build_parser().parse_args(
        ["train", "--model", str(tmp_path), "--ignore-captions"]))["dataset"].ignore_caption_files
    own = configs_from_args(build_parser().parse_args(["train", "--reg-blank", "2", "--class-prompt", "a shape"]))
    assert own["regularization"] == dict(class_prompt="a shape", blank_count=2)


def test_regularization_flags_reach_the_regularization_set(tmp_path):
    from trainer_core.cli import build_parser, configs_from_args
    args = build_parser().parse_args(["train", "--reg-data", str(tmp_path), "--class-prompt", "a photo of a girl",
                                      "--reg-blank", "3", "--reg-captions"])
    assert configs_from_args(args)["regularization"] == dict(
        folder=str(tmp_path), class_prompt="a photo of a girl", blank_count=3, use_caption_files=True)
    plain = configs_from_args(build_parser().parse_args(["train", "--reg-blank", "3", "--class-prompt", "a girl"]))
    assert "use_caption_files" not in plain["regularization"]


def test_network_type_flags_train_a_lycoris_file(model, tmp_path):
    assert train(tmp_path, "--steps", "3", "--network-type", "lokr", "--factor", "4", "--conv-rank", "2",
                 "--conv-alpha", "1") == 0
    state_dict, metadata = load_lora(tmp_path / "skkmtn_lora.safetensors")
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"]) == {"algo": "lokr", "conv_dim": "2", "conv_alpha": "1",
                                                       "factor": "4"}
    assert any(k.endswith(".lokr_w1") for k in state_dict)
    assert any(k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.") for k in state_dict)
