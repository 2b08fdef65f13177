"""The only module that touches ComfyUI internals: MODEL/CLIP/VAE in, trainer_core parts out.

Everything here follows how ComfyUI itself runs an SD1.x model, so what the trainer learns is
what ComfyUI's sampler and LoraLoader see:

- Noise: ComfyUI samples with sigmas and feeds the UNet x / sqrt(sigma^2 + 1) with
  timestep t(sigma). With alphas_cumprod = 1 / (1 + sigma^2) that input equals the DDPM
  sample sqrt(a) x0 + sqrt(1 - a) eps, so the trainer's noisy latents go to the UNet as they
  are, with integer DDPM timesteps.
- Latents: the VAE output is scaled by the model's latent format (0.18215 for SD1), as
  ComfyUI does before sampling.
- LoRA names: ComfyUI's own key maps (the ones LoraLoader uses) name every trained layer, so
  every tensor we save is one LoraLoader applies.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import re

import torch
from torch import nn

import comfy.clip_model
import comfy.ldm.modules.attention
import comfy.lora
import comfy.lora_convert
import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.sd
import comfy.supported_models
import comfy.utils

from ..trainer_core.errors import TrainerInputError
from ..trainer_core.parts import ModelParts
from ..trainer_core.train import Callbacks

# kohya trains the Linear / 1x1 conv layers of every transformer of the UNet and the six
# Linear layers of every CLIP encoder layer; ComfyUI's key maps hold many more names.
UNET_TARGET = re.compile(
    r"^lora_unet_(down_blocks_\d+|mid_block|up_blocks_\d+)_attentions_\d+_"
    r"(proj_in|proj_out|transformer_blocks_\d+_(attn[12]_to_(q|k|v|out_0)|ff_net_0_proj|ff_net_2))$")
# The convolutions LoCon/LoHa/LoKr add: the ResNets' and the down/up samplers', by their kohya names.
UNET_CONV_TARGET = re.compile(
    r"^lora_unet_(down_blocks_\d+|mid_block|up_blocks_\d+)_"
    r"(resnets_\d+_(conv1|conv2|conv_shortcut)|downsamplers_0_conv|upsamplers_0_conv)$")
TEXT_ENCODER_TARGET = re.compile(
    r"^lora_te_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])$")
FINGERPRINT_SAMPLES_PER_TENSOR = 256
UNUSED_BY_SD1 = ("text_projection.weight", "logit_scale")
PREVIEW_MAX_SIZE = 1024
NOT_LOADED_PREFIX = "lora key not loaded: "

log = logging.getLogger(__name__)


def check_sd1(model) -> None:
    """Refuse anything but an SD1.x model before any work is done."""
    config = model.model.model_config
    unet = config.unet_config
    is_sd1 = (isinstance(config, comfy.supported_models.SD15) and unet.get("context_dim") == 768
              and unet.get("model_channels") == 320 and unet.get("in_channels", 4) == 4)
    if not is_sd1:
        raise TrainerInputError(
            f"the MODEL is a {type(config).__name__} model (context width {unet.get('context_dim')}, "
            f"{unet.get('in_channels', 4)} latent channels); this pack trains SD1.x models only. "
            f"Load an SD1.x checkpoint (for example v1-5-pruned-emaonly) in the checkpoint loader.")


def build_parts(model, clip, vae) -> ModelParts:
    """What the trainer needs, taken from ComfyUI's MODEL, CLIP and VAE (loaded fully first; a
    dynamic model keeps streaming its big weights from the CPU, see training_models)."""
    comfy.model_management.load_models_gpu([model, clip.patcher, vae.patcher], force_full_load=True)
    base = model.model
    unet = base.diffusion_model
    dtype = base.manual_cast_dtype or base.get_dtype()
    device = comfy.model_management.get_torch_device()
    model_sampling = model.get_model_object("model_sampling")
    latent_format = model.get_model_object("latent_format")
    text_encoder = clip.cond_stage_model
    attention = training_attention()

    def predict_noise(x_t, t, context):
        # A fresh transformer_options each call: the UNet writes into the dict it is given.
        options = {} if attention is None else {"optimized_attention_override": attention}
        return unet(x_t.to(dtype), timesteps=t.float(), context=context.to(dtype), transformer_options=options)

    def encode_text(texts):
        return _encode_text(clip, texts).to(device)

    def encode_images(pixels, generator=None):
        images = ((pixels.float() + 1) / 2).clamp(0, 1).movedim(1, -1)
        with _posterior_sampling(vae, generator):
            latents = vae.encode(images)
        return latent_format.process_in(latents).to(device)

    def decode_latents(latents):
        images = vae.decode(latent_format.process_out(latents.float()))
        return (images.movedim(-1, 1) * 2 - 1).to(device)

    return ModelParts(
        unet=unet,
        predict_noise=predict_noise,
        text_encoder=text_encoder,
        encode_text=encode_text,
        encode_images=encode_images,
        decode_latents=decode_latents,
        alphas_cumprod=_alphas_cumprod(model_sampling),
        prediction_type=_prediction_type(model_sampling),
        unet_lora_targets=unet_lora_targets(model),
        text_encoder_lora_targets=text_encoder_lora_targets(clip),
        unet_conv_targets=unet_conv_targets(model),
        device=device,
        text_encoder_device=clip.patcher.load_device,
        dtype=dtype,
        base_model_hash=base_model_hash(model, clip, vae),
        base_model_name="",
    )


def training_attention():
    """Torch SDPA for every attention call of the UNet while training, or None where this
    ComfyUI cannot choose the function per call (it then runs its own, as before).

    ComfyUI picks its attention at start-up: on a CPU that is the sub-quadratic one (unless it
    runs with --use-pytorch-cross-attention), which is slower to train through and picks its
    chunks from free memory, so a checkpointed block can recompute with other shapes; sage
    attention has no backward at all. Since ComfyUI 0.3.6x every attention function is wrapped
    by `wrap_attn`, which hands the call to `transformer_options["optimized_attention_override"]`.
    """
    attention = comfy.ldm.modules.attention
    if not (hasattr(attention, "wrap_attn") and hasattr(attention, "attention_pytorch")):
        log.info("this ComfyUI cannot choose the attention per call; training uses its own attention")
        return None

    def sdpa(default_attention, *args, **kwargs):
        return attention.attention_pytorch(*args, **kwargs)
    return sdpa


def _encode_text(clip, texts):
    """[B, 77, 768] for B captions, the way CLIPTextEncode encodes one prompt.

    Parentheses are escaped so a caption like "girl (smiling)" is read literally, not as
    ComfyUI's prompt-weight syntax. Like kohya, a caption longer than 75 tokens is cut there.
    """
    tokenized = [clip.tokenize(text.replace("(", "\\(").replace(")", "\\)")) for text in texts]
    # One 77-token section per caption; ComfyUI encodes sections as one batch and joins them
    # along the token axis.
    batch = {key: [tokens[key][0] for tokens in tokenized] for key in tokenized[0]}
    encoder = clip.cond_stage_model
    encoder.reset_clip_options()
    if clip.layer_idx is not None:
        encoder.set_clip_options({"layer": clip.layer_idx})
    # Where the tokens go, as CLIP.encode_from_tokens says it (newer ComfyUI; older ones ignore the
    # option and use the embedding's device, which is the same device there).
    encoder.set_clip_options({"execution_device": clip.patcher.load_device})
    context = encoder.encode_token_weights(batch)[0]
    return context.reshape(len(texts), -1, context.shape[-1])


@contextlib.contextmanager
def _posterior_sampling(vae, generator):
    """VAEEncode gives the posterior's mode. Given a generator, the VAE draws a sample from the
    posterior instead, seeded from the generator; a VAE without a posterior (TAESD) is unchanged."""
    regularizer = getattr(vae.first_stage_model, "regularization", None)
    if generator is None or not hasattr(regularizer, "sample"):
        yield
        return
    seed = int(torch.randint(2 ** 62, (1,), generator=generator))
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        regularizer.sample = True
        try:
            yield
        finally:
            regularizer.sample = False


def _alphas_cumprod(model_sampling) -> torch.Tensor:
    if not isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete):
        raise TrainerInputError(
            f"the MODEL samples with {_class_names(model_sampling)}; training needs SD1's "
            f"discrete DDPM schedule. Remove model-sampling nodes between the checkpoint loader and the trainer.")
    sigmas = model_sampling.sigmas.detach().float().cpu()
    return 1.0 / (1.0 + sigmas ** 2)


def _prediction_type(model_sampling) -> str:
    if isinstance(model_sampling, comfy.model_sampling.V_PREDICTION):
        return "v_prediction"
    if isinstance(model_sampling, comfy.model_sampling.EPS):
        return "epsilon"
    raise TrainerInputError(
        f"the MODEL predicts with {_class_names(model_sampling)}; SD1 training supports epsilon "
        f"and v-prediction models.")


def _class_names(model_sampling) -> str:
    # ComfyUI builds the class from a schedule class and a prediction class.
    return " + ".join(base.__name__ for base in type(model_sampling).__bases__)


def unet_lora_targets(model) -> dict:
    """kohya name -> UNet layer, from the key map ComfyUI's LoraLoader uses."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    return _targets(key_map, UNET_TARGET, model.model)


