"""What a user looks at after training: the loss chart and same-seed comparisons.

LossChart draws a LOSS_MAP. TriggerComparison and StepComparisonGrid make their pictures with
ComfyUI's own sampler (through comfy_bridge.KSamplerPictures, the KSampler path), so each cell
is the picture a KSampler with the same settings would give.
"""
from __future__ import annotations

import os
import re
import sys

import numpy as np
import torch
from comfy_api.latest import io

from ..trainer_core.dataset import mentions
from ..trainer_core.errors import TrainerInputError
from .training_run import image_tensor
from .types import MAX_SEED

DEFAULT_PROMPT = "skkmtn, orange round creature"
DEFAULT_TOKEN = "skkmtn"
DEFAULT_NEGATIVE = "blurry, lowres, text, watermark"
DEFAULT_SAMPLER, DEFAULT_SCHEDULER = "euler", "normal"
MAX_SIZE = 4096
TRIGGER_COLUMNS = ("trained, with token", "trained, no token", "base, with token")


def ksampler_choices() -> tuple:
    """(samplers, schedulers) as KSampler lists them in the ComfyUI that loaded the pack.

    Read from the module ComfyUI has already imported (its nodes.py imports comfy.samplers before
    any custom node) rather than imported here: importing comfy starts its device setup, which
    fails where the schema is only read (the docs check, the glue tests). There only KSampler's
    usual pair is offered.
    """
    samplers = sys.modules.get("comfy.samplers")
    if samplers is None:
        return [DEFAULT_SAMPLER], [DEFAULT_SCHEDULER]
    return list(samplers.KSampler.SAMPLERS), list(samplers.KSampler.SCHEDULERS)


def sampling_inputs() -> list:
    """KSampler's settings, shared by both comparison nodes."""
    samplers, schedulers = ksampler_choices()
    return [
        io.Int.Input(
            "steps", default=20, min=1, max=10000,
            tooltip="Sampling steps per picture, as in KSampler. 20-30 is usual."),
        io.Float.Input(
            "cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
            tooltip="How closely the pictures follow the prompt, as in KSampler. 7 is usual for SD1.x."),
        io.Combo.Input(
            "sampler_name", options=samplers, default=DEFAULT_SAMPLER,
            tooltip="The sampling method, as in KSampler (euler and dpmpp_2m are good choices)."),
        io.Combo.Input(
            "scheduler", options=schedulers, default=DEFAULT_SCHEDULER,
            tooltip="How the noise is reduced over the steps, as in KSampler (normal or karras are "
                    "good choices)."),
        io.Int.Input(
            "width", default=512, min=64, max=MAX_SIZE, step=8,
            tooltip="Picture width in pixels. SD1.x draws best at 512."),
        io.Int.Input(
            "height", default=512, min=64, max=MAX_SIZE, step=8,
            tooltip="Picture height in pixels. SD1.x draws best at 512."),
    ]


def without_token(prompt: str, token: str) -> str:
    """The prompt with every whole-word occurrence of the token removed and the commas and
    spaces it leaves behind tidied: "skkmtn, orange round creature" -> "orange round creature"."""
    text = re.sub(rf"(?<!\w){re.escape(token.strip())}(?!\w)", "", prompt, flags=re.IGNORECASE)
    tags = (" ".join(tag.split()) for tag in text.split(","))
    return ", ".join(tag for tag in tags if tag)


def token_problem(prompt: str, instance_token: str):
    """Why the prompt cannot show the token's effect, or None."""
    if not instance_token.strip():
        return ("instance_token is empty: write the trigger word the model was trained on (LoadDataset's "
                "instance_token, e.g. 'skkmtn').")
    if not mentions(prompt, instance_token):
        return (f"the prompt does not contain the instance token '{instance_token.strip()}': add it, e.g. "
                f"'{instance_token.strip()}, orange round creature', so the comparison can show it with and "
                f"without.")
    return None


def token_check(prompt, instance_token):
    """validate_inputs of the comparison nodes: True, or the message when the prompt lacks the token."""
    if prompt is None or instance_token is None:
        return True
    return token_problem(prompt, instance_token) or True


def pil_image(image: torch.Tensor):
    """The first picture of a ComfyUI IMAGE batch as a PIL image."""
    from PIL import Image
    pixels = (image[0].detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(pixels))


def grid_tensor(rows: list, row_labels: list, column_labels: list) -> torch.Tensor:
    """A labelled grid (trainer_core.plots) of IMAGE rows, as a one-image IMAGE batch."""
    from ..trainer_core.plots import labelled_grid
    pictures = [[pil_image(image) for image in row] for row in rows]
    return image_tensor(labelled_grid(pictures, row_labels, column_labels))


