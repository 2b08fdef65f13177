"""EmbeddingTrain in a real ComfyUI, on the tiny SD1 checkpoint.

The embedding example workflow runs headless (64 px, 4 training steps, 2 sampling steps): a
textual inversion and a DreamArtist pair trained side by side, then compared with KSampler.
Then: CLIPTextEncode with embedding:<name> on the trainer's CLIP gives exactly what a fresh CLIP
gives from the saved file through ComfyUI's own embedding loader, and exactly what training
computed from the vectors; no embedding warnings; a re-queue trains nothing; bad names stop.
"""
import json
import logging
import os

import pytest
import torch

from comfy_harness import REPO
from workflow_to_prompt import api_prompt

WORKFLOW = os.path.join(REPO, "example_workflows", "embedding_train_then_generate.json")
RESOLUTION = 64
TI, DA = "skkmtn_ti", "skkmtn_da"
EMBEDDING_WARNINGS = ("does not exist", "shape mismatch", "error loading embedding")


def node_ids(prompt, class_type):
    return sorted((i for i, node in prompt.items() if node["class_type"] == class_type), key=int)


class EmbeddingExample:
    """The example workflow as an API prompt, shrunk for a CPU, with its nodes found by role."""

    def __init__(self, comfyui, checkpoint):
        with open(WORKFLOW, encoding="utf-8") as f:
            prompt = api_prompt(json.load(f), comfyui.node_classes)
        self.checkpoint = node_ids(prompt, "CheckpointLoaderSimple")[0]
        trainers = {prompt[i]["inputs"]["mode"]: i for i in node_ids(prompt, "EmbeddingTrain")}
        self.ti, self.da = trainers["textual_inversion"], trainers["dreamartist"]
        samplers = node_ids(prompt, "KSampler")

        def sampler_using(trainer):
            encoder = lambda i: prompt[prompt[i]["inputs"]["positive"][0]]  # noqa: E731
            return next(i for i in samplers if encoder(i)["inputs"]["clip"][0] == trainer)
        self.ti_sampler, self.da_sampler = sampler_using(self.ti), sampler_using(self.da)
        self.base_sampler = next(i for i in samplers if i not in (self.ti_sampler, self.da_sampler))
        prompt[self.checkpoint]["inputs"]["ckpt_name"] = checkpoint
        for i in node_ids(prompt, "LoadDataset"):
            prompt[i]["inputs"]["resolution"] = RESOLUTION
        for i in node_ids(prompt, "EmptyLatentImage"):
            prompt[i]["inputs"].update(width=RESOLUTION, height=RESOLUTION)
        for i in samplers:
            prompt[i]["inputs"]["steps"] = 2
        for i in (self.ti, self.da):
            prompt[i]["inputs"].update(steps=4, save_every_steps=2)
        self.prompt = prompt

    def text(self, sampler, which="positive"):
        return self.prompt[self.prompt[sampler]["inputs"][which][0]]["inputs"]["text"]


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeHandler(self)


def encode(clip, text):
    """CLIPTextEncode's conditioning tensor, made as the node makes it inside a prompt."""
    import nodes
    with torch.inference_mode():
        return nodes.CLIPTextEncode().encode(clip, text)[0][0][0]


@pytest.fixture(scope="module")
def trained(comfyui, tiny_checkpoint):
    example = EmbeddingExample(comfyui, tiny_checkpoint)
    progress_before = len(comfyui.progress)
    with Warnings() as warnings:
        run = comfyui.run(example.prompt)
    run.assert_succeeded()
    return {"example": example, "run": run, "warnings": warnings.messages,
            "progress": comfyui.progress[progress_before:]}


def test_example_workflow_holds_the_nodes_defaults_in_the_right_widgets(comfyui):
    with open(WORKFLOW, encoding="utf-8") as f:
        prompt = api_prompt(json.load(f), comfyui.node_classes)
    defaults = comfyui.widget_defaults("EmbeddingTrain")
    for i, (name, mode) in zip(node_ids(prompt, "EmbeddingTrain"), ((TI, "textual_inversion"), (DA, "dreamartist"))):
        widgets = {k: v for k, v in prompt[i]["inputs"].items() if not isinstance(v, list)}
        assert widgets == {**defaults, "name": name, "mode": mode}