def unet_conv_targets(model) -> dict:
    """kohya name -> UNet convolution for LoCon/LoHa/LoKr, from LoraLoader's key map."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    return _targets(key_map, UNET_CONV_TARGET, model.model, any_conv=True)


def text_encoder_lora_targets(clip) -> dict:
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    return _targets(key_map, TEXT_ENCODER_TARGET, clip.cond_stage_model)


def _targets(key_map, pattern, root, any_conv=False) -> dict:
    targets = {}
    for kohya_name, weight_key in sorted(key_map.items()):
        if not pattern.match(kohya_name) or not isinstance(weight_key, str):
            continue
        try:
            module = root.get_submodule(weight_key[:-len(".weight")])
        except AttributeError:  # the map is built from the UNet's config; a smaller UNet lacks some layers
            continue
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and (any_conv or module.kernel_size == (1, 1))):
            targets[kohya_name] = module
    return targets


def base_model_hash(model, clip, vae) -> str:
    """A cheap fingerprint of the weights: every tensor's name, shape, dtype and a strided sample.

    The CLIP's projection and logit scale are left out: SD1 files do not hold them, so ComfyUI
    leaves them uninitialised (different on every load), and SD1 never uses them.
    """
    digest = hashlib.sha256()
    samples = []
    parts = (("unet.", model.model.diffusion_model), ("te.", clip.cond_stage_model), ("vae.", vae.first_stage_model))
    for prefix, module in parts:
        for name, tensor in module.state_dict().items():
            if name.endswith(UNUSED_BY_SD1):
                continue
            digest.update(f"{prefix}{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            flat = tensor.detach().reshape(-1)
            if flat.numel():
                stride = max(1, flat.numel() // FINGERPRINT_SAMPLES_PER_TENSOR)
                samples.append(flat[::stride][:FINGERPRINT_SAMPLES_PER_TENSOR].float())
    digest.update(f"clip_layer={clip.layer_idx};".encode())
    digest.update(torch.cat(samples).cpu().numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def training_context(*modules):
    """Gradients on, inside ComfyUI's inference-mode prompt execution.

    Weights loaded while ComfyUI ran a prompt are inference tensors, which autograd refuses
    to save for backward; they are replaced by normal tensors with the same values (for good:
    ComfyUI treats them the same, and keeping both would double the memory). Gradients for
    the frozen weights are switched off for the duration and switched back afterwards.
    """
    with torch.inference_mode(False), torch.enable_grad():
        restore = [_freeze(module) for module in modules]
        hooks = [hook for module in modules for hook in _copy_clip_layer_norm_inputs(module)]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            for undo in restore:
                undo()
            # Hand the memory training held (activations, optimizer state) back to the sampler.
            comfy.model_management.soft_empty_cache()


@contextlib.contextmanager
def training_models(model, clip):
    """The (MODEL, CLIP) to train on, with ComfyUI told that training is under way.

    Newer ComfyUI (dynamic VRAM, on NVIDIA by default) makes every loaded model a
    ModelPatcherDynamic: its large weights stay on the CPU and are streamed to the GPU layer by
    layer, and it refuses force_patch_weights. Core's TrainLoraNode then trains in bypass mode,
    adapters on the activations, which is how this pack always trains. Streaming the whole UNet
    for every forward and backward pass is slow, so a dynamic model is cloned non-dynamic where
    ComfyUI can rebuild it (a model from a core loader carries its cached_patcher_init): that
    clone loads fully on the GPU, as every model does on older ComfyUI. Where it cannot, the
    dynamic model itself is trained, its adapters on the GPU (ModelParts.device). The CLIP, small
    beside the UNet, is used as given: its layers stream, its adapters sit on its load device
    (ModelParts.text_encoder_device) and the captions go there, as in core's encode; the nodes
    that train through it (text-encoder LoRA, embeddings) keep working on the CLIP they hold.

    comfy.model_management.in_training is set meanwhile, as core's trainer sets it, so ComfyUI
    keeps its inference-only shortcuts (in-place and fused ops) out of the backward pass.
    """
    model = _non_dynamic(model, "MODEL")
    has_flag = hasattr(comfy.model_management, "in_training")
    previous = getattr(comfy.model_management, "in_training", False)
    if has_flag:
        comfy.model_management.in_training = True
    try:
        yield model, clip
    finally:
        if has_flag:
            comfy.model_management.in_training = previous


def is_dynamic(model) -> bool:
    """Whether ComfyUI streams this MODEL's or CLIP's weights (ModelPatcherDynamic); older ComfyUI
    has no is_dynamic()."""
    check = getattr(model, "is_dynamic", None)
    return bool(check is not None and check())


def _non_dynamic(model, what):
    """A non-dynamic clone of a dynamic MODEL or CLIP where ComfyUI can rebuild it, else itself."""
    if not is_dynamic(model) or "disable_dynamic" not in inspect.signature(model.clone).parameters:
        return model
    try:
        return model.clone(disable_dynamic=True)
    except RuntimeError as error:  # no cached_patcher_init: not from a core loader
        log.info("training on the dynamic %s, its weights streamed from the CPU (%s); start ComfyUI with "
                 "--highvram or --disable-dynamic-vram to train faster", what, error)
        return model


def _copy_clip_layer_norm_inputs(root: nn.Module) -> list:
    """ComfyUI's CLIP layers add to their input in place (x += attn(layer_norm1(x))), after the
    layer norm kept x for its backward pass, so autograd refuses to train through them. Handing
    the layer norms a copy of x makes the text encoder trainable without touching ComfyUI."""
    hooks = []
    for module in root.modules():
        if isinstance(module, comfy.clip_model.CLIPLayer):
            for norm in (module.layer_norm1, module.layer_norm2):
                hooks.append(norm.register_forward_pre_hook(_copy_first_input))
    return hooks


def _copy_first_input(module, args):
    return (args[0].clone(),) + tuple(args[1:])


def _freeze(root: nn.Module):
    unfrozen = []
    for module in root.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if param.is_inference():
                frozen = nn.Parameter(param.clone(), requires_grad=False)
                module._parameters[name] = frozen
            else:
                frozen = param
            if param.requires_grad:
                frozen.requires_grad_(False)
                unfrozen.append(frozen)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_inference():
                module._buffers[name] = buffer.clone()

    def undo():
        for param in unfrozen:
            param.requires_grad_(True)
    return undo


def apply_lora(model, clip, kohya_state_dict, strength_model=1.0, strength_clip=1.0):
    """(MODEL, CLIP) with the LoRA applied exactly as LoraLoader applies the saved file."""
    return comfy.sd.load_lora_for_models(model, clip, kohya_state_dict, strength_model, strength_clip)


def unmatched_lora_keys(model, clip, kohya_state_dict) -> list:
    """File keys ComfyUI would not apply: its own "lora key not loaded" list, plus patches
    that name no weight of the MODEL or CLIP."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    collector = _NotLoadedCollector()
    with collector.listening():
        patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(kohya_state_dict)), key_map)
    landed = set(model.clone().add_patches(patches)) | set(clip.clone().add_patches(patches))
    return sorted(collector.keys) + sorted(str(k) for k in patches if k not in landed)


