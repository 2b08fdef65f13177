"""How much memory a training run will need, worked out before the first step.

Out-of-memory crashes are the most common complaint about trainers inside ComfyUI. The plan runs
the UNet once on fake tensors (shapes and dtypes only, no arithmetic, no memory) at the run's
batch and resolution, with the adapter attached and the run's autocast, and records every
tensor autograd keeps for the backward pass. From that it tells:

- the activations kept with and without gradient checkpointing (which recomputes each
  transformer and ResNet block in the backward pass and keeps only its inputs),
- what the adapter adds: its weights, their gradients and the optimizer's state,
- so the peak: what the process holds now (the loaded model and the runtime) plus the above.

That decides "auto" gradient checkpointing, and stops a run that cannot fit before it starts,
naming settings that would fit.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import sys
import weakref
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.checkpoint import checkpoint

from .errors import TrainerInputError, name_of

log = logging.getLogger(__name__)

MIB = 2 ** 20
# Adam keeps two fp32 moments per weight; bitsandbytes' AdamW8bit two 8-bit ones.
OPTIMIZER_STATE_BYTES = {"AdamW": 8, "AdamW8bit": 2, "Prodigy": 16}
# Gradients of the activations live beside the kept activations during the backward pass.
# Measured on the tiny model and a full-size SD1.5 UNet on a CPU (see benchmarks/README.md):
# the peak over the kept activations is about the largest few activations of the UNet.
BACKWARD_WORKSPACE_TENSORS = 4
# Only this share of the free memory is planned with: the estimate is within about 25%.
USABLE_SHARE = 0.9
RESOLUTION_STEP = 64  # smaller resolutions are tried in these steps
# UNet -> {settings: ActivationProfile}; forgotten with the UNet.
_PROFILES = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ActivationProfile:
    """Bytes autograd keeps for the backward pass in one forward of the UNet."""

    kept: int                    # everything kept, without checkpointing
    kept_in_blocks: int          # of which inside the checkpointed blocks
    block_inputs: int            # what checkpointing keeps of the blocks instead: their inputs
    largest_block: int           # the most one block keeps (recomputed one at a time)
    largest_tensor: int          # the largest single activation

    def scaled(self, factor: float) -> "ActivationProfile":
        return ActivationProfile(*(int(value * factor) for value in (
            self.kept, self.kept_in_blocks, self.block_inputs, self.largest_block, self.largest_tensor)))

    def with_checkpointing(self, on: bool) -> int:
        workspace = BACKWARD_WORKSPACE_TENSORS * self.largest_tensor
        if not on:
            return self.kept + workspace
        # A recomputed block holds its activations and their gradients at once.
        return self.kept - self.kept_in_blocks + self.block_inputs + 2 * self.largest_block + workspace


@dataclass(frozen=True)
class MemoryPlan:
    device: torch.device
    in_use: int                  # what the process (CPU) or torch (CUDA) holds now
    weights: int                 # the model's weights, part of in_use
    adapter: int                 # adapter weights + gradients + optimizer state
    activations: ActivationProfile
    kernel_workspace: int        # scratch memory of the convolution kernels
    free: Optional[int]          # free memory of the device now, None if unknown
    checkpointing: bool
    batch_size: int
    resolution: int
    optimizer: str

    def added(self, checkpointing: Optional[bool] = None) -> int:
        on = self.checkpointing if checkpointing is None else checkpointing
        return self.adapter + self.kernel_workspace + self.activations.with_checkpointing(on)

    def peak(self, checkpointing: Optional[bool] = None) -> int:
        return self.in_use + self.added(checkpointing)

    def fits(self, checkpointing: Optional[bool] = None) -> bool:
        return self.free is None or self.added(checkpointing) <= USABLE_SHARE * self.free

    def line(self) -> str:
        """The log line (benchmarks/ parse `memory plan: estimated peak <N> MiB`)."""
        free = "unknown" if self.free is None else f"{self.free / MIB:.0f} MiB"
        return (f"memory plan: estimated peak {self.peak() / MIB:.0f} MiB ("
                f"in use now {self.in_use / MIB:.0f} MiB incl. model weights {self.weights / MIB:.0f} MiB; "
                f"adapter + gradients + {self.optimizer} state {self.adapter / MIB:.0f} MiB; "
                f"kernel workspace {self.kernel_workspace / MIB:.0f} MiB; "
                f"activations {self.activations.with_checkpointing(self.checkpointing) / MIB:.0f} MiB at batch "
                f"{self.batch_size}, {self.resolution} px, gradient checkpointing "
                f"{'on' if self.checkpointing else 'off'} "
                f"({self.activations.with_checkpointing(not self.checkpointing) / MIB:.0f} MiB "
                f"{'off' if self.checkpointing else 'on'}); free on {self.device.type}: {free})")

    def settings_that_fit(self) -> list:
        """Changes, one at a time from these settings, that would fit the free memory."""
        if self.free is None:
            return []
        budget = USABLE_SHARE * self.free
        options = []
        if not self.checkpointing and self.fits(True):
            options.append(f"{name_of('gradient_checkpointing')} on")
        if self.optimizer != "AdamW8bit" and self.device.type == "cuda":
            saved = self.adapter * (1 - OPTIMIZER_STATE_BYTES["AdamW8bit"] / (8 + OPTIMIZER_STATE_BYTES.get(
                self.optimizer, 8)))
            if self.added() - saved <= budget:
                options.append(f"{name_of('optimizer')} AdamW8bit")
        on = True  # the smaller batch or resolution is named with checkpointing, the cheapest way
        for batch in range(self.batch_size - 1, 0, -1):
            if self.adapter + self.kernel_workspace + self.activations.scaled(
                    batch / self.batch_size).with_checkpointing(on) <= budget:
                options.append(f"{name_of('batch_size')} {batch} (with {name_of('gradient_checkpointing')} on)")
                break
        below = (self.resolution - 1) // RESOLUTION_STEP * RESOLUTION_STEP
        for resolution in range(below, 0, -RESOLUTION_STEP):
            factor = (resolution / self.resolution) ** 2
            if self.adapter + self.kernel_workspace + self.activations.scaled(
                    factor).with_checkpointing(on) <= budget:
                options.append(f"{name_of('resolution')} {resolution} (with {name_of('gradient_checkpointing')} on)")
                break
        return options

    def refusal(self) -> str:
        fit = self.settings_that_fit()
        advice = ("Settings that would fit: " + "; ".join(fit)) if fit else (
            "None of checkpointing, a smaller batch or resolution fits either: free memory (close other "
            "programs or models), or train fewer layers or a lower rank")
        return (f"not enough memory to train: the run needs about {self.added() / MIB:.0f} MiB more "
                f"(estimated peak {self.peak() / MIB:.0f} MiB) but only {self.free / MIB:.0f} MiB is free on "
                f"{self.device}. {advice}.")


def plan_memory(parts, job, batch_size: int, resolution: int, autocast_dtype, optimizer: str,
                checkpointing: bool) -> MemoryPlan:
    """The plan for these settings. The UNet runs once on fake tensors: no memory, no arithmetic."""
    device = parts.device
    # Read first: working out the activations allocates (and frees) memory of its own.
    in_use = memory_in_use(device)
    latent = max(1, resolution // 8)
    activations = activation_profile(parts, job, batch_size, latent, autocast_dtype)
    trained = [p for group in job.param_groups() for p in group["params"]]
    per_weight = 4 + 4 + OPTIMIZER_STATE_BYTES.get(optimizer, 8)  # fp32 weight + gradient + state
    adapter = sum(p.numel() for p in trained) * per_weight
    return MemoryPlan(device=device, in_use=in_use, weights=_weights_bytes(parts),
                      adapter=adapter, activations=activations, kernel_workspace=_kernel_workspace(parts),
                      free=free_memory(device),
                      checkpointing=checkpointing, batch_size=batch_size, resolution=resolution,
                      optimizer=optimizer)


def choose_checkpointing(plan: MemoryPlan, setting) -> MemoryPlan:
    """The plan with checkpointing as set ("on"/"off"), or for "auto" on only when needed to fit.
    Raises TrainerInputError when the run cannot fit, naming settings that would."""
    if setting == "auto":
        plan = replace(plan, checkpointing=not plan.fits(False))
        if plan.checkpointing:
            log.info("gradient checkpointing auto: on (without it training needs about %.0f MiB more, "
                     "%.0f MiB is free)", plan.added(False) / MIB, plan.free / MIB)
    else:
        plan = replace(plan, checkpointing=setting == "on")
    log.info(plan.line())
    if not plan.fits():
        raise TrainerInputError(plan.refusal())
    return plan


def activation_profile(parts, job, batch_size: int, latent: int, autocast_dtype) -> ActivationProfile:
    """What autograd keeps in one forward, for this model, adapter, batch, size and autocast; the
    same run planned again in this process (a re-queue, the next test) reuses the answer."""
    key = (json.dumps(job.describe(), sort_keys=True, default=str), batch_size, latent, str(autocast_dtype),
           str(parts.dtype))
    cached = _PROFILES.get(parts.unet, {}).get(key)
    if cached is None:
        cached = _measure_activations(parts, job, batch_size, latent, autocast_dtype)
        _PROFILES.setdefault(parts.unet, {})[key] = cached
    return cached


def _measure_activations(parts, job, batch_size: int, latent: int, autocast_dtype) -> ActivationProfile:
    """Runs the UNet with the adapter attached on fake tensors and adds up what autograd keeps."""
    context = _context_shape(parts, batch_size)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    kept, in_blocks, inputs = {}, {}, {}
    current = []

    def pack(tensor):
        # Frozen weights (and views of them) need no gradient and are held anyway; what is computed
        # from them and the inputs alone, before any trained layer, is small. A frozen weight in
        # another dtype is autocast's copy of it, kept for the backward pass: that one is new memory.
        if tensor.grad_fn is None and not tensor.requires_grad and tensor.dtype == parts.dtype:
            return tensor
        key = tensor.untyped_storage()._cdata
        if key not in kept:
            kept[key] = tensor.untyped_storage().nbytes()
            if current:
                in_blocks.setdefault(current[-1], {})[key] = kept[key]
        return tensor

    def enter(block, args):
        if not current:
            inputs[id(block)] = inputs.get(id(block), 0) + sum(
                a.untyped_storage().nbytes() for a in args if isinstance(a, torch.Tensor))
        current.append(id(block))

    def leave(block, args, output):
        current.pop()

    hooks = []
    for block in checkpointed_blocks(parts.unet):
        hooks.append(block.register_forward_pre_hook(enter))
        hooks.append(block.register_forward_hook(leave))
    autocast = (torch.autocast(parts.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    try:
        with job.attached(), mode, torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, _same):
            x_t = torch.zeros(batch_size, 4, latent, latent, device=parts.device, dtype=parts.dtype)
            t = torch.zeros(batch_size, dtype=torch.long, device=parts.device)
            # Gradients flow back into the context when the text encoder's output is trained.
            c = torch.zeros(context, device=parts.device, dtype=parts.dtype, requires_grad=job.trains_text_encoder)
            with autocast:
                parts.predict_noise(x_t, t, c)
    finally:
        for hook in hooks:
            hook.remove()
    per_block = [sum(sizes.values()) for sizes in in_blocks.values()]
    return ActivationProfile(kept=sum(kept.values()), kept_in_blocks=sum(per_block),
                             block_inputs=sum(inputs.values()), largest_block=max(per_block, default=0),
                             largest_tensor=max(kept.values(), default=0))


# The blocks of a diffusers UNet and of ComfyUI's (comfy.ldm...openaimodel.ResBlock,
# comfy.ldm.modules.attention.SpatialTransformer), matched by class name because trainer_core imports
# no ComfyUI module.
RESNET_BLOCK_CLASSES = ("ResnetBlock2D", "ResBlock")
TRANSFORMER_CLASSES = ("Transformer2DModel", "SpatialTransformer")


def checkpointed_blocks(unet: nn.Module) -> list:
    """The blocks gradient checkpointing recomputes: every ResNet block and every transformer as a
    whole (its norm and proj_in/proj_out with it), or, in a UNet whose transformers have another
    class, each of their `...transformer_blocks.N`. The ResNet blocks hold most of SD1.5's
    convolution weights, whose low-precision copies under autocast and whose full-resolution
    activations would otherwise stay alive until the backward pass; recomputing a transformer's
    outer layers too keeps about 150 MiB less at 512 px on SD1.5 with bf16 autocast."""
    blocks, inside = [], None
    for name, module in unet.named_modules():  # a module comes before the modules inside it
        if inside is not None and name.startswith(inside):
            continue
        if (type(module).__name__ in RESNET_BLOCK_CLASSES + TRANSFORMER_CLASSES
                or name.rsplit(".", 2)[-2:-1] == ["transformer_blocks"]):
            blocks.append(module)
            inside = name + "."
    return blocks


@contextlib.contextmanager
def gradient_checkpointing(unet):
    """Recompute each transformer and ResNet block in the backward pass instead of keeping its
    activations (the blocks of checkpointed_blocks, which the plan counts the same way).

    Works on diffusers' and ComfyUI's UNets; adapter hooks inside the blocks run again during
    recomputation, with the same random state.
    """
    originals = []
    for block in checkpointed_blocks(unet):
        original = block.forward
        originals.append(block)

        def forward(*args, _original=original, **kwargs):
            if not torch.is_grad_enabled():
                return _original(*args, **kwargs)
            return checkpoint(_original, *args, use_reentrant=False, **kwargs)
        block.forward = forward
    try:
        yield
    finally:
        for block in originals:
            del block.forward


def release_freed_memory() -> bool:
    """Hands memory that torch has freed back to the system, where the C library keeps it.

    glibc's malloc keeps freed memory of tensors below its mmap threshold (which grows to 32 MiB
    as tensors are freed) for reuse, so the process's resident memory stays at the highest level a
    transient reached (the precision probe, a VAE encode at 512 px) and the next allocations may not
    fit in the holes. malloc_trim returns the free pages. True where it ran (Linux with glibc);
    elsewhere (macOS, Windows, musl) nothing is done. On CUDA the caching allocator's memory is
    ComfyUI's to empty (soft_empty_cache)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    return _glibc_function("malloc_trim")


