"""The diffusers/transformers backend: SD1.x models for the CLI and the tests.

`load_parts` reads a diffusers folder or an SD1.x single-file checkpoint offline (the SD1.5
configs and the CLIP tokenizer ship in `trainer_core/configs/sd15`); `tiny_parts` builds a tiny
SD1-shaped model in code. Both hand the trainer a `ModelParts` whose LoRA targets carry kohya
names, so a LoRA trained here loads in kohya, A1111, ComfyUI and diffusers.

diffusers and transformers are imported inside the functions that build models: they are the
`cli` extra (not every ComfyUI has them), and importing diffusers costs about as long again as
torch itself (measured 16 s against 7 s on a busy 2-core machine), which `merge`, `--help` and
the option checks do not need.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re

import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from ..errors import TrainerInputError
from ..formats import TEXT_ENCODER_PREFIX, UNET_PREFIX, file_short_hash
from ..parts import ModelParts

log = logging.getLogger(__name__)

SD15_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "sd15")
# The CLI's default model, built by trainer_core/demo.py.
DEMO_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "demo_model")

# What kohya's networks/lora.py patches in an SD1 UNet: every Linear and 1x1 Conv2d inside a
# Transformer2DModel. Listed explicitly so a diffusers release that adds a layer cannot add a
# module that kohya, A1111 and ComfyUI would not know.
TRANSFORMER_TARGETS = ("proj_in", "proj_out")
TRANSFORMER_BLOCK_TARGETS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2",
)
RESNET_CONV_TARGETS = ("conv1", "conv2", "conv_shortcut")
SAMPLER_BLOCKS = ("Downsample2D", "Upsample2D")
# kohya suffix -> (submodule, layer) inside CLIPEncoderLayer. Fixed, because transformers 5
# dropped the `text_model` level that the kohya names (from transformers 4 paths) keep.
TEXT_ENCODER_TARGETS = {
    "self_attn_q_proj": ("self_attn", "q_proj"),
    "self_attn_k_proj": ("self_attn", "k_proj"),
    "self_attn_v_proj": ("self_attn", "v_proj"),
    "self_attn_out_proj": ("self_attn", "out_proj"),
    "mlp_fc1": ("mlp", "fc1"),
    "mlp_fc2": ("mlp", "fc2"),
}

# Tensors whose names and shapes tell what a single-file checkpoint is.
SD1_CROSS_ATTENTION_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
UNET_INPUT_KEY = "model.diffusion_model.input_blocks.0.0.weight"
CHECKPOINT_KINDS = {
    "sd1": "a Stable Diffusion 1.x checkpoint",
    "sd1_inpainting": "an SD1.x inpainting (or other non-4-channel) checkpoint; train on a regular SD1.x model",
    "sd1_incomplete": "an SD1.x UNet without its text encoder and/or VAE; use a full checkpoint",
    "sd2": "a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder, 1024-wide cross-attention)",
    "sdxl": "an SDXL checkpoint (conditioner.embedders keys)",
    "lora": "a LoRA/LyCORIS file, not a base model; give the SD1.x checkpoint it is meant for",
    "hypernetwork": "an A1111 hypernetwork, not a base model",
    "embedding": "a textual-inversion embedding, not a base model",
    "vae": "a VAE on its own, not a full checkpoint",
    "unknown": "not a Stable Diffusion 1.x checkpoint (no model.diffusion_model UNet weights found)",
}
LORA_MARKERS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".hada_w1", ".lokr_w1")


# -- LoRA targets --------------------------------------------------------------------------------
def kohya_unet_targets(unet: nn.Module) -> dict:
    """kohya name -> module for every layer a kohya SD1 LoRA patches in a diffusers UNet."""
    targets = {}
    for path, block in unet.named_modules():
        if type(block).__name__ != "Transformer2DModel":
            continue
        names = list(TRANSFORMER_TARGETS) + [
            f"transformer_blocks.{i}.{layer}"
            for i in range(len(block.transformer_blocks)) for layer in TRANSFORMER_BLOCK_TARGETS]
        for name in names:
            full_name = f"{path}.{name}"
            targets[UNET_PREFIX + full_name.replace(".", "_")] = _patchable(block.get_submodule(name), full_name)
    return targets


def kohya_unet_conv_targets(unet: nn.Module) -> dict:
    """kohya name -> Conv2d for the convolutions LoCon adds (what LyCORIS's kohya wrapper finds in
    ResnetBlock2D, Downsample2D and Upsample2D): conv1, conv2, conv_shortcut and the samplers' conv."""
    targets = {}
    for path, block in unet.named_modules():
        kind = type(block).__name__
        names = RESNET_CONV_TARGETS if kind == "ResnetBlock2D" else ("conv",) if kind in SAMPLER_BLOCKS else ()
        for name in names:
            module = getattr(block, name, None)
            if isinstance(module, nn.Conv2d):
                targets["lora_unet_" + f"{path}.{name}".replace(".", "_")] = module
    return targets