class _NotLoadedCollector(logging.Handler):
    """Collects the keys of ComfyUI's "lora key not loaded" warnings."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.keys = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith(NOT_LOADED_PREFIX):
            self.keys.append(message[len(NOT_LOADED_PREFIX):])

    @contextlib.contextmanager
    def listening(self):
        root = logging.getLogger()
        level = root.level
        root.addHandler(self)
        # The warnings must reach this handler even if ComfyUI runs with a quieter log level.
        if level > logging.WARNING:
            root.setLevel(logging.WARNING)
        try:
            yield
        finally:
            root.removeHandler(self)
            root.setLevel(level)


def to_lora_model(kohya_state_dict) -> dict:
    """Core's LORA_MODEL is a plain {key: tensor} dict that load_lora_for_models reads; kohya
    keys are among the names it maps, so core's LoraModelLoader and SaveLoRA take it as is."""
    return dict(kohya_state_dict)


def to_loss_map(losses) -> dict:
    """Core's LOSS_MAP: {"loss": [one value per step]}, as core's LossGraphNode plots it."""
    return {"loss": [float(loss) for _, loss in losses]}


class ComfyCallbacks:
    """Trainer callbacks that drive the node's progress bar, live preview and Cancel button."""

    def __init__(self, total_steps: int, node_id=None):
        from tqdm import tqdm
        self.bar = comfy.utils.ProgressBar(total_steps, node_id=node_id)
        # The console gets a bar too, as ComfyUI's own sampler shows one.
        self.console = tqdm(total=total_steps, desc="training", unit="step",
                            disable=not comfy.utils.PROGRESS_BAR_ENABLED)
        self.interrupted = False

    def callbacks(self) -> Callbacks:
        return Callbacks(on_step=self.on_step, on_preview=self.on_preview, should_stop=self.should_stop)

    def on_step(self, step, total_steps, loss):
        self.console.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.console.update(step - self.console.n)
        if step >= total_steps:
            self.console.close()
        self._report(step, total_steps, None)

    def on_preview(self, step, image):
        self._report(step, self.bar.total, ("PNG", image, PREVIEW_MAX_SIZE))

    def should_stop(self) -> bool:
        self.interrupted = self.interrupted or comfy.model_management.processing_interrupted()
        return self.interrupted

    def _report(self, step, total_steps, preview):
        # ComfyUI's progress hook raises when Cancel was pressed. Raising here would skip the
        # trainer's bookkeeping, so the cancel is remembered and the trainer stops at its next
        # step check; the node then raises ComfyUI's interrupt.
        try:
            self.bar.update_absolute(step, total_steps, preview)
        except comfy.model_management.InterruptProcessingException:
            self.interrupted = True

    def raise_if_interrupted(self):
        self.console.close()
        if self.interrupted:
            raise_interrupted()


