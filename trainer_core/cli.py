"""`python -m trainer_core train`: the same trainer as the ComfyUI nodes, from a terminal
(and `python -m trainer_core merge`: MergeLoRAToCkpt's merge, on files).

With no --model it trains the demo model (a small model that knows only coloured shapes,
trainer_core/demo.py) on the sample dataset shipped with the pack, so the whole path (dataset ->
train -> save -> before/after samples) runs on a CPU in about a minute and the samples show the
new concept appear with the trigger word only. Give --model a diffusers folder or an SD1.x
.safetensors/.ckpt file for real training.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import fields

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .adapters.embedding import (EmbeddingConfig, EmbeddingVectors, check_embedding_name, default_learning_rate,
                                  embedding_dataset, placeholder)
from .adapters.hypernetwork import Hypernetwork, HypernetworkConfig
from .adapters.lora import NETWORK_TYPES, LoRAConfig
# The module, not its functions: diffusers itself is imported only when a model is built.
from .backends import diffusers as backend
from .config import TrainConfig
from . import demo
from .dataset import DatasetConfig, ImageDataset, check_folder, regularization_set
from .errors import TrainerInputError, TrainingCancelled, TrainingStopped, name_of, names_as
from .formats import UNET_PREFIX, atomic_write, file_short_hash, load_lora, safe_output_path
from .merge import SAVE_PRECISIONS, checkpoint_lora_keys, lora_hash, merge_into_checkpoint, merge_metadata
from .plots import labelled_grid, loss_chart
from .sampling import sample_images
from .prompt_templates import read_template
from .jobs import HypernetworkJob, LoRAJob
from .train import Callbacks, train_embedding, train_hypernetwork, train_lora, trained_already

ADAPTERS = ("lora", "hypernetwork", "embedding", "dreamartist")
# The config section each adapter reads its options from, and the default output name's suffix.
ADAPTER_SECTIONS = {"lora": "lora", "hypernetwork": "hypernetwork", "embedding": "embedding",
                    "dreamartist": "embedding"}
# The adapters whose finished run the CLI recognises before loading the model.
PRECHECKED_JOBS = {"lora": LoRAJob, "hypernetwork": HypernetworkJob}
OUTPUT_SUFFIXES = {"lora": "lora", "hypernetwork": "hypernet", "embedding": "emb", "dreamartist": "da"}

# The demo model's settings; with the sample dataset also its class word and captioned
# regularization set (words only the demo model knows).
DEMO_DEFAULTS = {"resolution": demo.SIZE, "steps": 500, "save_every_steps": 250}
# A LoRA on the demo model: twice the usual rate, so that the creature shows within a minute.
DEMO_LORA_LEARNING_RATE = 2e-3

log = logging.getLogger("trainer_core")


# The option each flag sets, so the trainer's messages name the flag the user typed.
CLI_FLAGS = {
    "folder": "--data", "instance_token": "--token", "class_token": "--class-token", "resolution": "--resolution",
    "steps": "--steps", "learning_rate": "--lr", "rank": "--rank", "alpha": "--alpha",
    "train_text_encoder": "--train-text-encoder", "batch_size": "--batch-size",
    "gradient_accumulation": "--gradient-accumulation", "optimizer": "--optimizer", "precision": "--precision",
    "gradient_checkpointing": "--gradient-checkpointing", "save_every_steps": "--save-every", "seed": "--seed",
    "resume_from": "--resume", "class_prompt": "--class-prompt", "reg_folder": "--reg-data",
    "blank_count": "--reg-blank", "use_caption_files": "--reg-captions",
    "ignore_caption_files": "--ignore-captions", "layer_structure": "--layer-structure",
    "activation": "--activation", "output_dir": "--output-dir", "output_name": "--name",
    "overwrite": "--overwrite", "force_retrain": "--force-retrain", "vectors": "--vectors",
    "init_text": "--init-text", "network_type": "--network-type", "conv_rank": "--conv-rank",
    "conv_alpha": "--conv-alpha", "factor": "--factor",
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every flag's help ends with its default. Flags whose default depends on other flags
    (None or "") say it in their own words instead of "(default: None)"."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default in (None, "", argparse.SUPPRESS) or not action.option_strings:
            return text
        if action.default is False:
            return text + " (default: off)"
        return text + " (default: %(default)s)"


def _default(cls, name):
    return next(f.default for f in fields(cls) if f.name == name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer_core", description=__doc__,
                                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a LoRA, a hypernetwork or an embedding",
                           formatter_class=_HelpFormatter,
                           description="Train a LoRA, a hypernetwork or an embedding. A flag given on the command line "
                                       "wins over the same option in --config.")
    add = train.add_argument
    demo_model = "with the demo model"
    add("--config", help="JSON file with sections dataset/train/lora/hypernetwork/regularization; "
                         "default: none")
    add("--model", default="", help="diffusers folder or SD1.x .safetensors/.ckpt checkpoint; "
                                   "default: the built-in demo model")
    add("--adapter", choices=ADAPTERS, default="lora",
        help="what to train; embedding: textual inversion; dreamartist: a positive + negative embedding pair")
    add("--data", default="", help="folder of images with .txt captions; default: the sample dataset")
    add("--token", default="", help="instance token (trigger word) tied to your subject; default: skkmtn, "
                                   "the sample dataset's")
    add("--class-token", default="", help="class word of the subject, e.g. girl; default: none ('circle' with the "
                                         "demo model and the sample dataset)")
    add("--ignore-captions", action="store_true",
        help="train every image with the instance prompt (--token --class-token) instead of its caption file, "
             "as the demo model's run on the sample dataset does")
    add("--resolution", type=int, help=f"training size in pixels, a multiple of 64; default: "
                                      f"{_default(DatasetConfig, 'resolution')} "
                                      f"({DEMO_DEFAULTS['resolution']} {demo_model})")
    add("--steps", type=int, help=f"optimizer steps in total; default: {_default(TrainConfig, 'steps')} "
                                 f"({DEMO_DEFAULTS['steps']} {demo_model})")
    add("--lr", type=float, help=f"learning rate (LoRA UNet / hypernetwork); default: "
                                f"{_default(TrainConfig, 'learning_rate'):g} for a LoRA "
                                f"({DEMO_LORA_LEARNING_RATE:g} {demo_model}); 1e-05 for a hypernetwork "
                                f"(0.001 {demo_model})")
    add("--rank", type=int, help=f"LoRA rank (its size); default: {_default(LoRAConfig, 'rank')}")
    add("--alpha", type=float, help=f"LoRA alpha; the LoRA is scaled by alpha / rank; default: "
                                   f"{_default(LoRAConfig, 'alpha'):g}")
    add("--network-type", choices=NETWORK_TYPES,
        help=f"lora, or a LyCORIS type: locon (+ the ResNet convolutions), loha, lokr (needs lycoris-lora); "
             f"default: {_default(LoRAConfig, 'network_type')}")
    add("--conv-rank", type=int, help=f"locon/loha/lokr: rank of the 3x3 convolutions, 0 leaves them out; "
                                     f"default: {_default(LoRAConfig, 'conv_rank')}")
    add("--conv-alpha", type=float, help=f"locon/loha/lokr: alpha of the 3x3 convolutions; default: "
                                        f"{_default(LoRAConfig, 'conv_alpha'):g}")
    add("--factor", type=int, help=f"lokr: size of the small Kronecker factor, -1 chosen per layer; default: "
                                  f"{_default(LoRAConfig, 'factor')}")
    add("--train-text-encoder", action="store_true", help="also train the text encoder (LoRA only)")
    add("--batch-size", type=int, help=f"pictures per step; default: {_default(TrainConfig, 'batch_size')}")
    add("--gradient-accumulation", type=int,
        help=f"batches added up per optimizer step; default: {_default(TrainConfig, 'gradient_accumulation')}")
    add("--optimizer", choices=("AdamW", "AdamW8bit", "Prodigy"),
        help=f"default: {_default(TrainConfig, 'optimizer')}")
    add("--precision", choices=("auto", "fp32", "fp16", "bf16"),
        help=f"number format while training; auto: fp16/bf16 on a GPU; on a CPU bf16 where it has bf16 units "
             f"and a quick timing of the model shows it faster, else fp32; default: "
             f"{_default(TrainConfig, 'precision')}")
    add("--gradient-checkpointing", nargs="?", const="on", choices=("auto", "on", "off"),
        help=f"recompute activations in the backward pass: less memory for about 20-30%% more time; auto: on "
             f"only when the memory estimate says training would not fit; the flag alone means on; default: "
             f"{_default(TrainConfig, 'gradient_checkpointing')}")
    add("--save-every", type=int, dest="save_every_steps",
        help=f"also save every this many steps as <name>_<step>; 0: only the final file; default: "
             f"{_default(TrainConfig, 'save_every_steps')} ({DEMO_DEFAULTS['save_every_steps']} {demo_model})")
    add("--seed", type=int, help=f"seed of every random choice; default: {_default(TrainConfig, 'seed')}")
    add("--resume", default="", help="continue a file saved by an earlier run up to --steps (e.g. a finished "
                                    "run with more --steps); default: start fresh")
    add("--class-prompt", default="", help="prompt of the regularization images, e.g. 'a photo of a girl'; default: "
                                          f"none ('{demo.CLASS}' with the demo model and the sample dataset)")
    add("--reg-data", default="", help="folder of class (regularization) images; default: none (with the demo "
                                       "model and the sample dataset: its captioned set, sample_regularization)")
    add("--reg-blank", type=int, default=0, help="number of blank 'transparent' regularization images")
    add("--reg-captions", action="store_true",
        help="train each --reg-data image that has a caption file with that caption as written "
             "(the others use --class-prompt)")
    add("--layer-structure", default="", help=f"hypernetwork layer structure; default: "
                                              f"{_default(HypernetworkConfig, 'layer_structure')}")
    add("--activation", default="", help=f"hypernetwork activation; default: "
                                         f"{_default(HypernetworkConfig, 'activation')}")
    add("--vectors", type=int, help=f"embedding vectors per word; default: {_default(EmbeddingConfig, 'vectors')}")
    add("--init-text", default=None, help=f"word(s) the embedding vectors start from; default: "
                                         f"{_default(EmbeddingConfig, 'init_text')}")
    add("--template", default="subject_filewords",
        help="A1111 prompt template for embeddings ([name] = the embedding), a shipped name or a .txt path")
    add("--output-dir", default="runs", help="folder the trained files go to")
    add("--name", default="", help="output file name (for an embedding: the new word); default: <token>_lora, "
                                  "<token>_hypernet, <token>_emb or <token>_da")
    add("--overwrite", action="store_true",
        help="replace files of the same name that a DIFFERENT training (other settings or pictures) wrote; "
             "without it such a clash stops with a message")
    add("--force-retrain", action="store_true",
        help="train again even though a file trained with exactly these settings exists (without it that "
             "file is reused and nothing is trained); replaces only that run's own files")
    add("--device", default="", help="cpu, cuda, cuda:1 ...; default: cuda if present")

    merge = sub.add_parser("merge", help="bake a LoRA into an SD1.x checkpoint", formatter_class=_HelpFormatter,
                           description="Bake a kohya LoRA into a single-file SD1.x checkpoint and save it as "
                                       "a new checkpoint, as the MergeLoRAToCkpt node does.")
    merge.add_argument("--model", required=True, help="the SD1.x base checkpoint (.safetensors)")
    merge.add_argument("--lora", required=True, help="the kohya LoRA (.safetensors) to bake in")
    merge.add_argument("--output", required=True, help="the merged checkpoint to write (.safetensors is added)")
    merge.add_argument("--strength-model", type=float, default=1.0,
                       help="how strongly the LoRA changes the UNet: 1 as trained, 0 not at all")
    merge.add_argument("--strength-clip", type=float, default=1.0,
                       help="how strongly the LoRA changes the text encoder, if it trained one")
    merge.add_argument("--precision", choices=tuple(SAVE_PRECISIONS), default="fp16",
                       help="number format of the saved file: fp16 is the usual 2 GB SD1.x file, fp32 exact")
    merge.add_argument("--overwrite", action="store_true",
                       help="replace an existing file that is not this same merge; without it such a clash "
                            "stops with a message (the same merge again is kept, not rewritten)")
    return parser


# The node's field each merge flag stands for, so the shared messages name the flag.
MERGE_FLAGS = {"output_name": "--output", "overwrite": "--overwrite", "strength_model": "--strength-model",
               "strength_clip": "--strength-clip"}


def run_merge(args) -> int:
    """The MergeLoRAToCkpt node's merge, on files."""
    model = os.path.abspath(args.model)
    if not (os.path.isfile(model) and model.lower().endswith(".safetensors")):
        raise TrainerInputError(f"--model {args.model} is not a .safetensors checkpoint file: give the SD1.x "
                                f"checkpoint to merge into.")
    lora_state_dict, _ = load_lora(args.lora)
    base = load_file(model)
    keys = checkpoint_lora_keys(base)
    if not any(name.startswith(UNET_PREFIX) for name in keys):
        raise TrainerInputError(f"--model {args.model} has no SD1.x UNet attention layers: give a single-file "
                                f"SD1.x checkpoint.")
    output = safe_output_path(os.path.dirname(os.path.abspath(args.output)), os.path.basename(args.output),
                              ".safetensors", overwrite=True)
    metadata = merge_metadata(os.path.splitext(os.path.basename(output))[0], os.path.basename(model),
                              file_short_hash(model), os.path.basename(args.lora), lora_hash(lora_state_dict),
                              args.strength_model, args.strength_clip, args.precision)
    merge_into_checkpoint(base, lora_state_dict, keys, args.strength_model, args.strength_clip, args.precision,
                          output, metadata, args.overwrite)
    return 0