def lora_saves(final_path: str) -> list:
    """[(step, path)] of the intermediate saves <stem>_<step>.safetensors LoRATrain wrote beside
    the final file, by step."""
    folder, name = os.path.split(final_path)
    stem, suffix = os.path.splitext(name)
    pattern = re.compile(rf"{re.escape(stem)}_(\d+){re.escape(suffix)}")
    saves = []
    for entry in os.listdir(folder):
        match = pattern.fullmatch(entry)
        if match:
            saves.append((int(match.group(1)), os.path.join(folder, entry)))
    return sorted(saves)


def final_label(metadata: dict) -> str:
    """The final file's row label: its step from the kohya metadata when it has one."""
    steps = metadata.get("ss_steps", "")
    return f"step {steps} (final)" if steps else "final"


def lora_file(lora_name: str) -> str:
    """The full path of a file in models/loras, or an error that says how to name it."""
    import folder_paths
    path = folder_paths.get_full_path("loras", lora_name) if lora_name.strip() else None
    if path is None:
        raise TrainerInputError(
            f"lora_name: '{lora_name}' is not a file in models/loras. Connect LoRATrain's lora_name output, "
            f"or type the name as Load LoRA lists it (e.g. skkmtn_lora.safetensors).")
    return path


class LossChart(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LossChart",
            display_name="Plot Training Loss",
            category="training",
            description=(
                "Draws the training loss of every step as a picture: the raw loss (light blue, jumpy) "
                "and its moving average (red), which is the line to read. Connect a training node's loss "
                "output and show the picture with Preview Image. The loss of image training stays noisy; "
                "what matters is that the red line settles rather than climbs."),
            inputs=[
                io.LossMap.Input(
                    "loss", tooltip="The loss output of Train LoRA or Train Hypernetwork (core's Train "
                                    "LoRA works too)."),
            ],
            outputs=[
                io.Image.Output(display_name="chart",
                                tooltip="The loss chart as a picture (512 x 256): connect Preview Image or "
                                        "Save Image."),
            ],
        )

    @classmethod
    def execute(cls, loss) -> io.NodeOutput:
        from ..trainer_core.plots import loss_chart
        from . import comfy_bridge as bridge
        return io.NodeOutput(image_tensor(loss_chart(bridge.losses_from_loss_map(loss))))