def raise_interrupted():
    """Stop the prompt the way ComfyUI's Cancel does (the UI shows "interrupted")."""
    comfy.model_management.interrupt_current_processing(False)
    raise comfy.model_management.InterruptProcessingException()


# ---------------------------------------------------------------------------------------
# Added by the HypernetTrain / ApplyHypernetwork / MergeLoRAToCkpt nodes (nodes/hypernet.py,
# nodes/merge.py).


def apply_hypernetwork(model, hypernetwork, strength=1.0):
    """A clone of MODEL with the hypernetwork in its attention, patched the way core's
    HypernetworkLoader patches a file (attn1 and attn2 patches on the key/value contexts)."""
    patched = model.clone()
    patch = HypernetworkPatch(hypernetwork, strength)
    patched.set_model_attn1_patch(patch)
    patched.set_model_attn2_patch(patch)
    return patched


class HypernetworkPatch:
    """ComfyUI's attention patch: (q, k, v, extra_options) -> (q, k + hn_k(k)*s, v + hn_v(v)*s).

    Holds its own eval-mode copy of the networks, so dropout never acts while generating and
    ComfyUI moving the patch between devices leaves the caller's object alone. The networks run
    in fp32 whatever the model's dtype, as in training.
    """

    def __init__(self, hypernetwork, strength):
        import copy
        self.hypernetwork = copy.deepcopy(hypernetwork).eval().requires_grad_(False)
        self.strength = float(strength)

    def __call__(self, q, k, v, extra_options):
        # The same transform the trainer's hooks apply.
        return q, self.hypernetwork.transform(k, 0, self.strength), self.hypernetwork.transform(v, 1, self.strength)

    def to(self, device_or_dtype):
        # ComfyUI calls this with the load device and then with the model's dtype.
        if not isinstance(device_or_dtype, torch.dtype):
            self.hypernetwork.to(device_or_dtype)
        return self