def kohya_text_encoder_targets(text_encoder: nn.Module) -> dict:
    """kohya name -> Linear for the attention and MLP layers of every CLIP encoder layer."""
    layers = getattr(text_encoder, "text_model", text_encoder).encoder.layers
    return {
        f"{TEXT_ENCODER_PREFIX}text_model_encoder_layers_{i}_{suffix}": _patchable(
            getattr(getattr(layer, part), leaf), f"encoder.layers.{i}.{part}.{leaf}")
        for i, layer in enumerate(layers)
        for suffix, (part, leaf) in TEXT_ENCODER_TARGETS.items()
    }


def _patchable(module: nn.Module, name: str) -> nn.Module:
    if isinstance(module, nn.Linear):
        return module
    if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
        return module
    raise TrainerInputError(
        f"the model's layer {name} is a {type(module).__name__}, not a Linear or 1x1 Conv2d: "
        "this is not an SD1.x-shaped model, which is all this trainer supports")


# -- ModelParts from diffusers modules ---------------------------------------------------------
def parts_from_diffusers(unet, text_encoder, tokenizer, vae, alphas_cumprod, prediction_type, device,
                         dtype, name: str = "", model_hash: str = "") -> ModelParts:
    """Wrap diffusers/transformers SD1 modules as `ModelParts`; the modules are frozen in place.

    `encode_images(pixels, generator=None)` gives the VAE posterior's mean, as ComfyUI's
    VAEEncode does, or with a generator a sample drawn from it; either times the VAE's
    `scaling_factor`. SD1's posterior is so narrow that a sample is all but the mean. `encode_text` returns the text encoder's final hidden states, the
    context SD1 was trained with.
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise TrainerInputError(
            f"prediction_type {prediction_type!r} is not supported: use 'epsilon' or 'v_prediction'")
    device = torch.device(device)
    for module in (unet, text_encoder, vae):
        # Cast only when needed: diffusers warns on every `.to(dtype)`, even a no-op one.
        if next(module.parameters()).dtype != dtype:
            module.to(dtype=dtype)
        module.to(device).eval().requires_grad_(False)
    _choose_attention((unet, vae), device)
    scaling_factor = vae.config.scaling_factor
    # A tokenizer saved without a config reports a huge model_max_length; the encoder's
    # position table is the real limit (77 for SD1).
    max_length = min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)

    def predict_noise(x_t, t, context):
        return unet(x_t, t, encoder_hidden_states=context).sample

    def encode_text(captions):
        ids = tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt").input_ids
        return text_encoder(ids.to(device))[0]

    def encode_images(pixels, generator=None):
        posterior = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        latents = posterior.mode() if generator is None else posterior.sample(generator)
        return latents * scaling_factor

    def decode_latents(latents):
        return vae.decode(latents.to(device, vae.dtype) / scaling_factor).sample.clamp(-1, 1)

    tokenize, token_embeddings, encode_text_with_embeddings = _embedding_functions(
        tokenizer, text_encoder, max_length, device)
    return ModelParts(
        unet=unet, predict_noise=predict_noise, text_encoder=text_encoder, encode_text=encode_text,
        encode_images=encode_images, decode_latents=decode_latents,
        alphas_cumprod=torch.as_tensor(alphas_cumprod, dtype=torch.float32).cpu(),
        prediction_type=prediction_type,
        unet_lora_targets=kohya_unet_targets(unet),
        text_encoder_lora_targets=kohya_text_encoder_targets(text_encoder),
        unet_conv_targets=kohya_unet_conv_targets(unet),
        device=device, dtype=dtype, base_model_hash=model_hash, base_model_name=name,
        tokenize=tokenize, token_embeddings=token_embeddings,
        encode_text_with_embeddings=encode_text_with_embeddings)


# -- embeddings in prompts ---------------------------------------------------------------------
EMBEDDING_MENTION = re.compile(r"(?<!\S)embedding:(\S+)")


def _embedding_functions(tokenizer, text_encoder, max_length, device):
    """(tokenize, token_embeddings, encode_text_with_embeddings) for textual inversion.

    A caption names vectors as ComfyUI's prompts do, `embedding:<name>` (the name runs to the next
    space; trailing commas are not part of it). The vectors take the name's place in the token
    sequence: a forward hook puts them into the token-embedding output, so the text encoder runs
    unchanged and gradients reach the vectors.
    """
    token_embedding = text_encoder.get_input_embeddings()

    def tokenize(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    def token_embeddings(ids):
        return token_embedding.weight[torch.as_tensor(list(ids), dtype=torch.long)].detach()

    def sequence(caption, embeddings):
        """Token ids, with (name, row) in the places of vectors."""
        pieces, start = [], 0
        for match in EMBEDDING_MENTION.finditer(caption):
            word, leftover = match.group(1), ""
            if word not in embeddings and word.strip(",") in embeddings:
                leftover = word[len(word.strip(",")):]
                word = word.strip(",")
            pieces += tokenize(caption[start:match.start()])
            if word in embeddings:
                pieces += [(word, row) for row in range(embeddings[word].shape[0])]
            else:
                log.warning("embedding:%s is not one of the trained embeddings; left out", word)
            pieces += tokenize(leftover)
            start = match.end()
        pieces += tokenize(caption[start:])
        body = pieces[:max_length - 2]
        return [tokenizer.bos_token_id] + body + [tokenizer.eos_token_id] + \
            [tokenizer.pad_token_id] * (max_length - 2 - len(body))

    def encode_text_with_embeddings(captions, embeddings):
        sequences = [sequence(caption, embeddings) for caption in captions]
        places = [(b, p, item) for b, items in enumerate(sequences) for p, item in enumerate(items)
                  if isinstance(item, tuple)]
        ids = torch.tensor([[0 if isinstance(item, tuple) else item for item in items] for items in sequences])
        if not places:
            return text_encoder(ids.to(device))[0]
        rows = torch.stack([embeddings[name][row] for _, _, (name, row) in places])
        index = (torch.tensor([b for b, _, _ in places]), torch.tensor([p for _, p, _ in places]))

        def insert(module, args, output):
            return output.index_put(tuple(i.to(output.device) for i in index), rows.to(output.device, output.dtype))
        handle = token_embedding.register_forward_hook(insert)
        try:
            return text_encoder(ids.to(device))[0]
        finally:
            handle.remove()

    return tokenize, token_embeddings, encode_text_with_embeddings


def _choose_attention(modules, device) -> None:
    """xformers on CUDA when it is installed and works, PyTorch SDPA otherwise."""
    if device.type == "cuda":
        try:
            import xformers  # noqa: F401
            for module in modules:
                module.enable_xformers_memory_efficient_attention()
            log.info("attention: xformers")
            return
        except ImportError:
            pass
        except Exception as error:  # an xformers build that does not match torch/CUDA
            log.warning("xformers is installed but cannot be used (%s); using PyTorch SDPA", error)
    from diffusers.models.attention_processor import AttnProcessor2_0
    for module in modules:
        module.set_attn_processor(AttnProcessor2_0())
    log.info("attention: PyTorch SDPA")


def schedule_from_config(scheduler_config) -> tuple[torch.Tensor, str]:
    """(alphas_cumprod, prediction_type) of the DDPM schedule a scheduler config describes."""
    from diffusers import DDPMScheduler
    scheduler = DDPMScheduler.from_config(scheduler_config)
    return scheduler.alphas_cumprod.clone(), scheduler.config.prediction_type


def demo_parts(device="cpu", known_hash: str = "") -> ModelParts:
    """The demo model: 128 px pictures, pre-trained on a world of coloured shapes (fp32)."""
    return load_parts(DEMO_MODEL_DIR, device=device, dtype=torch.float32, known_hash=known_hash)


# -- the tiny built-in model -----------------------------------------------------------------------
def tiny_components(seed: int = 0) -> dict:
    """A tiny SD1-shaped pipeline built in code: unet, text_encoder, tokenizer, vae, scheduler.

    The keys are StableDiffusionPipeline's component names. The tokenizer is the real SD1 CLIP
    tokenizer, so prompts tokenize as in SD1. Weights depend only on `seed`; the global RNG is
    left as it was.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu",
            bos_token_id=0, eos_token_id=2, pad_token_id=1))
        # Four blocks: three 2x downsamples, so 64px images give 8x8 latents as in SD1.
        vae = AutoencoderKL(
            sample_size=64, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
            block_out_channels=(8, 8, 16, 16), norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        _make_posterior_narrow(vae)
        vae.register_to_config(scaling_factor=_unit_variance_scale(vae))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(SD15_CONFIG_DIR, "tokenizer"), local_files_only=True)
    scheduler = PNDMScheduler.from_pretrained(SD15_CONFIG_DIR, subfolder="scheduler", local_files_only=True)
    for module in (unet, text_encoder, vae):
        module.eval()
    return {"unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "vae": vae, "scheduler": scheduler}


def tiny_parts(seed: int = 0, device="cpu") -> ModelParts:
    """`ModelParts` of the tiny SD1-shaped model (64px images, 8x8 latents, 32-wide context)."""
    components = tiny_components(seed)
    alphas_cumprod, prediction_type = schedule_from_config(components["scheduler"].config)
    modules = (components["unet"], components["text_encoder"], components["vae"])
    return parts_from_diffusers(
        components["unet"], components["text_encoder"], components["tokenizer"], components["vae"],
        alphas_cumprod, prediction_type, device, torch.float32,
        name=f"tiny-sd1-seed{seed}", model_hash=_weights_hash(modules))


def _make_posterior_narrow(vae) -> None:
    # A random VAE predicts log-variance near 0 (std 1), which would drown the image in noise;
    # a trained SD VAE is nearly deterministic. Fix the log-variance half of quant_conv low.
    latent_channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[latent_channels:] = 0
        vae.quant_conv.bias[latent_channels:] = -30.0  # the posterior clamps log-variance at -30


def _unit_variance_scale(vae) -> float:
    # SD1's 0.18215 makes its VAE's latents unit-variance; do the same for the random tiny VAE on
    # smooth random images, so the noise schedule means what it means for SD1.
    images = torch.rand(8, 3, 4, 4) * 2 - 1
    images = nn.functional.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean
    return round(1.0 / float(latents.std()), 5)


def _weights_hash(modules) -> str:
    digest = hashlib.sha256()
    for module in modules:
        for key, tensor in module.state_dict().items():
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:10]


