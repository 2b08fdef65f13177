"""LoadDataset and RegImages: a folder or an IMAGE batch in, a trainer_core dataset out."""
from __future__ import annotations

import os

import numpy as np
from comfy_api.latest import io
from PIL import Image

from ..trainer_core.dataset import FOLLOW_DATASET_RESOLUTION, DatasetConfig, ImageDataset, regularization_set
from ..trainer_core.errors import TrainerInputError
from .types import RegularizationSet, TrainingDataset

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_DATASET = "(sample) skkmtn_sample"
SAMPLE_DATASET_FOLDER = os.path.join(PACK_ROOT, "sample_dataset")
NO_FOLDER = "(none)"
# An IMAGE batch is connected: its own node's cache key already tracks changes upstream.
FROM_CONNECTED_IMAGES = "connected images"


def input_subfolders() -> list:
    """The folders inside ComfyUI's input folder, where users put their training images."""
    import folder_paths
    root = folder_paths.get_input_directory()
    if not os.path.isdir(root):
        return []
    return sorted(name for name in os.listdir(root)
                  if not name.startswith(".") and os.path.isdir(os.path.join(root, name)))


def resolve_folder(choice: str, folder_path: str = "") -> str:
    """The folder to read: `folder_path` when given, else the chosen input subfolder."""
    if folder_path and folder_path.strip():
        return os.path.expanduser(folder_path.strip())
    if choice == SAMPLE_DATASET:
        return SAMPLE_DATASET_FOLDER
    if choice == NO_FOLDER:
        return ""
    import folder_paths
    root = os.path.realpath(folder_paths.get_input_directory())
    path = os.path.realpath(os.path.join(root, choice))
    if os.path.commonpath([root, path]) != root:
        raise TrainerInputError(
            f"folder {choice!r} is outside ComfyUI's input folder: pick one of its subfolders, or "
            f"type the full path into folder_path.")
    return path


def to_pil_images(images) -> list:
    """A ComfyUI IMAGE batch ([B, H, W, C] floats in 0..1) as PIL images."""
    pixels = (images.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]


def caption_lines(captions: str):
    """One caption per line, or None (every image gets the instance prompt) when empty."""
    lines = [line.strip() for line in (captions or "").strip("\n").split("\n")]
    return lines if any(lines) else None


def _instance_token_problem(instance_token):
    try:
        DatasetConfig(instance_token=instance_token).validate()
    except TrainerInputError as problem:
        return str(problem)
    return True


class LoadDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadDataset",
            display_name="Load Training Dataset",
            category="training",
            description=(
                "Collects the pictures to train on and their captions. Put 10-30 pictures of your "
                "subject in a folder inside ComfyUI's input folder, each with an optional caption "
                "file of the same name (photo1.png + photo1.txt), then pick the folder here. Connect "
                "the output to LoRATrain."),
            inputs=[
                io.Combo.Input(
                    "folder", options=[SAMPLE_DATASET] + input_subfolders(), default=SAMPLE_DATASET,
                    tooltip="The folder of training pictures: a folder inside ComfyUI's input folder, or "
                            "the small sample set that comes with this pack (to try training out). "
                            "Subfolders named like 10_name give their pictures 10 repeats (kohya style)."),
                io.String.Input(
                    "instance_token", default="skkmtn",
                    tooltip="A made-up word that will mean your subject, e.g. skkmtn. Pick a word the "
                            "model does not know yet. After training, write it in your prompt to get "
                            "the subject. Captions that lack it get it added at the front."),
                io.String.Input(
                    "class_token", default="",
                    tooltip="What kind of thing the subject is, e.g. girl, dog, creature (optional). "
                            "A picture without a caption file is captioned '<instance_token> "
                            "<class_token>'."),
                io.String.Input(
                    "caption_extension", default=".txt",
                    tooltip="The ending of the caption files next to the pictures: .txt or .caption."),
                io.Int.Input(
                    "repeats", default=1, min=1, max=1000,
                    tooltip="How many times each picture is shown per pass over the folder. Only "
                            "matters when mixing folders; the total training length is LoRATrain's steps."),
                io.Int.Input(
                    "resolution", default=512, min=64, max=2048, step=64,
                    tooltip="The size pictures are trained at (a multiple of 64). SD1.x models were "
                            "made for 512; larger is slower and needs more memory."),
                io.Boolean.Input(
                    "bucketing", default=True,
                    tooltip="On: keep each picture's shape (wide stays wide) by training it at the "
                            "closest size with about resolution x resolution pixels. Off: square crops."),
                io.Boolean.Input(
                    "flip", default=False,
                    tooltip="Also train on mirrored pictures (randomly, half the time). Good for styles "
                            "and symmetric subjects; leave off if left and right matter (text, a "
                            "parting on one side)."),
                io.Boolean.Input(
                    "shuffle_tags", default=False,
                    tooltip="For comma-separated tag captions: shuffle the tag order each time, so no "
                            "tag depends on its position."),
                io.Int.Input(
                    "keep_tokens", default=0, min=0, max=64,
                    tooltip="How many tags at the start of each caption stay in place when tags are "
                            "shuffled (e.g. 1 keeps the first tag, usually the instance token, first)."),
                io.Float.Input(
                    "caption_dropout", default=0.0, min=0.0, max=1.0, step=0.01,
                    tooltip="How often (0 to 1) a picture is trained with only '<instance_token> "
                            "<class_token>' instead of its caption, so the token alone calls up the "
                            "subject. 0 = never; 0.05-0.1 is common."),
                io.String.Input(
                    "folder_path", default="", optional=True,
                    tooltip="Optional: the full path of a folder anywhere on this computer. When filled "
                            "in, it is used instead of 'folder'."),
                io.Image.Input(
                    "images", optional=True,
                    tooltip="Optional: pictures made or loaded elsewhere in the workflow. When "
                            "connected, they are used instead of any folder."),
                io.String.Input(
                    "captions", default="", multiline=True, optional=True,
                    tooltip="Optional, with 'images': one caption per line, in the order of the "
                            "pictures. Leave empty to caption every picture '<instance_token> <class_token>'."),
            ],
            outputs=[TrainingDataset.Output(
                display_name="dataset",
                tooltip="The pictures and captions, ready for LoRATrain (or HypernetTrain).")],
        )

    @classmethod
    def validate_inputs(cls, instance_token=None):
        if instance_token is None:
            return True
        return _instance_token_problem(instance_token)

    @classmethod
    def fingerprint_inputs(cls, **inputs):
        # ComfyUI passes connected inputs as None here; "images" is present only when connected.
        if "images" in inputs:
            return FROM_CONNECTED_IMAGES
        # The folder's files (names, sizes, times) and captions: editing any of them reruns the node.
        return cls._dataset(**inputs).fingerprint()

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        return io.NodeOutput(cls._dataset(**inputs))

    @classmethod
    def _dataset(cls, folder=SAMPLE_DATASET, instance_token="", class_token="", caption_extension=".txt",
                 repeats=1, resolution=512, bucketing=True, flip=False, shuffle_tags=False, keep_tokens=0,
                 caption_dropout=0.0, folder_path="", images=None, captions=""):
        config = DatasetConfig(
            instance_token=instance_token, class_token=class_token, caption_extension=caption_extension,
            repeats=repeats, resolution=resolution, bucketing=bucketing, flip=flip,
            shuffle_tags=shuffle_tags, keep_tokens=keep_tokens, caption_dropout=caption_dropout)
        if images is not None:
            return ImageDataset.from_images(to_pil_images(images), caption_lines(captions), config)
        config.folder = resolve_folder(folder, folder_path)
        return ImageDataset.from_folder(config)


class RegImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RegImages",
            display_name="Regularization Images",
            category="training",
            description=(
                "Optional pictures of the subject's general kind (e.g. other girls, or blank "
                "pictures) trained alongside your subject with one plain prompt. They keep the "
                "model's idea of that kind unchanged, so the new look appears only with your "
                "instance token (prior preservation). Connect to LoRATrain's regularization input."),
            inputs=[
                io.String.Input(
                    "class_prompt", default="",
                    tooltip="The prompt these pictures are trained with: the kind of thing, without "
                            "your instance token, e.g. 'a girl' or 'simple illustration of a creature'."),
                io.Combo.Input(
                    "folder", options=[NO_FOLDER] + input_subfolders(), default=NO_FOLDER,
                    tooltip="A folder inside ComfyUI's input folder with class pictures, or (none)."),
                io.Int.Input(
                    "blank_count", default=0, min=0, max=10000,
                    tooltip="How many blank (transparent, shown as white) pictures to add. Guides use "
                            "these as cheap regularization when there are no class pictures. 0 = none."),
                io.Float.Input(
                    "prior_loss_weight", default=1.0, min=0.01, max=10.0, step=0.01,
                    tooltip="How much these pictures count compared with your subject's pictures. 1.0 "
                            "is the usual value; lower it if the subject learns too slowly."),
                io.Int.Input(
                    "resolution", default=FOLLOW_DATASET_RESOLUTION, min=0, max=2048, step=64,
                    tooltip="The size these pictures are trained at. 0 (the default): the same as "
                            "LoadDataset's resolution, which is almost always right."),
                io.Boolean.Input(
                    "use_caption_files", default=False,
                    tooltip="On: a folder picture with a caption file (same name, .txt) is trained with "
                            "that caption exactly as written, the others with class_prompt. Off: every "
                            "picture gets class_prompt and caption files are ignored."),
                io.String.Input(
                    "folder_path", default="", optional=True,
                    tooltip="Optional: the full path of a folder of class pictures anywhere on this "
                            "computer, used instead of 'folder'."),
                io.Image.Input(
                    "images", optional=True,
                    tooltip="Optional: class pictures made in this workflow (e.g. generated by the "
                            "base model from class_prompt). Added to the folder's and blank pictures."),
            ],
            outputs=[RegularizationSet.Output(
                display_name="regularization",
                tooltip="Class pictures and their weight, for LoRATrain's regularization input.")],
        )

    @classmethod
    def validate_inputs(cls, class_prompt=None):
        if class_prompt is None or class_prompt.strip():
            return True
        return ("class_prompt is empty: write the prompt that describes these pictures, e.g. 'a girl' "
                "(the kind of thing your subject is, without the instance token).")

    @classmethod
    def fingerprint_inputs(cls, **inputs):
        if "images" in inputs:
            return FROM_CONNECTED_IMAGES
        regularization = cls._regularization(**inputs)
        return f"{regularization.dataset.fingerprint()} {regularization.prior_loss_weight}"

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        return io.NodeOutput(cls._regularization(**inputs))

    @classmethod
    def _regularization(cls, class_prompt="", folder=NO_FOLDER, blank_count=0, prior_loss_weight=1.0,
                        resolution=FOLLOW_DATASET_RESOLUTION, use_caption_files=False, folder_path="",
                        images=None):
        return regularization_set(
            folder=resolve_folder(folder, folder_path) or None,
            images=None if images is None else to_pil_images(images),
            class_prompt=class_prompt, prior_loss_weight=prior_loss_weight, resolution=resolution,
            blank_count=blank_count, use_caption_files=use_caption_files)