def checkpoint_name(prompt, node_id) -> str:
    """The checkpoint file the node's MODEL came from (following "model" links up to a node with
    a ckpt_name), for file metadata; "" when the graph does not say."""
    prompt = prompt or {}
    node = prompt.get(str(node_id))
    for _ in range(len(prompt)):  # a prompt has no cycles; the bound only guards a malformed one
        if node is None:
            break
        inputs = node.get("inputs", {})
        if isinstance(inputs.get("ckpt_name"), str):
            return inputs["ckpt_name"]
        link = inputs.get("model")
        if not (isinstance(link, list) and link):
            break
        node = prompt.get(str(link[0]))
    return ""


def checkpoint_state_dict(model, clip, vae) -> dict:
    """MODEL, CLIP and VAE weights in the single-file SD1 layout core's CheckpointSave writes
    (model.diffusion_model.*, cond_stage_model.transformer.text_model.*, first_stage_model.*),
    with the MODEL's and CLIP's patches (e.g. a LoraLoader before this node) baked in.
    CPU copies the caller owns: ComfyUI unpatches the live weights later.

    Built the way the running ComfyUI's comfy.sd.save_checkpoint builds it. Newer ComfyUI has
    ModelPatcher.state_dict_for_saving and CLIP.state_dict_for_saving: patched weights come out
    as lazily cast parameters that compute the patched value when moved to the CPU, and
    force_patch_weights is refused by dynamic models. Older ComfyUI loads the models with the
    patches written into the weights and reads BaseModel.state_dict_for_saving(clip_sd, vae_sd).
    """
    if hasattr(model, "state_dict_for_saving") and hasattr(clip, "state_dict_for_saving"):
        clip_state = clip.state_dict_for_saving()
        comfy.model_management.load_models_gpu([model, clip.load_model()])
        state = model.state_dict_for_saving(clip_state, vae.get_sd())
    else:
        comfy.model_management.load_models_gpu([model, clip.load_model()], force_patch_weights=True)
        state = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd())
    return {key: _cpu_copy(tensor) for key, tensor in state.items()}