def _sections(args) -> dict:
    sections = {"dataset": {}, "train": {}, "lora": {}, "hypernetwork": {}, "embedding": {}, "regularization": {}}
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                loaded = json.load(f)
        except (OSError, ValueError) as error:
            raise TrainerInputError(f"--config {args.config} could not be read: {error}") from error
        if not isinstance(loaded, dict) or not all(isinstance(v, dict) for v in loaded.values()):
            raise TrainerInputError(
                f"--config {args.config} must be a JSON object of sections, e.g. "
                f'{{"train": {{"steps": 1400}}, "lora": {{"rank": 4}}}}')
        unknown = sorted(set(loaded) - set(sections))
        if unknown:
            raise TrainerInputError(f"{args.config}: unknown section(s) {unknown}; use {sorted(sections)}")
        for name, values in loaded.items():
            sections[name].update(values)
    return sections


def _set(section: dict, key: str, value):
    """A command-line flag overrides the config file only when it was given."""
    if value is not None and value != "" and value is not False:
        section[key] = value


def configs_from_args(args) -> dict:
    s = _sections(args)
    demo_model = not args.model
    if demo_model:
        for key in ("resolution",):
            s["dataset"].setdefault(key, DEMO_DEFAULTS[key])
        for key in ("steps", "save_every_steps"):
            s["train"].setdefault(key, DEMO_DEFAULTS[key])
    data = args.data or s["dataset"].get("folder") or demo.DATASET_DIR
    check_folder(data, name_of("folder"))  # a wrong folder explains a missing token too: it comes first
    sample = os.path.abspath(data) == demo.DATASET_DIR
    _set(s["dataset"], "folder", data)
    _set(s["dataset"], "instance_token", args.token or (demo.TOKEN if sample else ""))
    _set(s["dataset"], "class_token", args.class_token)
    _set(s["dataset"], "ignore_caption_files", args.ignore_captions)
    if demo_model and sample:
        # Trained as "skkmtn circle", as the Dreambooth extension trains without captions: the demo
        # model knows none of the captions' other words, which would take the creature from the token.
        s["dataset"].setdefault("class_token", demo.CLASS)
        s["dataset"].setdefault("ignore_caption_files", True)
        if not (args.reg_data or args.reg_blank or args.class_prompt or s["regularization"]):
            s["regularization"].update(folder=demo.REGULARIZATION_DIR, use_caption_files=True,
                                       class_prompt=demo.CLASS)
    _set(s["dataset"], "resolution", args.resolution)
    for key in ("steps", "batch_size", "gradient_accumulation", "optimizer", "precision",
                "save_every_steps", "seed"):
        _set(s["train"], key, getattr(args, key))
    _set(s["train"], "learning_rate", args.lr)
    _set(s["train"], "gradient_checkpointing", args.gradient_checkpointing)
    _set(s["train"], "resume_from", args.resume)
    _set(s["train"], "overwrite", args.overwrite)
    _set(s["train"], "force_retrain", args.force_retrain)
    s["train"].setdefault("output_dir", args.output_dir)
    _set(s["lora"], "rank", args.rank)
    _set(s["lora"], "alpha", args.alpha)
    _set(s["lora"], "train_text_encoder", args.train_text_encoder)
    for key in ("network_type", "conv_rank", "conv_alpha", "factor"):
        _set(s["lora"], key, getattr(args, key))
    _set(s["hypernetwork"], "layer_structure", args.layer_structure)
    _set(s["hypernetwork"], "activation", args.activation)
    if args.adapter == "lora" and demo_model:
        s["train"].setdefault("learning_rate", DEMO_LORA_LEARNING_RATE)
    if args.adapter == "hypernetwork":
        s["train"].setdefault("learning_rate", 1e-5 if not demo_model else 1e-3)
    if args.adapter in ("embedding", "dreamartist"):
        s["embedding"]["mode"] = "dreamartist" if args.adapter == "dreamartist" else "textual_inversion"
        _set(s["embedding"], "vectors", args.vectors)
        if args.init_text is not None:
            s["embedding"]["init_text"] = args.init_text
        s["train"].setdefault("learning_rate", default_learning_rate(s["embedding"]["mode"]))
    _set(s["regularization"], "class_prompt", args.class_prompt)
    _set(s["regularization"], "folder", args.reg_data)
    _set(s["regularization"], "blank_count", args.reg_blank)
    _set(s["regularization"], "use_caption_files", args.reg_captions)

    dataset_config = _build(DatasetConfig, s["dataset"], "dataset")
    dataset_config.validate()
    suffix = OUTPUT_SUFFIXES[args.adapter]
    s["train"].setdefault("output_name", args.name or f"{dataset_config.instance_token}_{suffix}")
    configs = {
        "dataset": dataset_config,
        "train": TrainConfig.from_dict(s["train"]),
        "lora": _build(LoRAConfig, s["lora"], "lora"),
        "hypernetwork": _build(HypernetworkConfig, s["hypernetwork"], "hypernetwork"),
        "embedding": _build(EmbeddingConfig, s["embedding"], "embedding"),
        "regularization": s["regularization"],
    }
    # Everything is checked before a (possibly multi-GB) model is loaded.
    configs["train"].validate()
    configs[ADAPTER_SECTIONS[args.adapter]].validate()
    if args.adapter in ("embedding", "dreamartist"):
        check_embedding_name(configs["train"].output_name)
    return configs