def _glibc_function(name):
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


# glibc's mallopt parameter (malloc.h) and values: tensors from 4 MiB get their own mapping while a
# run saves memory; afterwards the threshold is glibc's dynamic maximum on 64-bit systems
# (DEFAULT_MMAP_THRESHOLD_MAX), where it ends up in a process that frees large tensors.
M_MMAP_THRESHOLD = -3
SAVING_MMAP_THRESHOLD = 4 << 20
GLIBC_MMAP_THRESHOLD_MAX = 32 << 20


class FreedMemoryReturn:
    """While a CPU run saves memory (gradient checkpointing), memory freed during a step goes back
    to the system at once.

    glibc serves tensors below its mmap threshold (up to 32 MiB) from its heap, and a training step
    frees and allocates tensors of every size in an order that leaves holes the next ones do not
    fit: at 512 px on the full-size SD1.5 with checkpointing the process grew about 550 MiB beyond
    what it held. Giving every tensor from 4 MiB its own mapping, released when it is freed, cut
    what training added from 1376 to 846 MiB at the same step time (14.7 s, one CPU run each); from
    1 MiB it added 662 MiB but page faults made the step 27% slower (18.6 s). Started before
    the probes (the heap must not grow first) and stopped when the run turns out not to checkpoint.
    Nothing is done off Linux/glibc, on a GPU, or when the user tuned malloc through the
    environment (MALLOC_MMAP_THRESHOLD_, GLIBC_TUNABLES)."""

    def __init__(self, device: torch.device):
        tuned = "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", "")
        self._mallopt = _glibc_function("mallopt") if device.type == "cpu" and not tuned else None
        self.active = False

    def __enter__(self) -> "FreedMemoryReturn":
        if self._mallopt is not None:
            self.active = bool(self._mallopt(M_MMAP_THRESHOLD, SAVING_MMAP_THRESHOLD))
        return self

    def stop(self) -> None:
        if self.active:
            self._mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX)
            self.active = False
            release_freed_memory()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _same(tensor):
    return tensor