class TriggerComparison(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TriggerComparison",
            display_name="Compare With / Without Trigger",
            category="training",
            description=(
                "Answers 'did it learn my subject, and only with the trigger word?' in one picture. "
                "With one seed and ComfyUI's own sampler it draws three pictures: the trained model with "
                "your instance token in the prompt, the trained model with the token taken out, and the "
                "base model with the token. A good result shows your subject in the first picture only; "
                "if the second looks like it too, the training leaks into every prompt."),
            inputs=[
                io.Model.Input("trained_model", tooltip="The model after training: Train LoRA's or Train "
                                                        "Hypernetwork's model output."),
                io.Clip.Input("trained_clip", tooltip="The CLIP that goes with the trained model: Train LoRA's "
                                                      "clip output (or the checkpoint's CLIP for a hypernetwork)."),
                io.Model.Input("base_model", tooltip="The model before training, straight from Load Checkpoint, "
                                                     "for the 'base' picture."),
                io.Clip.Input("base_clip", tooltip="The CLIP straight from Load Checkpoint, for the 'base' "
                                                   "picture."),
                io.Vae.Input("vae", tooltip="The VAE from Load Checkpoint; it turns the results into pictures."),
                io.String.Input(
                    "prompt", default=DEFAULT_PROMPT, multiline=True,
                    tooltip="What to draw. It must contain the instance token; the middle picture uses the "
                            "same prompt with the token removed."),
                io.String.Input(
                    "instance_token", default=DEFAULT_TOKEN,
                    tooltip="The trigger word the model was trained on (LoadDataset's instance_token). It is "
                            "removed from the prompt for the middle picture."),
                io.String.Input(
                    "negative_prompt", default=DEFAULT_NEGATIVE, multiline=True,
                    tooltip="What to avoid in all three pictures, as in a negative CLIP Text Encode."),
                io.Int.Input(
                    "seed", default=0, min=0, max=MAX_SEED, control_after_generate=False,
                    tooltip="The noise all three pictures start from. The same seed makes the pictures "
                            "comparable; change it to check another one."),
                *sampling_inputs(),
            ],
            outputs=[
                io.Image.Output(display_name="grid",
                                tooltip="The three pictures side by side with a label over each: connect "
                                        "Preview Image or Save Image."),
                io.Image.Output(display_name="images",
                                tooltip="The three pictures as a batch (trained with token, trained without, "
                                        "base with token), to save or process one by one."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, prompt=None, instance_token=None):
        return token_check(prompt, instance_token)

    @classmethod
    def execute(cls, trained_model, trained_clip, base_model, base_clip, vae, prompt, instance_token,
                negative_prompt, seed, steps, cfg, sampler_name, scheduler, width, height) -> io.NodeOutput:
        from . import comfy_bridge as bridge
        problem = token_problem(prompt, instance_token)
        if problem:
            raise TrainerInputError(problem)
        pictures = bridge.KSamplerPictures(vae, seed, steps, cfg, sampler_name, scheduler, width, height,
                                           count=len(TRIGGER_COLUMNS), node_id=cls.hidden.unique_id)
        images = [
            pictures.picture(trained_model, trained_clip, prompt, negative_prompt),
            pictures.picture(trained_model, trained_clip, without_token(prompt, instance_token), negative_prompt),
            pictures.picture(base_model, base_clip, prompt, negative_prompt),
        ]
        grid = grid_tensor([images], [f"seed {seed}"], list(TRIGGER_COLUMNS))
        return io.NodeOutput(grid, torch.cat(images))


class StepComparisonGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StepComparisonGrid",
            display_name="Compare Intermediate Saves",
            category="training",
            description=(
                "Shows every save of one LoRA training run in one grid, so you can pick the best one "
                "without loading files by hand. It finds the intermediate saves <name>_<step> that "
                "save_every_steps wrote beside the final file and draws one row per save (oldest first, "
                "the final file last), with your instance token and without it, all with the same seed. "
                "Pick the earliest row that shows your subject well and leaves the no-token picture alone; "
                "later rows that look burnt or stiff are overtrained."),
            inputs=[
                io.Model.Input("model", tooltip="The base model the LoRA was trained on, straight from Load "
                                                "Checkpoint."),
                io.Clip.Input("clip", tooltip="The CLIP from the same Load Checkpoint."),
                io.Vae.Input("vae", tooltip="The VAE from Load Checkpoint; it turns the results into pictures."),
                io.String.Input(
                    "lora_name", default="skkmtn_lora.safetensors",
                    tooltip="The final LoRA file in models/loras: connect Train LoRA's lora_name output, or "
                            "type the name as Load LoRA lists it. Its saves <name>_<step> are found beside it."),
                io.String.Input(
                    "prompt", default=DEFAULT_PROMPT, multiline=True,
                    tooltip="What to draw. It must contain the instance token; the right column uses the "
                            "same prompt with the token removed."),
                io.String.Input(
                    "instance_token", default=DEFAULT_TOKEN,
                    tooltip="The trigger word the LoRA was trained on (LoadDataset's instance_token). It is "
                            "removed from the prompt for the right column."),
                io.String.Input(
                    "negative_prompt", default=DEFAULT_NEGATIVE, multiline=True,
                    tooltip="What to avoid in every picture, as in a negative CLIP Text Encode."),
                io.Int.Input(
                    "seed", default=0, min=0, max=MAX_SEED, control_after_generate=False,
                    tooltip="The noise every picture starts from. The same seed makes the rows comparable; "
                            "change it to check another one."),
                *sampling_inputs(),
                io.Float.Input(
                    "strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                    tooltip="How strongly each LoRA acts (on the model and the CLIP), as in Load LoRA. "
                            "1 as trained."),
            ],
            outputs=[
                io.Image.Output(display_name="grid",
                                tooltip="One row per save (labelled with its step), with and without the token: "
                                        "connect Preview Image or Save Image."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, prompt=None, instance_token=None):
        return token_check(prompt, instance_token)

    @classmethod
    def fingerprint_inputs(cls, lora_name=None, **_):
        # Reruns when a file behind an unchanged name is retrained. A connected lora_name comes
        # here as None; the training node before it decides then.
        if lora_name is None:
            return None
        try:
            final = lora_file(lora_name)
        except TrainerInputError:
            return lora_name  # execute reports the missing file
        files = [path for _, path in lora_saves(final)] + [final]
        return " ".join(f"{path} {os.stat(path).st_size} {os.stat(path).st_mtime_ns}" for path in files)

    @classmethod
    def execute(cls, model, clip, vae, lora_name, prompt, instance_token, negative_prompt, seed, steps, cfg,
                sampler_name, scheduler, width, height, strength) -> io.NodeOutput:
        from ..trainer_core.formats import load_lora
        from . import comfy_bridge as bridge
        problem = token_problem(prompt, instance_token)
        if problem:
            raise TrainerInputError(problem)
        bridge.check_sd1(model)
        final = lora_file(lora_name)
        saves = lora_saves(final) + [(None, final)]
        pictures = bridge.KSamplerPictures(vae, seed, steps, cfg, sampler_name, scheduler, width, height,
                                           count=2 * len(saves), node_id=cls.hidden.unique_id)
        no_token = without_token(prompt, instance_token)
        rows, labels = [], []
        for step, path in saves:
            state_dict, metadata = load_lora(path)
            labels.append(f"step {step}" if step is not None else final_label(metadata))
            with_lora = bridge.apply_lora(model, clip, state_dict, strength, strength)
            rows.append([pictures.picture(*with_lora, prompt, negative_prompt),
                         pictures.picture(*with_lora, no_token, negative_prompt)])
        token = instance_token.strip()
        grid = grid_tensor(rows, labels, [f"with {token}", f"without {token}"])
        return io.NodeOutput(grid)