# -- loading real models -------------------------------------------------------------------------
def load_parts(path: str, device="cpu", dtype=torch.float32, known_hash: str = "") -> ModelParts:
    """SD1.x `ModelParts` from a diffusers folder or a single-file .safetensors/.ckpt, offline.
    `known_hash`: model_hash(path), when the caller has it already (it reads every weight)."""
    path = _model_path(path)
    if os.path.isdir(path):
        return _load_diffusers_folder(path, device, dtype, known_hash)
    return _load_single_file(path, device, dtype, known_hash)


def model_hash(path: str) -> str:
    """The base model hash load_parts gives the model at `path`, without loading it."""
    path = _model_path(path)
    return _folder_hash(path) if os.path.isdir(path) else file_short_hash(path)


def _model_path(path) -> str:
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(path):
        raise TrainerInputError(
            f"model {path} does not exist: give an SD1.x .safetensors/.ckpt file or a diffusers folder")
    return path


def _load_diffusers_folder(path, device, dtype, known_hash) -> ModelParts:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        raise TrainerInputError(
            f"model folder {path} has no model_index.json, so it is not a diffusers model: give a "
            "diffusers Stable Diffusion 1.x folder or a single .safetensors/.ckpt checkpoint file")
    with open(index_path, encoding="utf-8") as f:
        pipeline_class = json.load(f).get("_class_name")
    if pipeline_class != "StableDiffusionPipeline":
        raise TrainerInputError(
            f"model folder {path} holds a {pipeline_class}, not a StableDiffusionPipeline: "
            "this trainer trains Stable Diffusion 1.x models only")
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True, torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True, torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(
            os.path.join(path, "text_encoder"), local_files_only=True, dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"), local_files_only=True)
        scheduler_config = DDPMScheduler.load_config(path, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError) as error:
        raise TrainerInputError(f"could not load the diffusers model in {path}: {error}") from error
    alphas_cumprod, prediction_type = schedule_from_config(scheduler_config)
    return parts_from_diffusers(unet, text_encoder, tokenizer, vae, alphas_cumprod, prediction_type, device, dtype,
                                name=os.path.basename(path), model_hash=known_hash or _folder_hash(path))


def _load_single_file(path, device, dtype, known_hash) -> ModelParts:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTokenizer

    extension = os.path.splitext(path)[1].lower()
    if extension == ".safetensors":
        _require_sd1(path, _safetensors_shapes(path))  # from the header, before reading weights
        state_dict = safetensors.torch.load_file(path)
    elif extension in (".ckpt", ".pt", ".pth"):
        state_dict = _load_pickled_checkpoint(path)
        _require_sd1(path, _tensor_shapes(state_dict))
    else:
        raise TrainerInputError(
            f"model file {path} is not a .safetensors or .ckpt checkpoint: give an SD1.x checkpoint file "
            "or a diffusers folder")
    # Our shipped SD1.5 configs stand in for the hub configs diffusers would otherwise download.
    options = dict(config=SD15_CONFIG_DIR, local_files_only=True, torch_dtype=dtype)
    unet = UNet2DConditionModel.from_single_file(state_dict, subfolder="unet", **options)
    vae = AutoencoderKL.from_single_file(state_dict, subfolder="vae", **options)
    text_encoder = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, state_dict, subfolder="text_encoder", config=SD15_CONFIG_DIR,
        torch_dtype=dtype, local_files_only=True)
    del state_dict
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(SD15_CONFIG_DIR, "tokenizer"), local_files_only=True)
    scheduler_config = DDPMScheduler.load_config(SD15_CONFIG_DIR, subfolder="scheduler", local_files_only=True)
    alphas_cumprod, prediction_type = schedule_from_config(scheduler_config)
    return parts_from_diffusers(unet, text_encoder, tokenizer, vae, alphas_cumprod, prediction_type, device, dtype,
                                name=os.path.splitext(os.path.basename(path))[0],
                                model_hash=known_hash or file_short_hash(path))


