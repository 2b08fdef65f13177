"""Textual inversion and DreamArtist: new words for the text encoder, as files every UI loads.

An embedding is a few vectors that stand in for one word of a prompt. They are trained by
putting them where the word's token embeddings would go and letting the loss flow back into
them through the frozen text encoder; nothing else changes. In a caption the word is written
`embedding:<name>`, ComfyUI's own prompt syntax, and each backend reads it the way ComfyUI does.

DreamArtist (7eu7d7/DreamArtist) trains a positive `<name>` and a negative `<name>-neg` together:
each step the UNet sees the caption and the same caption with `<name>-neg`, and the loss is taken
on `e_neg + s * (e_pos - e_neg)`, classifier-free guidance at the training scale s. Used with
`<name>` in the positive prompt and `<name>-neg` in the negative one.

Files: safetensors with the single tensor `emb_params` [n, width] (kohya's layout, which ComfyUI,
A1111 and kohya load) plus string metadata, or A1111's `.pt` dict. The resume state lives in the
trainer's `.trainstate` sidecar, never in the embedding.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import TrainerInputError
from ..formats import atomic_write, safe_output_path

MODES = ("textual_inversion", "dreamartist")
CFG_CURVES = ("linear", "cos", "cos2")
FILE_FORMATS = ("safetensors", "a1111_pt")
SUFFIXES = {"safetensors": ".safetensors", "a1111_pt": ".pt"}
# What ComfyUI's embedding loader tries after the bare name (comfy/sd1_clip.py load_embed).
LOADER_EXTENSIONS = ("", ".safetensors", ".pt", ".bin")
NEGATIVE_SUFFIX = "-neg"
# A1111's learning rate for embeddings and DreamArtist's own.
DEFAULT_LEARNING_RATES = {"textual_inversion": 5e-3, "dreamartist": 3e-3}
# DreamArtist starts the negative embedding near the init word with this much noise.
NEGATIVE_INIT_NOISE = 1e-3
# The id A1111 writes as string_to_token: its "*" placeholder, which its loader ignores.
A1111_PLACEHOLDER_TOKEN = 265
METADATA_FORMAT = "sd1-trainer-embedding"
IDENTIFIER = "embedding:"
NAME_PATTERN = re.compile(r"^\w[\w-]*$")


def default_learning_rate(mode: str) -> float:
    return DEFAULT_LEARNING_RATES.get(mode, DEFAULT_LEARNING_RATES["textual_inversion"])


@dataclass
class EmbeddingConfig:
    """What to train. `vectors` per word (A1111: 1-4 for textual inversion; DreamArtist: 3 positive,
    6 negative). cfg_scale is DreamArtist's training guidance scale; with cfg_scale_high above 0 it
    rises from cfg_scale at t=0 to cfg_scale_high at t=999 along cfg_curve."""

    mode: str = "textual_inversion"
    vectors: int = 3
    negative_vectors: int = 6
    init_text: str = "*"
    cfg_scale: float = 3.0
    cfg_scale_high: float = 0.0
    cfg_curve: str = "linear"
    negative_lr_weight: float = 1.0
    file_format: str = "safetensors"

    def validate(self) -> None:
        _choice("mode", self.mode, MODES)
        _choice("cfg_curve", self.cfg_curve, CFG_CURVES)
        _choice("file_format", self.file_format, FILE_FORMATS)
        for field, value in (("vectors", self.vectors), ("negative_vectors", self.negative_vectors)):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 75:
                raise TrainerInputError(
                    f"{field} must be a whole number from 1 to 75 (got {value!r}): each vector takes one of "
                    f"the prompt's 75 tokens; 1-4 is usual for textual inversion, 3 positive / 6 negative "
                    f"for DreamArtist.")
        if not isinstance(self.init_text, str):
            raise TrainerInputError("init_text must be text, e.g. '*' or a word close to your subject.")
        for field in ("cfg_scale", "negative_lr_weight"):
            value = getattr(self, field)
            if not _number(value) or value <= 0:
                raise TrainerInputError(f"{field} must be a number > 0 (got {value!r}); DreamArtist uses "
                                        f"cfg_scale 3 and negative_lr_weight 1.")
        if not _number(self.cfg_scale_high) or self.cfg_scale_high < 0:
            raise TrainerInputError(f"cfg_scale_high must be a number >= 0 (got {self.cfg_scale_high!r}); 0 keeps "
                                    f"cfg_scale fixed.")

    @property
    def suffix(self) -> str:
        return SUFFIXES[self.file_format]

    def cfg_scales(self, timesteps: torch.Tensor, num_timesteps: int) -> torch.Tensor:
        """DreamArtist's training scale per sample: fixed, or from cfg_scale (t=0) to cfg_scale_high."""
        low = float(self.cfg_scale)
        if not self.cfg_scale_high or self.cfg_scale_high == low:
            return torch.full(timesteps.shape, low, device=timesteps.device)
        rate = timesteps.float() / (num_timesteps - 1)
        if self.cfg_curve == "cos":
            rate = torch.cos((rate - 1) * math.pi / 2)
        elif self.cfg_curve == "cos2":
            rate = 1 - torch.cos(rate * math.pi / 2)
        return low + (float(self.cfg_scale_high) - low) * rate


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _choice(name, value, options):
    if value not in options:
        raise TrainerInputError(f"{name} must be one of {', '.join(options)} (got {value!r}).")


