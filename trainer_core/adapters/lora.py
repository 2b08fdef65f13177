"""Activation-space LoRA with kohya semantics, attached to a frozen model by forward hooks.

For every target layer (nn.Linear or nn.Conv2d, named by its kohya module name):

    y = W x + multiplier * (alpha / rank) * up(down(dropout(x)))

`up` starts at zero, so a new LoRA changes nothing. The hooks are removed when
`attached()` exits, so the caller's model is never left modified. LoRA weights stay fp32
whatever the model's dtype: fp16 trainables make GradScaler fail with "Attempting to
unscale FP16 gradients" and lose small updates.

The LyCORIS network types use the same network, hooks and files: LoCon is this LoRA on the
ResNet convolutions too (a kxk down, a 1x1 up); LoHa and LoKr have their own modules (lycoris.py).
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TrainerInputError, name_of
from ..formats import (TEXT_ENCODER_PREFIX, UNET_PREFIX, describe_state_dict, kohya_modules, module_alpha,
                       network_modules)
from .lycoris import LoHaModule, LoKrModule, check_module_type

log = logging.getLogger(__name__)

NETWORK_TYPES = ("lora", "locon", "loha", "lokr")
# Fields that only the LyCORIS types use: left out of a plain LoRA's cache key, so LoRAs trained
# before these types existed still hit the cache.
LYCORIS_FIELDS = ("network_type", "conv_rank", "conv_alpha", "factor")
LOHA_MAX_RANK = 32  # LyCORIS's guideline for LoHa on SD1


@dataclass
class LoRAConfig:
    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    train_unet: bool = True
    train_text_encoder: bool = False
    # lora: attention layers only. locon: also the ResNet convolutions. loha / lokr: LyCORIS's
    # Hadamard / Kronecker product layers on the same modules as locon.
    network_type: str = "lora"
    # The kxk convolutions of the ResNets and down/up samplers (locon/loha/lokr); 0 leaves them out.
    # 1x1 convolutions use rank and alpha, as in LyCORIS.
    conv_rank: int = 4
    conv_alpha: float = 4.0
    # LoKr: the size of the small Kronecker factor; -1 picks it per layer (near the square root).
    factor: int = -1

    def cache_fields(self) -> dict:
        """What decides the trained result, for the training cache key."""
        fields = asdict(self)
        if self.network_type == "lora":
            fields = {k: v for k, v in fields.items() if k not in LYCORIS_FIELDS}
        return fields

    def validate(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise TrainerInputError(
                f"{name_of('rank')} must be a whole number of at least 1 (got {self.rank!r}); 4 to 32 is usual."
            )
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise TrainerInputError(
                f"{name_of('alpha')} must be a number above 0 (got {self.alpha!r}); alpha = rank gives scale 1, "
                "alpha = 1 is kohya's default."
            )
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise TrainerInputError(
                f"{name_of('dropout')} must be at least 0 and below 1 (got {self.dropout!r}); 0 turns it off."
            )
        if not (self.train_unet or self.train_text_encoder):
            raise TrainerInputError(
                f"{name_of('train_unet')} and {name_of('train_text_encoder')} are both off: turn on at least one.")
        if self.network_type not in NETWORK_TYPES:
            raise TrainerInputError(
                f"{name_of('network_type')} must be one of {', '.join(NETWORK_TYPES)} (got {self.network_type!r}).")
        if isinstance(self.conv_rank, bool) or not isinstance(self.conv_rank, int) or self.conv_rank < 0:
            raise TrainerInputError(
                f"{name_of('conv_rank')} must be a whole number of at least 0 (got {self.conv_rank!r}); 0 leaves "
                "the ResNet convolutions out.")
        if not isinstance(self.conv_alpha, (int, float)) or not math.isfinite(self.conv_alpha) or self.conv_alpha <= 0:
            raise TrainerInputError(f"{name_of('conv_alpha')} must be a number above 0 (got {self.conv_alpha!r}).")
        if isinstance(self.factor, bool) or not isinstance(self.factor, int) or not (self.factor == -1 or self.factor >= 2):
            raise TrainerInputError(
                f"{name_of('factor')} must be -1 (chosen per layer) or a whole number of at least 2 (got "
                f"{self.factor!r}); LyCORIS suggests -1, or 4 to 8 for characters.")


def layer_sizes(target: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a LoRA target, or TypeError for layers LoRA cannot patch."""
    if isinstance(target, nn.Linear):
        return target.in_features, target.out_features
    if isinstance(target, nn.Conv2d) and target.groups == 1 and isinstance(target.padding, tuple):
        return target.in_channels, target.out_channels
    raise TypeError(f"LoRA targets must be nn.Linear or nn.Conv2d (no groups), got {target!r}")