def _require_sd1(path, shapes) -> None:
    kind = checkpoint_kind(shapes)
    if kind != "sd1":
        raise TrainerInputError(
            f"model file {path} looks like {CHECKPOINT_KINDS[kind]}; this trainer needs a Stable Diffusion 1.x "
            "checkpoint (UNet, CLIP ViT-L text encoder and VAE in one file) or an SD1.x diffusers folder")


def checkpoint_kind(shapes: dict) -> str:
    """What a single-file checkpoint holds (a key of CHECKPOINT_KINDS), from tensor names and shapes.

    `shapes` maps each tensor name to its shape (None for values that are not tensors).
    """
    keys = list(shapes)
    if any(key.startswith(("lora_unet_", "lora_te")) or any(m in key for m in LORA_MARKERS) for key in keys):
        return "lora"
    if "layer_structure" in shapes:
        return "hypernetwork"
    if "string_to_param" in shapes or "emb_params" in shapes:
        return "embedding"
    if any(key.startswith("conditioner.embedders.") for key in keys):
        return "sdxl"
    if any(key.startswith("cond_stage_model.model.") for key in keys):
        return "sd2"
    cross_attention = shapes.get(SD1_CROSS_ATTENTION_KEY)
    if cross_attention is None:
        is_vae = any(key.startswith(("encoder.", "decoder.", "first_stage_model.")) for key in keys)
        return "vae" if is_vae else "unknown"
    if tuple(cross_attention)[-1] == 1024:
        return "sd2"
    if tuple(cross_attention)[-1] != 768:
        return "unknown"
    input_conv = shapes.get(UNET_INPUT_KEY)
    if input_conv is not None and tuple(input_conv)[1] != 4:
        return "sd1_inpainting"
    has_text_encoder = any(key.startswith("cond_stage_model.transformer.") for key in keys)
    has_vae = any(key.startswith("first_stage_model.") for key in keys)
    return "sd1" if has_text_encoder and has_vae else "sd1_incomplete"