# ---------------------------------------------------------------------------------------
# Names


def check_embedding_name(name) -> str:
    """The name as typed, or a clear error: it becomes a file name and the word in prompts."""
    if not isinstance(name, str) or not name.strip():
        raise TrainerInputError("the embedding name is empty: type the new word, e.g. 'skkmtn_emb'.")
    name = name.strip()
    if "/" in name or "\\" in name or ".." in name or os.path.isabs(name):
        raise TrainerInputError(
            f"the embedding name {name!r} has a path in it: give just the word (e.g. 'skkmtn_emb'); the file "
            f"always goes into the embeddings folder.")
    stem, extension = os.path.splitext(name)
    if extension.lower() in (".safetensors", ".pt", ".bin"):
        raise TrainerInputError(f"the embedding name {name!r} ends in {extension}: give the name without it "
                                f"({stem!r}); the file type is set by file_format.")
    if any(c.isspace() for c in name):
        raise TrainerInputError(
            f"the embedding name {name!r} has a space in it: prompts read embedding:<name> up to the first "
            f"space. Use '_' or '-' instead.")
    if not NAME_PATTERN.match(name):
        raise TrainerInputError(
            f"the embedding name {name!r} may only hold letters, digits, '_' and '-' (and not start with '-'): "
            f"other characters are read as prompt syntax or are not allowed in file names.")
    return name


def check_not_a_word(name: str, tokenize) -> None:
    """Refuse a name the tokenizer reads as one word it already knows (such as 'cat' or 'style'):
    A1111 and kohya call an embedding by its plain name, so every prompt with that word would
    get the embedding instead."""
    ids = tokenize(name)
    if len(ids) == 1:
        raise TrainerInputError(
            f"the embedding name {name!r} is an ordinary word the text encoder already knows. In A1111 every "
            f"prompt with that word would call the embedding: pick a made-up word such as '{name}_emb' or "
            f"'skkmtn'.")


def negative_name(name: str) -> str:
    return name + NEGATIVE_SUFFIX


def written_paths(path: str, dreamartist: bool) -> list:
    """The files a save at `path` writes: the embedding, and in DreamArtist mode <stem>-neg beside it."""
    if not dreamartist:
        return [path]
    stem, extension = os.path.splitext(path)
    return [path, negative_name(stem) + extension]


def placeholder(name: str) -> str:
    """How a caption names the embedding: ComfyUI's `embedding:<name>`."""
    return IDENTIFIER + name


def mention_pattern(name: str) -> re.Pattern:
    """`embedding:<name>` where ComfyUI's tokenizer reads exactly <name>: after the start or a
    space, and followed by a space, commas or the end."""
    return re.compile(r"(?<!\S)" + re.escape(IDENTIFIER + name) + r"(?=[\s,]|$)")