def _cpu_copy(tensor) -> torch.Tensor:
    """A CPU tensor of the value, not sharing memory with the model. .to("cpu") comes first: on a
    lazily cast parameter it computes the patched weight, where .detach() would give the stored,
    unpatched one."""
    copy = tensor.to("cpu")
    if copy.data_ptr() == tensor.data_ptr():
        copy = copy.clone()
    return copy.detach()


def checkpoint_lora_keys(model, clip) -> dict:
    """kohya LoRA name -> key of its weight in checkpoint_state_dict(): the key maps LoraLoader
    uses, carried into the saved layout by the model's own saving key conversion."""
    config = model.model.model_config
    unet_map = comfy.lora.model_lora_keys_unet(model.model, {})
    clip_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    prefix = "diffusion_model."
    # The conversions rename keys and leave values alone, so a {key: original key} dict passes
    # through them and comes out as {saved key: original key}.
    unet_keys = {k[len(prefix):]: k for k in unet_map.values() if isinstance(k, str) and k.startswith(prefix)}
    clip_keys = {k: k for k in clip_map.values() if isinstance(k, str)}
    saved = {**config.process_unet_state_dict_for_saving(unet_keys),
             **config.process_clip_state_dict_for_saving(clip_keys)}
    saved_key = {original: key for key, original in saved.items()}
    return {name: saved_key[key] for name, key in {**unet_map, **clip_map}.items()
            if isinstance(key, str) and key in saved_key}


def models_from_checkpoint_state_dict(state_dict):
    """(MODEL, CLIP) built from a checkpoint state dict the way Load Checkpoint builds them from
    a file: new, independent models."""
    import folder_paths
    options = {}
    if "disable_dynamic" in inspect.signature(comfy.sd.load_state_dict_guess_config).parameters:
        # Built from memory, no loader can rebuild these non-dynamic later (no cached_patcher_init);
        # non-dynamic, they train and merge again as models from a file do.
        options["disable_dynamic"] = True
    model, clip, _, _ = comfy.sd.load_state_dict_guess_config(
        dict(state_dict), output_vae=False, output_clip=True,
        embedding_directory=folder_paths.get_folder_paths("embeddings"), **options)
    return model, clip


# ---------------------------------------------------------------------------------------
# Added by the comparison and chart nodes (nodes/preview.py): pictures made exactly the way
# CLIPTextEncode -> EmptyLatentImage -> KSampler -> VAEDecode make them, and core's LOSS_MAP read.


def losses_from_loss_map(loss_map) -> list:
    """[(step, loss)] from a LOSS_MAP (ours or core's TrainLoraNode's: one value per step,
    floats or 0-d tensors)."""
    values = (loss_map or {}).get("loss", [])
    return [(step, float(value)) for step, value in enumerate(values, start=1)]