def is_wide_conv(target: nn.Module) -> bool:
    """A convolution with a kernel larger than 1x1: LoCon trains it with conv_rank / conv_alpha."""
    return isinstance(target, nn.Conv2d) and tuple(target.kernel_size) != (1, 1)


class LoRAModule(nn.Module):
    """down/up weights and alpha for one target layer, in kohya's layout."""

    def __init__(self, target: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        in_size, out_size = layer_sizes(target)
        if isinstance(target, nn.Conv2d):
            # Same kernel/stride/padding as the target so the LoRA output lines up with W x
            # (kohya's LoCon: a kxk down, a 1x1 up).
            self.lora_down = nn.Conv2d(
                in_size, rank, target.kernel_size, stride=target.stride, padding=target.padding,
                dilation=target.dilation, bias=False
            )
            self.lora_up = nn.Conv2d(rank, out_size, 1, bias=False)
        else:
            self.lora_down = nn.Linear(in_size, rank, bias=False)
            self.lora_up = nn.Linear(rank, out_size, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.lora_down.float()
        self.lora_up.float()
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.rank = rank
        self.is_conv = isinstance(target, nn.Conv2d)
        self.dropout_p = dropout
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta(self, x: torch.Tensor, multiplier: float) -> torch.Tensor:
        """The LoRA term added to the target's output, computed from fp32 input."""
        return self.unscaled_delta(x) * (multiplier * self.scale())

    def unscaled_delta(self, x: torch.Tensor) -> torch.Tensor:
        # Called in every forward of every target, so module calls and no-op casts are skipped:
        # the same operations as the modules run, with less Python per step.
        if x.dtype != torch.float32:
            x = x.float()
        if self.dropout_p:
            x = self.dropout(x)
        if self.is_conv:
            return self.lora_up._conv_forward(self.lora_down._conv_forward(x, self.lora_down.weight, None),
                                              self.lora_up.weight, None)
        return F.linear(F.linear(x, self.lora_down.weight), self.lora_up.weight)

    def scale(self) -> float:
        """alpha / rank as a Python number (reading a GPU tensor in every forward would sync)."""
        return float(self.alpha) / self.rank

    def file_tensors(self) -> dict:
        return {"lora_down.weight": self.lora_down.weight, "lora_up.weight": self.lora_up.weight,
                "alpha": self.alpha}

    def load_file_tensors(self, name: str, module: dict) -> None:
        """Copy one file module (as `kohya_modules` / `network_modules` give it) in."""
        check_module_type(name, module, "lora", "a LoRA/LoCon")
        down, up = module["down"], module["up"]
        _check_rank(name, down, self.rank, conv=is_wide_conv(self.lora_down))
        down = _fit_shape(name, "lora_down", down, self.lora_down.weight)
        up = _fit_shape(name, "lora_up", up, self.lora_up.weight)
        with torch.no_grad():
            self.lora_down.weight.copy_(down)
            self.lora_up.weight.copy_(up)
            self.alpha.fill_(module_alpha(module))


def make_module(config: "LoRAConfig", target: nn.Module, rank: int, alpha: float) -> nn.Module:
    """The trainable module of `config.network_type` for one target layer."""
    if config.network_type in ("lora", "locon"):
        return LoRAModule(target, rank, alpha, config.dropout)
    if config.network_type == "loha":
        return LoHaModule(target, rank, alpha, config.dropout)
    return LoKrModule(target, rank, alpha, config.factor, config.dropout)


class LoRANetwork(nn.Module):
    """One LoRAModule per target layer, keyed by kohya module name."""

    def __init__(self, unet_targets: dict, text_encoder_targets: dict, config: LoRAConfig, *, conv_targets=None):
        """`conv_targets` (kohya name -> Conv2d of the UNet's ResNets and samplers) are trained by
        every network type but plain lora."""
        super().__init__()
        config.validate()
        self.config = config
        self.multiplier = 1.0
        _check_prefixes(unet_targets, UNET_PREFIX)
        _check_prefixes(text_encoder_targets, TEXT_ENCODER_PREFIX)
        # A plain dict, not a ModuleDict: the model's layers must not become our parameters.
        self._targets = {}
        if config.train_unet:
            self._targets.update(unet_targets)
            if config.network_type != "lora" and config.conv_rank > 0:
                _check_prefixes(conv_targets or {}, UNET_PREFIX)
                self._targets.update(conv_targets or {})
        if config.train_text_encoder:
            self._targets.update(text_encoder_targets)
        if not self._targets:
            raise TrainerInputError(
                "There are no layers to train: the model has no LoRA targets for the parts "
                f"chosen by {name_of('train_unet')} / {name_of('train_text_encoder')}."
            )
        ranks = {name: config.conv_rank if is_wide_conv(t) else config.rank for name, t in self._targets.items()}
        _check_rank_fits(self._targets, ranks)
        if config.network_type == "loha" and max(ranks.values()) > LOHA_MAX_RANK:
            log.warning("LoHa with rank %d: LyCORIS's guidelines keep LoHa at rank %d or less (its product "
                        "squares the rank)", max(ranks.values()), LOHA_MAX_RANK)
        self.unet_loras = nn.ModuleDict()
        self.text_encoder_loras = nn.ModuleDict()
        for name, target in self._targets.items():
            group = self.unet_loras if name.startswith(UNET_PREFIX) else self.text_encoder_loras
            alpha = config.conv_alpha if is_wide_conv(target) else config.alpha
            group[name] = make_module(config, target, ranks[name], alpha)
        self._attached = False

    def loras(self) -> dict:
        return {**self.unet_loras, **self.text_encoder_loras}

    @contextmanager
    def attached(self, device=None, text_encoder_device=None):
        """Hook every target for the duration of the block; the model is restored on exit.

        Each LoRA runs where its layer computes: `device` for the UNet's and `text_encoder_device`
        for the text encoder's when given (a model whose weights stay on the CPU and are streamed
        to the GPU layer by layer computes on the GPU), else where the layer's weight is.
        """
        if self._attached:
            raise RuntimeError("this LoRA is already attached")
        handles = []
        self._attached = True
        try:
            for name, lora in self.loras().items():
                target = self._targets[name]
                compute_device = text_encoder_device if name in self.text_encoder_loras else device
                lora.to(device=compute_device or _device_of(target))
                handles.append(target.register_forward_hook(self._hook(lora), with_kwargs=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._attached = False

    def _hook(self, lora: LoRAModule):
        scale = lora.scale()  # alpha does not change while attached

        def add_lora(module, args, kwargs, output):
            if self.multiplier == 0:
                return output
            x = args[0] if args else kwargs["input"]
            return torch.add(output, lora.unscaled_delta(x).to(output.dtype), alpha=self.multiplier * scale)

        return add_lora

    def param_groups(self, lr_unet: float, lr_text_encoder: float) -> list[dict]:
        groups = [
            {"name": "unet", "params": list(self.unet_loras.parameters()), "lr": lr_unet},
            {"name": "text_encoder", "params": list(self.text_encoder_loras.parameters()), "lr": lr_text_encoder},
        ]
        return [g for g in groups if g["params"]]

    def kohya_state_dict(self, dtype=torch.float16) -> dict:
        """kohya keys: `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha` (0-dim);
        LoHa / LoKr modules write LyCORIS's `<name>.hada_*` / `<name>.lokr_*` instead."""
        state = {}
        for name, lora in self.loras().items():
            for key, tensor in lora.file_tensors().items():
                # A copy: training goes on after a save and must not change what was saved.
                state[f"{name}.{key}"] = tensor.detach().to("cpu", dtype or tensor.dtype, copy=True).contiguous()
        return state

    def load_kohya_state_dict(self, state_dict) -> None:
        """Copy a kohya LoRA's weights in; the file must have exactly this network's layers."""
        if self.config.network_type == "lora":
            try:
                modules = _file_modules(state_dict)
            except TrainerInputError:
                _refuse_lycoris_file(state_dict)
                raise
        else:
            modules = network_modules(state_dict)
        loras = self.loras()
        _check_names(set(modules), set(loras))
        for name, lora in loras.items():
            lora.load_file_tensors(name, modules[name])


def _refuse_lycoris_file(state_dict):
    """A LoHa/LoKr file given to a plain LoRA network: say which network_type reads it."""
    try:
        kinds = {m["type"] for m in network_modules(state_dict).values()} - {"lora"}
    except TrainerInputError:
        return
    if kinds:
        raise TrainerInputError(
            f"This file is a LyCORIS {'/'.join(sorted(kinds))} network, not a plain LoRA: set "
            f"{name_of('network_type')} to {sorted(kinds)[0]} to continue it.")


def _check_prefixes(targets, prefix):
    wrong = [name for name in targets if not name.startswith(prefix)]
    if wrong:
        raise ValueError(f"LoRA target names must start with {prefix!r}: {wrong[:3]}")


def _check_rank_fits(targets, ranks):
    too_small = {name: min(layer_sizes(t)) for name, t in targets.items() if ranks[name] > min(layer_sizes(t))}
    if too_small:
        name = min(too_small, key=too_small.get)
        raise TrainerInputError(
            f"{name_of('rank')} {ranks[name]} is larger than the smallest layer it would train ({name} has "
            f"{too_small[name]} features): set {name_of('rank')} to {too_small[name]} or less."
        )


def _device_of(module):
    tensor = next(module.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _file_modules(state_dict):
    if not isinstance(state_dict, dict):
        raise TrainerInputError(f"expected a LoRA state dict, got {type(state_dict).__name__}")
    return kohya_modules(state_dict)


def _check_names(file_names: set, expected: set):
    if file_names == expected:
        return
    unknown = sorted(file_names - expected)
    missing = sorted(expected - file_names)
    kind = describe_state_dict([n + ".lora_down.weight" for n in unknown]) if unknown else "a kohya LoRA"
    if kind == "a kohya LoRA":
        kind = "a kohya LoRA made for other layers or another model"
    hint = ""
    if any(n.startswith(TEXT_ENCODER_PREFIX) for n in unknown) and not any(
        n.startswith(TEXT_ENCODER_PREFIX) for n in expected
    ):
        hint = f" The file also trains the text encoder: turn on {name_of('train_text_encoder')}."
    elif any(n.startswith(TEXT_ENCODER_PREFIX) for n in missing) and not any(
        n.startswith(TEXT_ENCODER_PREFIX) for n in file_names
    ):
        hint = f" The file has no text-encoder layers: turn off {name_of('train_text_encoder')}."
    raise TrainerInputError(
        f"This LoRA's layers do not match the model: the file looks like {kind}; expected an "
        f"SD1.x kohya LoRA with names like {_examples(expected)}. "
        f"{len(unknown)} layer(s) in the file are unknown to the model (e.g. {_examples(unknown)}), "
        f"{len(missing)} layer(s) of the model are missing from the file (e.g. {_examples(missing)}).{hint}"
    )


def _examples(names, count=3):
    names = sorted(names)
    return ", ".join(names[:count]) if names else "none"


def _check_rank(name, down, rank, conv=False):
    if down.shape[0] != rank:
        raise TrainerInputError(
            f"{name}: the file has rank {down.shape[0]} but this network has rank {rank}: set "
            f"{name_of('conv_rank') if conv else name_of('rank')} to {down.shape[0]}, the file's rank."
        )


def _fit_shape(name, part, tensor, weight):
    """The file tensor in the layout of `weight`; 1x1 conv weights may come 2-D or 4-D."""
    if tuple(tensor.shape) == tuple(weight.shape):
        return tensor
    if tuple(tensor.shape[:2]) == tuple(weight.shape[:2]) and tensor.numel() == weight.numel():
        return tensor.reshape(weight.shape)
    raise TrainerInputError(
        f"{name}.{part}: the file has shape {list(tensor.shape)} but the model's layer needs "
        f"{list(weight.shape)}: this LoRA was made for another model (SD2.x or SDXL?). "
        "Use a LoRA trained on an SD1.x model."
    )