def _build(cls, values: dict, section: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TrainerInputError(f"[{section}] unknown option(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


def _device(name: str):
    """The device, joining the process group first under `accelerate launch` / torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and name != "cpu" else "gloo")
        if torch.cuda.is_available() and name != "cpu":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_dtype(device, precision: str):
    """The frozen model's weight dtype: fp16 on CUDA for fp16 (and auto) training, else fp32."""
    return torch.float16 if device.type == "cuda" and precision in ("auto", "fp16") else torch.float32


def run_train(args) -> int:
    configs = configs_from_args(args)
    output_dir = configs["train"].output_dir
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise TrainerInputError(f"{name_of('output_dir')} {output_dir} is a file: give a folder.")
    device = _device(args.device)
    dataset = ImageDataset.from_folder(configs["dataset"])
    reg_options = configs["regularization"]
    regularization = None
    if reg_options.get("folder") or reg_options.get("blank_count"):
        regularization = regularization_set(resolution=configs["dataset"].resolution, **reg_options)
    train_config = configs["train"]
    known_hash = ""
    final_path = _finished_report_path(args.adapter, train_config)
    if final_path:
        # A finished run of these very settings is answered before the model loads (seconds).
        known_hash = backend.model_hash(args.model or backend.DEMO_MODEL_DIR)
        section = ADAPTER_SECTIONS[args.adapter]
        if trained_already(PRECHECKED_JOBS[args.adapter].description(configs[section]), final_path, dataset,
                           train_config, regularization, known_hash):
            return 0
    if args.model:
        parts = backend.load_parts(args.model, device=device, dtype=model_dtype(device, train_config.precision),
                                   known_hash=known_hash)
    else:
        log.info("no --model given: training the demo model, which knows only coloured shapes (a demo of "
                 "the whole path, not a real model)")
        parts = backend.demo_parts(device=device, known_hash=known_hash)

    bar = None

    def on_step(step, total, loss):
        nonlocal bar
        if bar is None:  # drawn from the first step on: a cache hit draws no empty bar
            bar = tqdm(total=total, initial=step - 1, desc="training", unit="step")
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.update(step - bar.n)

    callbacks = Callbacks(on_step=on_step)
    prompt = configs["dataset"].instance_prompt
    # Log lines (each save, warnings) are printed above the bar instead of through it.
    with logging_redirect_tqdm():
        try:
            if args.adapter in ("embedding", "dreamartist"):
                if regularization is not None:
                    log.warning("regularization images are not used for embeddings: their captions do not hold "
                                "the new word, so they cannot change its vectors")
                name = train_config.output_name
                dataset = embedding_dataset(dataset, name, read_template(args.template))
                prompt = " ".join(filter(None, [placeholder(name), configs["dataset"].class_token.strip()]))
                result = train_embedding(parts, dataset, configs["embedding"], train_config, callbacks=callbacks)
            elif args.adapter == "lora":
                result = train_lora(parts, dataset, configs["lora"], train_config, regularization, callbacks)
            else:
                result = train_hypernetwork(parts, dataset, configs["hypernetwork"], train_config,
                                            regularization, callbacks)
        finally:
            if bar is not None:
                bar.close()
    if dist.is_initialized() and dist.get_rank() != 0:
        return 0  # the first process writes the files and the report
    if result.from_cache and os.path.exists(report_paths(result.final_path)[1]):
        return 0  # the trainer said so; the report beside the file is this run's already
    write_report(parts, result, train_config, prompt, configs["dataset"].resolution)
    return 0


def _finished_report_path(adapter: str, train_config) -> str:
    """The final file a finished run with this output name left, with its report; else ""."""
    if adapter not in PRECHECKED_JOBS or train_config.force_retrain:
        return ""
    final_path = safe_output_path(train_config.output_dir, train_config.output_name, PRECHECKED_JOBS[adapter].suffix,
                                  overwrite=True)
    return final_path if os.path.exists(final_path) and os.path.exists(report_paths(final_path)[1]) else ""


def report_paths(final_path: str) -> tuple:
    """(loss chart, before/after grid) written beside the trained file."""
    stem = os.path.splitext(final_path)[0]
    return stem + "_loss.png", stem + "_samples.png"


def write_report(parts, result, train_config, prompt: str, resolution: int):
    """A loss chart and a before/after grid (with and without the token) beside the final file."""
    chart_path, grid_path = report_paths(result.final_path)
    atomic_write(chart_path, lambda tmp: loss_chart(result.losses).save(tmp, format="PNG"), overwrite=True)
    print(f"loss chart {chart_path}")
    if parts.decode_latents is None:
        return
    words = prompt.split()
    without_token = " ".join(words[1:]) or "a picture"
    prompts = [prompt, without_token]
    kwargs = dict(seed=train_config.seed, width=resolution, height=resolution)
    before = sample_images(parts, prompts, **kwargs)
    with result.adapter.attached(*_attach_args(result.adapter, parts)):
        after = sample_images(parts, prompts, **kwargs)
    grid = labelled_grid([before, after], ["base model", "trained"], [prompt, without_token], min_cell=128)
    atomic_write(grid_path, lambda tmp: grid.save(tmp, format="PNG"), overwrite=True)
    print(f"before/after samples {grid_path}")


def _attach_args(adapter, parts) -> tuple:
    if isinstance(adapter, EmbeddingVectors):
        return (parts,)
    return (parts.unet,) if isinstance(adapter, Hypernetwork) else ()


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "merge":
            with names_as(MERGE_FLAGS):
                return run_merge(args)
        with names_as(CLI_FLAGS):
            if args.command == "train":
                return run_train(args)
    except TrainerInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as error:
        print(f"stopped: {error}", file=sys.stderr)
        if error.last_save:
            print(f"continue with: --resume {error.last_save}", file=sys.stderr)
        return 130 if isinstance(error, TrainingCancelled) else 1
    return 0