def test_example_workflow_runs_headless_and_saves_both_embeddings(comfyui, trained):
    run, example = trained["run"], trained["example"]
    files = set(os.listdir(comfyui.folders["embeddings"]))
    expected = {f"{TI}.safetensors", f"{TI}-2.safetensors", f"{DA}.safetensors", f"{DA}-neg.safetensors",
                f"{DA}-2.safetensors", f"{DA}-2-neg.safetensors"}
    assert expected <= files
    assert not [f for f in files if ".tmp" in f or f.startswith(".")]
    assert [run.output(example.ti, i) for i in (1, 2, 4)] == [f"embedding:{TI}", "", f"{TI}.safetensors"]
    assert [run.output(example.da, i) for i in (1, 2, 4)] == [
        f"embedding:{DA}", f"embedding:{DA}-neg", f"{DA}.safetensors, {DA}-neg.safetensors"]
    for trainer in (example.ti, example.da):
        loss = run.output(trainer, 3)["loss"]
        assert len(loss) == 4 and all(isinstance(v, float) for v in loss)
        assert max(v for node, v, _, _ in trained["progress"] if node == trainer) == 4
    # The comparison prompts call the embeddings the trainers report.
    assert run.output(example.ti, 1) in example.text(example.ti_sampler)
    assert run.output(example.da, 1) in example.text(example.da_sampler)
    assert run.output(example.da, 2) in example.text(example.da_sampler, "negative")
    base = run.output(example.base_sampler)["samples"]
    for sampler in (example.ti_sampler, example.da_sampler):
        assert not torch.equal(run.output(sampler)["samples"], base)


def test_no_embedding_warnings_while_training_or_sampling(trained):
    assert [m for m in trained["warnings"] if any(w in m for w in EMBEDDING_WARNINGS)] == []


def test_returned_clip_encodes_exactly_like_a_fresh_clip_reading_the_saved_files(comfyui, trained, tiny_checkpoint):
    run, example = trained["run"], trained["example"]
    _, fresh_clip, _ = comfyui.load_checkpoint(tiny_checkpoint)  # core's loader; finds models/embeddings
    for trainer, texts in ((example.ti, [f"a photo of embedding:{TI}, orange", f"embedding:{TI}-2"]),
                           (example.da, [f"embedding:{DA}, orange", f"(embedding:{DA}-neg:1.2), blurry"])):
        clip = run.output(trainer, 0)
        for text in texts:
            with Warnings() as warnings:
                ours, theirs = encode(clip, text), encode(fresh_clip, text)
            assert not [m for m in warnings.messages if any(w in m for w in EMBEDDING_WARNINGS)], text
            assert torch.equal(ours, theirs), text
    plain = "a photo of an orange creature"
    assert torch.equal(encode(run.output(example.ti, 0), plain), encode(fresh_clip, plain))
    assert not torch.equal(encode(fresh_clip, f"a photo of embedding:{TI}"), encode(fresh_clip, "a photo of"))


def test_training_computes_the_conditioning_the_saved_file_gives(comfyui, trained, tiny_checkpoint):
    """The trainer's path (vectors spliced in through ComfyUI's tokenizer and text encoder) and
    CLIPTextEncode on the saved file agree exactly: what was trained is what generates."""
    bridge = comfyui.pack_module("nodes.comfy_bridge")
    embedding = comfyui.pack_module("trainer_core.adapters.embedding")
    _, clip, _ = comfyui.load_checkpoint(tiny_checkpoint)
    vectors = {name: embedding.load_embedding(os.path.join(comfyui.folders["embeddings"], f"{name}.safetensors"))[0]
               for name in (DA, f"{DA}-neg")}
    captions = [f"a photo of embedding:{DA}, orange round creature", f"a photo of embedding:{DA}-neg, orange",
                "a photo of (an orange) creature"]
    prompts = bridge.TrainableEmbeddingPrompts(clip)
    with torch.inference_mode(False), torch.no_grad():
        trained_path = prompts(captions, vectors).cpu()
    for caption, context in zip(captions, trained_path):
        escaped = caption.replace("(", "\\(").replace(")", "\\)")  # captions are read literally
        assert torch.equal(context, encode(clip, escaped)[0].cpu()), caption


def test_the_model_clip_and_vae_stay_bit_identical_to_a_fresh_load(comfyui, trained, tiny_checkpoint):
    """Only the new vectors train: the checkpoint's MODEL, CLIP (every token embedding included)
    and VAE that the trainers used equal the same checkpoint loaded again."""
    run, example = trained["run"], trained["example"]
    fresh = comfyui.load_checkpoint(tiny_checkpoint)
    used = [run.output(example.checkpoint, i) for i in range(3)]
    modules = lambda model, clip, vae: (model.model, clip.cond_stage_model, vae.first_stage_model)  # noqa: E731
    for before, after in zip(modules(*fresh), modules(*used)):
        expected, actual = before.state_dict(), after.state_dict()
        skipped = ("text_projection.weight", "logit_scale")  # uninitialised in SD1 files, never used
        keys = [k for k in expected if not k.endswith(skipped)]
        assert keys and all(torch.equal(expected[k], actual[k]) for k in keys)
        assert all(p.grad is None for p in after.parameters()), "no gradient left on the base weights"