def clashing_files(name: str, folders, planned: set) -> list:
    """Files in `folders` (and their subfolders, as ComfyUI searches them) that ComfyUI's loader
    would find for `embedding:<name>`, other than the files this run writes (`planned`)."""
    planned = {os.path.abspath(p) for p in planned}
    found = []
    for folder in folders:
        for root, _, files in os.walk(folder, followlinks=True):
            present = set(files)
            for extension in LOADER_EXTENSIONS:
                path = os.path.abspath(os.path.join(root, name + extension))
                if name + extension in present and path not in planned:
                    found.append(path)
    return sorted(found)


# ---------------------------------------------------------------------------------------
# The trained vectors


class EmbeddingVectors(nn.Module):
    """The positive vectors [n, width] and, in DreamArtist mode, the negative ones."""

    def __init__(self, name: str, positive: torch.Tensor, negative: Optional[torch.Tensor] = None):
        super().__init__()
        self.name = name
        self.positive = nn.Parameter(positive.detach().clone().float())
        self.negative = None if negative is None else nn.Parameter(negative.detach().clone().float())

    def by_name(self) -> dict:
        vectors = {self.name: self.positive}
        if self.negative is not None:
            vectors[negative_name(self.name)] = self.negative
        return vectors

    @contextlib.contextmanager
    def attached(self, parts):
        """While attached, `parts.encode_text` reads `embedding:<name>` (and `<name>-neg`) as these
        vectors, so training, previews and samples all see them; the model is not touched."""
        if parts.encode_text_with_embeddings is None:
            raise TrainerInputError("this model backend cannot insert embedding vectors into prompts.")
        original = parts.encode_text
        parts.encode_text = lambda captions: parts.encode_text_with_embeddings(list(captions), self.by_name())
        try:
            yield
        finally:
            parts.encode_text = original