def _context_shape(parts, batch_size):
    with torch.no_grad():
        context = parts.encode_text([""])
    return (batch_size, *context.shape[1:])


def _model_tensors(parts):
    modules = [parts.unet, parts.text_encoder]
    return [t for m in modules if m is not None for t in list(m.parameters()) + list(m.buffers())]


def _kernel_workspace(parts) -> int:
    """On a CPU, oneDNN copies a convolution's weights into its own layout for the forward and
    again for the backward pass; with SD1.5's largest convolution (2560 -> 1280 channels, 3x3) that
    is 2 x 118 MiB, which the measured peaks on a CPU showed beside the activations."""
    if parts.device.type != "cpu":
        return 0
    sizes = [m.weight.nbytes for m in parts.unet.modules() if isinstance(m, nn.Conv2d)]
    return 2 * max(sizes, default=0)


def _weights_bytes(parts) -> int:
    storages = {}
    for tensor in _model_tensors(parts):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def memory_in_use(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status_bytes("VmRSS") or 0


def free_memory(device: torch.device) -> Optional[int]:
    """Free memory on the device now: CUDA's free memory, or the RAM available (MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Memory torch has reserved but not handed out is free for training too.
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def _proc_status_bytes(field: str) -> Optional[int]:
    try:
        with open(f"/proc/{os.getpid()}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_setting(value) -> str:
    """gradient_checkpointing as "auto", "on" or "off" (True/False from older workflows and configs)."""
    if value is True or value == "on":
        return "on"
    if value is False or value == "off":
        return "off"
    if value == "auto":
        return "auto"
    raise TrainerInputError(f"{name_of('gradient_checkpointing')} must be auto, on or off (got {value!r}).")