def test_both_file_formats_load_through_comfyuis_embedding_loader(comfyui, trained):
    """The A1111 .pt and the safetensors file give ComfyUI's loader exactly the trained vectors."""
    import comfy.sd1_clip
    example = trained["example"]
    prompt = json.loads(json.dumps(example.prompt))
    prompt[example.ti]["inputs"].update(name="skkmtn_pt", file_format="a1111_pt", save_every_steps=0)
    run = comfyui.run(prompt)
    run.assert_succeeded()
    assert run.output(example.ti, 4) == "skkmtn_pt.pt"
    folder = comfyui.folders["embeddings"]
    payload = torch.load(os.path.join(folder, "skkmtn_pt.pt"), weights_only=True)
    with Warnings() as warnings:
        from_pt = comfy.sd1_clip.load_embed("skkmtn_pt", [folder], 768, "clip_l")
        from_safetensors = comfy.sd1_clip.load_embed(TI, [folder], 768, "clip_l")
    assert warnings.messages == []
    assert torch.equal(from_pt, payload["string_to_param"]["*"]) and from_pt.shape == (3, 768)
    embedding = comfyui.pack_module("trainer_core.adapters.embedding")
    vectors, step, _ = embedding.load_embedding(os.path.join(folder, f"{TI}.safetensors"))
    assert torch.equal(from_safetensors, vectors) and step == 4
    # Same seed and settings as the safetensors run: the same vectors in another file format.
    assert torch.equal(from_pt, from_safetensors)


def test_requeue_trains_nothing(comfyui, trained):
    example = trained["example"]
    final = os.path.join(comfyui.folders["embeddings"], f"{DA}-neg.safetensors")
    written = os.stat(final).st_mtime_ns
    executor = comfyui.new_executor()  # an empty in-memory cache, as after restarting ComfyUI
    progress_before = len(comfyui.progress)
    after_restart = comfyui.run(example.prompt, executor=executor)
    after_restart.assert_succeeded()
    assert example.da not in after_restart.cached_nodes()
    assert [p for p in comfyui.progress[progress_before:] if p[0] in (example.ti, example.da)] == [], \
        "no training step ran: the saved files were loaded"
    assert os.stat(final).st_mtime_ns == written
    for sampler in (example.ti_sampler, example.da_sampler):
        assert torch.equal(after_restart.output(sampler)["samples"], trained["run"].output(sampler)["samples"])
    queued_again = comfyui.run(example.prompt, executor=executor)
    assert {example.ti, example.da} <= queued_again.cached_nodes(), "ComfyUI's own cache skips the nodes"


def test_a_name_with_a_path_is_refused_before_anything_runs(comfyui, trained):
    example = trained["example"]
    prompt = json.loads(json.dumps(example.prompt))
    prompt[example.ti]["inputs"]["name"] = "../loras/sneaky"
    _, _, outputs_to_run, node_errors = comfyui.validate(prompt)
    ti_preview = next(i for i, node in prompt.items() if node["class_type"] == "PreviewImage"
                      and prompt[node["inputs"]["images"][0]]["inputs"]["samples"][0] == example.ti_sampler)
    assert ti_preview not in outputs_to_run
    assert "has a path in it" in node_errors[example.ti]["errors"][0]["details"]


def test_an_ordinary_word_or_a_taken_name_stops_with_a_clear_message(comfyui, trained):
    example = trained["example"]
    prompt = json.loads(json.dumps(example.prompt))
    prompt[example.ti]["inputs"]["name"] = "cat"
    run = comfyui.run(prompt)
    assert "ordinary word" in run.message("execution_error")["exception_message"]

    taken = os.path.join(comfyui.folders["embeddings"], "downloaded_style.pt")
    with open(taken, "wb") as f:
        f.write(b"someone else's embedding")
    prompt[example.ti]["inputs"]["name"] = "downloaded_style"
    run = comfyui.run(prompt)
    assert "already exists" in run.message("execution_error")["exception_message"]
    with open(taken, "rb") as f:
        assert f.read() == b"someone else's embedding"

    # The same name as a file of the trainer's own format: replaced only with overwrite on.
    os.replace(taken, taken[:-len(".pt")] + ".safetensors")
    run = comfyui.run(prompt)
    assert "turn on overwrite" in run.message("execution_error")["exception_message"]
    prompt[example.ti]["inputs"]["overwrite"] = True
    comfyui.run(prompt).assert_succeeded()
    embedding = comfyui.pack_module("trainer_core.adapters.embedding")
    vectors, step, _ = embedding.load_embedding(taken[:-len(".pt")] + ".safetensors")
    assert vectors.shape == (3, 768) and step == 4