def initial_vectors(parts, init_text: str, count: int) -> torch.Tensor:
    """A1111's start: vector i is the init text's token embedding number i * tokens // count
    (zeros for an empty init text)."""
    ids = parts.tokenize(init_text) if init_text.strip() else []
    if not ids:
        width = parts.token_embeddings(parts.tokenize("*")).shape[-1]
        return torch.zeros(count, width)
    rows = parts.token_embeddings(ids).detach().float().cpu()
    return torch.stack([rows[i * len(ids) // count] for i in range(count)])


# ---------------------------------------------------------------------------------------
# Files


def save_embedding(path, vectors: torch.Tensor, name: str, step: int, file_format: str, metadata: dict,
                   overwrite=True):
    """One embedding file, written atomically: safetensors {"emb_params"} + metadata, or A1111's .pt."""
    tensor = vectors.detach().float().cpu().contiguous()
    if file_format == "safetensors":
        from safetensors.torch import save_file
        text = {"format": METADATA_FORMAT, "name": name, "step": str(step), "vectors": str(tensor.shape[0]),
                **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
        modelspec = {"modelspec.sai_model_spec": "1.0.0",
                     "modelspec.architecture": "stable-diffusion-v1/textual-inversion",
                     "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
                     "modelspec.title": name}
        atomic_write(path, lambda tmp: save_file({"emb_params": tensor}, tmp, metadata={**text, **modelspec}),
                     overwrite=overwrite)
        return
    payload = {
        "string_to_token": {"*": A1111_PLACEHOLDER_TOKEN},
        "string_to_param": {"*": tensor},
        "name": name,
        "step": int(step),
        "sd_checkpoint": metadata.get("sd_checkpoint") or None,
        "sd_checkpoint_name": metadata.get("sd_checkpoint_name") or None,
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp), overwrite=overwrite)


def load_embedding(path) -> tuple:
    """(vectors [n, width], step, metadata) from a safetensors or A1111 .pt embedding file."""
    if not os.path.isfile(path):
        raise TrainerInputError(f"embedding file {path} does not exist.")
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(path, framework="pt") as f:
                metadata = dict(f.metadata() or {})
                keys = list(f.keys())
                key = "emb_params" if "emb_params" in keys else (keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise TrainerInputError(
                        f"{os.path.basename(path)} holds {keys[:4]} and no 'emb_params': it is not a "
                        f"single-word SD1 embedding.")
                vectors = f.get_tensor(key)
            step = int(metadata.get("step", 0) or 0)
        else:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            params = payload.get("string_to_param") if isinstance(payload, dict) else None
            if not isinstance(params, dict) or len(params) != 1:
                raise TrainerInputError(
                    f"{os.path.basename(path)} is not an A1111 embedding (no single string_to_param entry).")
            vectors = next(iter(params.values()))
            step = int(payload.get("step") or 0)
            metadata = {k: v for k, v in payload.items() if isinstance(v, str)}
    except TrainerInputError:
        raise
    except Exception as error:  # safetensors and torch raise several unrelated types for foreign files
        raise TrainerInputError(f"{os.path.basename(path)} could not be read as an embedding: {error}") from error
    if vectors.ndim != 2:
        raise TrainerInputError(f"{os.path.basename(path)} holds a {list(vectors.shape)} tensor, not [vectors, width].")
    return vectors.float(), step, metadata


# ---------------------------------------------------------------------------------------
# The dataset as an embedding sees it


def embedding_dataset(dataset, name: str, template_lines: Optional[list]):
    """A copy of `dataset` whose captions call the embedding: [name] in the template (when one is
    given) becomes `embedding:<name>`, and the dataset's own trigger word in the caption files
    becomes `embedding:<name>` too (in a template's [filewords] a tag that is only the trigger
    word is left out, as [name] brings it). The incoming dataset is not changed: ComfyUI may
    hand the same cached object to other nodes."""
    from ..dataset import mentions
    trigger = dataset.config.instance_token.strip()
    word = placeholder(name)
    templated = dataset.config.template_lines if template_lines is None else template_lines
    view = copy.copy(dataset)
    view.config = dataclasses.replace(dataset.config, instance_token=word, template_lines=templated)
    pattern = re.compile(rf"(?<!\w){re.escape(trigger)}(?!\w)", re.IGNORECASE)

    def rewrite(text):
        if text is None or not trigger or trigger == word or not mentions(text, trigger):
            return text
        if templated:
            tags = [tag.strip() for tag in text.split(",")]
            text = ", ".join(tag for tag in tags if tag and tag.lower() != trigger.lower())
        return pattern.sub(word, text) or None

    view.items = [dataclasses.replace(item, text=rewrite(item.text)) for item in dataset.items]
    return view


def negative_captions(captions, name: str) -> list:
    """DreamArtist's negative prompt: the same caption with `embedding:<name>-neg` for `embedding:<name>`."""
    pattern = mention_pattern(name)
    return [pattern.sub(placeholder(negative_name(name)), caption) for caption in captions]


# ---------------------------------------------------------------------------------------
# The job: how the trainer trains, saves and resumes an embedding


class EmbeddingJob:
    kind = "embedding"
    other_kind_hint = "LoRA .safetensors files continue with LoRATrain, hypernetwork .pt files with HypernetTrain"
    # Gradients flow through the text encoder into the vectors, so captions are encoded each step.
    trains_text_encoder = True

    def __init__(self, parts, embedding_config: EmbeddingConfig, train_config, dataset):
        if parts.encode_text_with_embeddings is None or parts.tokenize is None or parts.token_embeddings is None:
            raise TrainerInputError("this model backend cannot train embeddings (no way to insert vectors).")
        self.parts, self.config, self.train_config, self.dataset = parts, embedding_config, train_config, dataset
        self.name = check_embedding_name(train_config.output_name)
        check_not_a_word(self.name, parts.tokenize)
        self.suffix = embedding_config.suffix
        positive = initial_vectors(parts, embedding_config.init_text, embedding_config.vectors)
        negative = None
        if self.dreamartist:
            negative = initial_vectors(parts, embedding_config.init_text, embedding_config.negative_vectors)
            negative = negative + NEGATIVE_INIT_NOISE * torch.randn(negative.shape)
        self.module = EmbeddingVectors(self.name, positive, negative).to(parts.device)

    @property
    def dreamartist(self) -> bool:
        return self.config.mode == "dreamartist"

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, **asdict(self.config)}

    def output_path(self, name: str) -> str:
        return safe_output_path(self.train_config.output_dir, name, self.suffix, overwrite=True)

    def intermediate_name(self, output_name: str, step: int) -> str:
        """A1111's name for a save during training: <name>-<step>."""
        return f"{output_name}-{step}"

    def negative_path(self, path: str) -> str:
        return written_paths(path, True)[1]

    def written_paths(self, path: str) -> list:
        return written_paths(path, self.dreamartist)

    def attached(self):
        return self.module.attached(self.parts)

    def param_groups(self) -> list:
        lr = self.train_config.learning_rate
        groups = [{"params": [self.module.positive], "lr": lr}]
        if self.dreamartist:
            groups.append({"params": [self.module.negative], "lr": lr * self.config.negative_lr_weight})
        return groups

    def predict(self, noisy, timesteps, captions):
        """The model output the loss is taken on. DreamArtist: the UNet on the caption and on its
        negative in one batch, combined as guidance at the training scale."""
        parts = self.parts
        if not self.dreamartist:
            return parts.predict_noise(noisy, timesteps, parts.encode_text(captions))
        context = parts.encode_text(negative_captions(captions, self.name) + list(captions))
        output = parts.predict_noise(torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]), context)
        negative, positive = output.float().chunk(2)
        scale = self.config.cfg_scales(timesteps, len(parts.alphas_cumprod)).view(-1, 1, 1, 1)
        return negative + scale * (positive - negative)

    def save(self, path, step, key, optimizer_name, optimizer_state):
        metadata = {"mode": self.config.mode, "sd_checkpoint": self.parts.base_model_hash[:10],
                    "sd_checkpoint_name": self.parts.base_model_name, "training_key": key}
        written = []
        try:
            for file_path, vectors in zip(self.written_paths(path), self.module.by_name().values()):
                name = os.path.splitext(os.path.basename(file_path))[0]
                save_embedding(file_path, vectors, name, step, self.config.file_format, metadata)
                written.append(file_path)
        except BaseException:
            for done in written:
                with contextlib.suppress(OSError):
                    os.remove(done)
            raise
        return written

    def load_weights(self, path) -> int:
        paths = self.written_paths(path)
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            stem = os.path.splitext(os.path.basename(path))[0]
            hint = (f" Pick the positive file, {stem[:-len(NEGATIVE_SUFFIX)]}{self.suffix}, to continue the pair."
                    if stem.endswith(NEGATIVE_SUFFIX) else "")
            raise TrainerInputError(
                f"{os.path.basename(missing[0])} is missing: a DreamArtist run continues from the pair "
                f"{os.path.basename(path)} and {os.path.basename(self.negative_path(path))}.{hint}")
        step = None
        for file_path, (name, parameter) in zip(paths, self.module.by_name().items()):
            vectors, file_step, _ = load_embedding(file_path)
            if tuple(vectors.shape) != tuple(parameter.shape):
                field = "vectors" if name == self.name else "negative_vectors"
                raise TrainerInputError(
                    f"{os.path.basename(file_path)} has {vectors.shape[0]} vectors of width {vectors.shape[1]}, "
                    f"this run {parameter.shape[0]} of width {parameter.shape[1]}: set {field} to "
                    f"{vectors.shape[0]} to continue it (a different width is another kind of model).")
            with torch.no_grad():
                parameter.copy_(vectors.to(parameter.device))
            step = file_step if step is None else step
        return step

    def read_foreign_optimizer_state(self, path):
        return None

    def file_state_dict(self):
        return None

    def check_clashes(self, folders, planned_paths, overwrite: bool) -> None:
        """Refuse to write where ComfyUI would find another file for the same prompt word, or
        over an embedding this trainer did not make (unless overwrite is on)."""
        from ..train import STATE_SUFFIX
        written = [file_path for path in planned_paths for file_path in self.written_paths(path)]
        for file_path in written:
            name = os.path.splitext(os.path.basename(file_path))[0]
            clashes = clashing_files(name, folders, set(written))
            if clashes:
                raise TrainerInputError(
                    f"an embedding named {name!r} already exists ({clashes[0]}) and embedding:{name} would "
                    f"find it instead of the new one. Pick another name, or delete or rename that file.")
        if overwrite:
            return
        for path in planned_paths:
            ours = os.path.exists(path + STATE_SUFFIX)
            for file_path in self.written_paths(path):
                if os.path.exists(file_path) and not ours:
                    raise TrainerInputError(
                        f"an embedding named {os.path.splitext(os.path.basename(file_path))[0]!r} already exists "
                        f"({file_path}). Pick another name, or turn on overwrite to replace it.")
