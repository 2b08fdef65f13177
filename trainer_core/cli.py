"""`python -m trainer_core train`: the same trainer as the ComfyUI nodes, from a terminal.

With no --model it trains the tiny built-in model on the sample dataset shipped with the pack,
so the whole path (dataset -> train -> save -> before/after samples) runs on a CPU in about a
minute. Give --model a diffusers folder or an SD1.x .safetensors/.ckpt file for real training.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import fields

from .config import TrainConfig
from .errors import TrainerInputError, TrainingCancelled, TrainingStopped

SAMPLE_DATASET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sample_dataset")
TINY_DEFAULTS = {"resolution": 64, "steps": 500, "save_every_steps": 200}

log = logging.getLogger("trainer_core")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a LoRA or a hypernetwork")
    train.add_argument("--config", help="JSON file with sections dataset/train/lora/hypernetwork/regularization")
    train.add_argument("--model", default="", help="diffusers folder or SD1.x checkpoint; default: tiny built-in model")
    train.add_argument("--adapter", choices=("lora", "hypernetwork"), default="lora")
    train.add_argument("--data", default="", help="folder of images and .txt captions (default: the sample dataset)")
    train.add_argument("--token", default="", help="instance token, e.g. skkmtn (default for the sample dataset)")
    train.add_argument("--class-token", default="", help="class word, e.g. girl")
    train.add_argument("--resolution", type=int)
    train.add_argument("--steps", type=int)
    train.add_argument("--lr", type=float, help="learning rate (LoRA UNet / hypernetwork)")
    train.add_argument("--rank", type=int)
    train.add_argument("--alpha", type=float)
    train.add_argument("--network-type", choices=("lora", "locon", "loha", "lokr"),
                       help="lora (default), or a LyCORIS type: locon (+ ResNet convolutions), loha, lokr")
    train.add_argument("--conv-rank", type=int, help="locon/loha/lokr: rank of the 3x3 convolutions (0 = none)")
    train.add_argument("--conv-alpha", type=float, help="locon/loha/lokr: alpha of the 3x3 convolutions")
    train.add_argument("--factor", type=int, help="lokr: Kronecker factor, -1 = chosen per layer")
    train.add_argument("--train-text-encoder", action="store_true")
    train.add_argument("--batch-size", type=int)
    train.add_argument("--gradient-accumulation", type=int)
    train.add_argument("--optimizer", choices=("AdamW", "AdamW8bit", "Prodigy"))
    train.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"))
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--save-every", type=int, dest="save_every_steps")
    train.add_argument("--seed", type=int)
    train.add_argument("--resume", default="", help="a file saved by an earlier run")
    train.add_argument("--class-prompt", default="", help="prompt of the regularization images")
    train.add_argument("--reg-data", default="", help="folder of class (regularization) images")
    train.add_argument("--reg-blank", type=int, default=0, help="number of blank 'transparent' reg images")
    train.add_argument("--reg-captions", action="store_true",
                       help="train each --reg-data image that has a caption file with that caption as written "
                            "(the others use --class-prompt)")
    train.add_argument("--layer-structure", default="", help="hypernetwork layer structure, e.g. 1,2,2,1")
    train.add_argument("--activation", default="", help="hypernetwork activation, e.g. mish")
    train.add_argument("--output-dir", default="runs")
    train.add_argument("--name", default="", help="output name (default: <token>_lora / <token>_hypernet)")
    train.add_argument("--overwrite", action="store_true")
    train.add_argument("--force-retrain", action="store_true")
    train.add_argument("--device", default="", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    return parser


def _sections(args) -> dict:
    sections = {"dataset": {}, "train": {}, "lora": {}, "hypernetwork": {}, "regularization": {}}
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
    from .adapters.hypernetwork import HypernetworkConfig
    from .adapters.lora import LoRAConfig
    from .dataset import DatasetConfig
    s = _sections(args)
    tiny = not args.model
    if tiny:
        for key in ("resolution",):
            s["dataset"].setdefault(key, TINY_DEFAULTS[key])
        for key in ("steps", "save_every_steps"):
            s["train"].setdefault(key, TINY_DEFAULTS[key])
    data = args.data or s["dataset"].get("folder") or SAMPLE_DATASET
    _set(s["dataset"], "folder", data)
    _set(s["dataset"], "instance_token", args.token or ("skkmtn" if data == SAMPLE_DATASET else ""))
    _set(s["dataset"], "class_token", args.class_token)
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
    if args.adapter == "hypernetwork":
        s["train"].setdefault("learning_rate", 1e-5 if not tiny else 1e-3)
    _set(s["regularization"], "class_prompt", args.class_prompt)
    _set(s["regularization"], "folder", args.reg_data)
    _set(s["regularization"], "blank_count", args.reg_blank)
    _set(s["regularization"], "use_caption_files", args.reg_captions)

    dataset_config = _build(DatasetConfig, s["dataset"], "dataset")
    dataset_config.validate()
    suffix = "lora" if args.adapter == "lora" else "hypernet"
    s["train"].setdefault("output_name", args.name or f"{dataset_config.instance_token}_{suffix}")
    configs = {
        "dataset": dataset_config,
        "train": TrainConfig.from_dict(s["train"]),
        "lora": _build(LoRAConfig, s["lora"], "lora"),
        "hypernetwork": _build(HypernetworkConfig, s["hypernetwork"], "hypernetwork"),
        "regularization": s["regularization"],
    }
    # Everything is checked before a (possibly multi-GB) model is loaded.
    configs["train"].validate()
    configs[args.adapter].validate()
    return configs


def _build(cls, values: dict, section: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TrainerInputError(f"[{section}] unknown option(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


def _device(name: str):
    """The device, joining the process group first under `accelerate launch` / torchrun."""
    import torch
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and name != "cpu" else "gloo")
        if torch.cuda.is_available() and name != "cpu":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_train(args) -> int:
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from .backends.diffusers import load_parts, tiny_parts
    from .dataset import ImageDataset, regularization_set
    from .train import Callbacks, train_hypernetwork, train_lora

    configs = configs_from_args(args)
    output_dir = configs["train"].output_dir
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise TrainerInputError(f"--output-dir {output_dir} is a file: give a folder.")
    device = _device(args.device)
    dtype = torch.float16 if device.type == "cuda" and configs["train"].precision in ("auto", "fp16") else torch.float32
    if args.model:
        parts = load_parts(args.model, device=device, dtype=dtype)
    else:
        log.info("no --model given: using the tiny built-in model (a demo of the whole path, not a real model)")
        parts = tiny_parts(device=device)
    dataset = ImageDataset.from_folder(configs["dataset"])
    reg_options = configs["regularization"]
    regularization = None
    if reg_options.get("folder") or reg_options.get("blank_count"):
        regularization = regularization_set(resolution=configs["dataset"].resolution, **reg_options)
    train_config = configs["train"]

    bar = tqdm(total=train_config.steps, desc="training", unit="step")

    def on_step(step, total, loss):
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.update(step - bar.n)

    callbacks = Callbacks(on_step=on_step)
    try:
        if args.adapter == "lora":
            result = train_lora(parts, dataset, configs["lora"], train_config, regularization, callbacks)
        else:
            result = train_hypernetwork(parts, dataset, configs["hypernetwork"], train_config,
                                        regularization, callbacks)
    finally:
        bar.close()
    if dist.is_initialized() and dist.get_rank() != 0:
        return 0  # the first process writes the files and the report
    if result.from_cache:
        print(f"already trained with these settings: {result.final_path} (use --force-retrain to train again)")
    for path in result.saved_paths:
        print(f"saved {path}")
    write_report(parts, result, train_config, configs["dataset"].instance_prompt, configs["dataset"].resolution)
    return 0


def write_report(parts, result, train_config, prompt: str, resolution: int):
    """A loss chart and a before/after grid (with and without the token) beside the final file."""
    from .formats import atomic_write
    from .plots import labelled_grid, loss_chart
    from .sampling import sample_images
    stem = os.path.splitext(result.final_path)[0]
    chart_path = stem + "_loss.png"
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
    grid_path = stem + "_samples.png"
    atomic_write(grid_path, lambda tmp: grid.save(tmp, format="PNG"), overwrite=True)
    print(f"before/after samples {grid_path}")


def _attach_args(adapter, parts) -> tuple:
    from .adapters.hypernetwork import Hypernetwork
    return (parts.unet,) if isinstance(adapter, Hypernetwork) else ()


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
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