def _safetensors_shapes(path) -> dict:
    try:
        with safe_open(path, framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as error:  # safetensors raises its own SafetensorError for a damaged header
        raise TrainerInputError(f"model file {path} is not a readable .safetensors file: {error}") from error


def _load_pickled_checkpoint(path) -> dict:
    """A .ckpt state dict, loaded without running code from the file (weights_only=True)."""
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in torch's legacy (pre-zip) format cannot be memory-mapped
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise TrainerInputError(
            f"model file {path} holds Python objects besides tensors and was not loaded, because "
            "loading them could run code from the file. Convert it to .safetensors and use that file") from error
    except (OSError, RuntimeError, EOFError) as error:
        raise TrainerInputError(f"model file {path} could not be read as a checkpoint: {error}") from error
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise TrainerInputError(f"model file {path} does not hold a state dict of tensors")
    return checkpoint


def _tensor_shapes(state_dict) -> dict:
    return {str(key): tuple(value.shape) if isinstance(value, torch.Tensor) else None
            for key, value in state_dict.items()}


def _folder_hash(path) -> str:
    """sha256 (10 hex digits) over the configs and weights of the folder's model components."""
    digest = hashlib.sha256()
    for component in ("unet", "text_encoder", "vae", "scheduler"):
        folder = os.path.join(path, component)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            file_path = os.path.join(folder, name)
            if os.path.isfile(file_path):
                digest.update(f"{component}/{name}".encode())
                with open(file_path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
    return digest.hexdigest()[:10]