class KSamplerPictures:
    """Pictures with fixed sampler settings, each made as KSampler makes it from an empty
    latent (same noise from the seed, same sampling call), decoded as VAEDecode decodes it.
    One progress bar on the node runs across all `count` pictures."""

    def __init__(self, vae, seed, steps, cfg, sampler_name, scheduler, width, height, count, node_id=None):
        self.vae = vae
        self.seed, self.steps, self.cfg = seed, steps, cfg
        self.sampler_name, self.scheduler = sampler_name, scheduler
        self.width, self.height = width, height
        self.total = steps * count
        self.done = 0
        self.bar = comfy.utils.ProgressBar(self.total, node_id=node_id)
        self.conditionings = {}

    def picture(self, model, clip, prompt, negative_prompt) -> torch.Tensor:
        """One IMAGE [1, height, width, 3] for the prompt on this MODEL and CLIP."""
        positive, negative = self.encode(clip, prompt), self.encode(clip, negative_prompt)
        latent = torch.zeros([1, 4, self.height // 8, self.width // 8],
                             device=comfy.model_management.intermediate_device())
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = comfy.sample.prepare_noise(latent, self.seed)
        samples = comfy.sample.sample(
            model, noise, self.steps, self.cfg, self.sampler_name, self.scheduler, positive, negative, latent,
            denoise=1.0, callback=self._step_done, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
            seed=self.seed)
        self.done += self.steps
        images = self.vae.decode(samples)
        return images.reshape(-1, *images.shape[-3:])  # video VAEs add a frame axis; SD1's does not

    def encode(self, clip, text):
        """CLIPTextEncode's conditioning, made once per CLIP and text: the negative prompt and the
        pictures sharing a CLIP do not load its patches and run it again."""
        key = (id(clip), text)
        if key not in self.conditionings:
            self.conditionings[key] = (clip, encode_prompt(clip, text))  # the CLIP kept alive: its id stays its own
        return self.conditionings[key][1]

    def _step_done(self, step, x0, x, total_steps):
        self.bar.update_absolute(self.done + step + 1, self.total)


def encode_prompt(clip, text):
    """The conditioning CLIPTextEncode makes from one prompt."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


# ---------------------------------------------------------------------------------------
# Added by EmbeddingTrain (nodes/embedding.py): trainable vectors read through ComfyUI's own
# embedding mechanism, so what trains is what `embedding:<name>` gives when generating.
#
# CLIPTextEncode finds `embedding:<name>` through the tokenizer, which loads the file from its
# embedding folders and puts one tensor per vector among the token ids; SDClipModel.process_tokens
# then splices those tensors into the token embeddings. Training goes the same way: the captions
# are tokenized by a copy of the CLIP's tokenizer that also searches a temporary folder holding
# placeholder files, and each placeholder tensor is swapped for the trained vector before the
# text encoder runs, so gradients reach the vectors through ComfyUI's own code.

EMBEDDING_ALIAS = "sd1-trainer-vector-set-{}"
PLACEHOLDER_VALUE = -1.0e4  # placeholder rows are constant, far from any real embedding value


def add_embedding_support(parts, clip) -> None:
    """Fill the textual-inversion functions of ModelParts from ComfyUI's CLIP."""
    parts.tokenize = lambda text: prompt_token_ids(clip, text)
    parts.token_embeddings = lambda ids: token_embedding_rows(clip, ids)
    parts.encode_text_with_embeddings = TrainableEmbeddingPrompts(clip)


def prompt_token_ids(clip, text) -> list:
    """The token ids CLIPTextEncode reads `text` as, without the start and end tokens."""
    section = next(iter(clip.tokenize(_escape_weights(text)).values()))[0]
    end = section[-1][0]  # SD1 pads with its end token
    ids = []
    for token, _ in section[1:]:
        if token == end:
            break
        if isinstance(token, int):
            ids.append(token)
    return ids


def token_embedding_rows(clip, ids) -> torch.Tensor:
    """[len(ids), width] rows of the text encoder's token-embedding table, as process_tokens reads them."""
    encoder = clip.cond_stage_model
    embedding = getattr(encoder, encoder.clip).transformer.get_input_embeddings()
    with torch.no_grad():
        tokens = torch.tensor([list(ids)], dtype=torch.long, device=embedding.weight.device)
        return embedding(tokens, out_dtype=torch.float32)[0].cpu()


def _escape_weights(text: str) -> str:
    # As _encode_text: a caption's parentheses are text, not prompt weights.
    return text.replace("(", "\\(").replace(")", "\\)")


class TrainableEmbeddingPrompts:
    """(captions, {name: [n, width] vectors}) -> [B, 77, width] context, as CLIPTextEncode makes it
    from the same captions once the vectors are saved as `<name>` embeddings."""

    def __init__(self, clip):
        self.clip = clip
        self.tokenized = {}  # (caption, names and shapes) -> first section, vectors as (name, row)
        self.key = None  # the tokenizer's name for its sections ("l" for SD1)

    def __call__(self, captions, embeddings):
        shapes = tuple(sorted((name, tuple(v.shape)) for name, v in embeddings.items()))
        missing = [c for c in dict.fromkeys(captions) if (c, shapes) not in self.tokenized]
        if missing:
            if len(self.tokenized) > 1024:
                self.tokenized.clear()
            for caption, section in zip(missing, self._tokenize(missing, embeddings)):
                self.tokenized[(caption, shapes)] = section
        sections = [[(embeddings[t[0]][t[1]] if isinstance(t, tuple) else t, weight)
                     for t, weight in self.tokenized[(caption, shapes)]] for caption in captions]
        return _encode_sections(self.clip, self.key, sections)

    def _tokenize(self, captions, embeddings) -> list:
        import copy
        import tempfile
        import safetensors.torch
        from ..trainer_core.adapters.embedding import mention_pattern
        names = list(embeddings)
        lookup = {}
        with tempfile.TemporaryDirectory(prefix="sd1-trainer-embeddings-") as folder:
            for index, name in enumerate(names):
                count, width = embeddings[name].shape
                values = [PLACEHOLDER_VALUE - 100 * index - row for row in range(count)]
                lookup.update({value: (name, row) for row, value in enumerate(values)})
                rows = torch.tensor(values, dtype=torch.float32)[:, None].expand(count, width).contiguous()
                path = f"{folder}/{EMBEDDING_ALIAS.format(index)}.safetensors"
                safetensors.torch.save_file({"emb_params": rows}, path)
            reader = self.clip.clone()
            reader.tokenizer = copy.copy(self.clip.tokenizer)
            inner = copy.copy(getattr(reader.tokenizer, reader.tokenizer.clip))
            inner.embedding_directory = [folder] + _folders(inner.embedding_directory)
            setattr(reader.tokenizer, reader.tokenizer.clip, inner)
            sections = []
            for caption in captions:
                text = _escape_weights(caption)
                for index, name in enumerate(names):
                    text = mention_pattern(name).sub("embedding:" + EMBEDDING_ALIAS.format(index), text)
                tokens = reader.tokenize(text)
                self.key = next(iter(tokens))
                # Like kohya (and _encode_text), a caption is cut at 75 tokens.
                sections.append([(_placeholder(t, lookup), w) for t, w in tokens[self.key][0]])
        return sections


def _folders(directory) -> list:
    if directory is None:
        return []
    return [directory] if isinstance(directory, str) else list(directory)


def _placeholder(token, lookup):
    """(name, row) for a placeholder tensor, else the token as it is."""
    if not torch.is_tensor(token):
        return token
    value = float(token.reshape(-1)[0])
    if value in lookup and bool((token == value).all()):
        return lookup[value]
    return token


def _encode_sections(clip, key, sections):
    """encode_token_weights on one 77-token section per caption, as _encode_text does."""
    encoder = clip.cond_stage_model
    encoder.reset_clip_options()
    if clip.layer_idx is not None:
        encoder.set_clip_options({"layer": clip.layer_idx})
    context = encoder.encode_token_weights({key: sections})[0]
    return context.reshape(len(sections), -1, context.shape[-1]).to(comfy.model_management.get_torch_device())


def clip_finding_embeddings_in(clip, folder):
    """A clone of CLIP whose prompts find embeddings in `folder` (added to its tokenizer's
    embedding folders when missing; the input CLIP's tokenizer is left alone)."""
    import copy
    import os
    out = clip.clone()
    inner = getattr(clip.tokenizer, clip.tokenizer.clip)
    folders = _folders(inner.embedding_directory)
    if any(os.path.abspath(f) == os.path.abspath(folder) for f in folders):
        return out
    out.tokenizer = copy.copy(clip.tokenizer)
    inner = copy.copy(inner)
    inner.embedding_directory = folders + [folder]
    setattr(out.tokenizer, out.tokenizer.clip, inner)
    return out
