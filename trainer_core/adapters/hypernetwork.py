"""A1111 hypernetworks: small MLPs that rewrite the attention key/value contexts.

For every context width (320/640/1280 for self-attention, 768 for the text context in SD1.x)
there is a pair of networks, one for the keys and one for the values:

    k = to_k(ctx + hn_k(ctx) * strength)        v = to_v(ctx + hn_v(ctx) * strength)

This is what A1111 (`modules/hypernetworks/hypernetwork.py`) and ComfyUI's
HypernetworkLoader (`comfy_extras/nodes_hypernetwork.py`) compute; here it is installed as
forward pre-hooks on every attn1/attn2 `to_k`/`to_v` Linear and removed on exit, so the
caller's model is never left modified.

Each network is A1111's `HypernetworkModule`: an `nn.Sequential` named `linear` holding, per
step of `layer_structure`, Linear -> activation (not after the last Linear unless
activate_output) -> LayerNorm (when layer_norm) -> Dropout (A1111's dropout structure).
Activations and dropouts hold no weights but take index slots, so the file keys are the
Sequential's: `linear.0.weight`, `linear.2.weight`, ... exactly as A1111 saves them.
ComfyUI rebuilds the Sequential from the `.weight` keys in file order and ignores
`layer_structure`, so the order of the keys matters, not their numbers.
"""
from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from safetensors import safe_open
from torch import nn

from ..errors import TrainerInputError, name_of
from ..formats import atomic_write, describe_state_dict, file_short_hash

log = logging.getLogger(__name__)

# The activations ComfyUI's loader knows. A1111 also accepts every torch.nn activation by its
# lower-cased class name, but ComfyUI leaves the model silently unpatched for any other name.
# "swish" is Hardswish in both A1111 and ComfyUI (not SiLU).
ACTIVATIONS = {
    "linear": nn.Identity,
    "relu": nn.ReLU,
    "leakyrelu": nn.LeakyReLU,
    "elu": nn.ELU,
    "swish": nn.Hardswish,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softsign": nn.Softsign,
    "mish": nn.Mish,
}
WEIGHT_INITIALIZATIONS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")
# A1111 hard-codes p=0.3 for every dropout its UI creates; ComfyUI's loader does too.
DROPOUT_PROBABILITY = 0.3
TARGET_SUFFIXES = ("attn1.to_k", "attn1.to_v", "attn2.to_k", "attn2.to_v")
OPTIMIZER_SIDECAR_SUFFIX = ".optim"
# A1111's UI default hypernetwork learning rate is 1e-5; LRs that suit a LoRA (1e-4..1e-3) or an
# embedding (A1111's 5e-3) turn a hypernetwork's output to noise within a few hundred steps
# (AUTOMATIC1111/stable-diffusion-webui#2269: "using the default embedding LR will destroy any
# existing hypernetwork"). Ten times A1111's default is where we start warning.
LEARNING_RATE_WARNING_ABOVE = 1e-4


@dataclass
class HypernetworkConfig:
    layer_structure: str = "1,2,2,1"
    activation: str = "mish"
    layer_norm: bool = False
    dropout: bool = False
    last_layer_dropout: bool = False
    activate_output: bool = False
    weight_initialization: str = "Normal"

    def validate(self) -> None:
        """Checks for a new hypernetwork; files made elsewhere only need `validate_format`."""
        self.validate_format()
        if self.layer_norm and self.activation != "linear" and not self.activate_output:
            # ComfyUI's loader counts the LayerNorm keys as layers, so it never sees the last
            # Linear as last and puts the activation after it too: the file would generate
            # differently in ComfyUI than it trained (A1111 runs it as trained).
            raise TrainerInputError(
                f"{name_of('layer_norm')} with {name_of('activation')} {self.activation!r} needs "
                f"{name_of('activate_output')} turned on: ComfyUI's HypernetworkLoader applies the activation "
                f"after the output layer whenever layer_norm is on. Turn on {name_of('activate_output')}, set "
                f"{name_of('activation')} to linear, or turn off {name_of('layer_norm')}."
            )

    def validate_format(self) -> None:
        """What any A1111 hypernetwork ComfyUI can load satisfies."""
        self.layer_sizes()
        if self.activation not in ACTIVATIONS:
            raise TrainerInputError(
                f"{name_of('activation')} {self.activation!r} is not supported: use one of {', '.join(ACTIVATIONS)} "
                "(the ones ComfyUI's HypernetworkLoader can load)."
            )
        if self.weight_initialization not in WEIGHT_INITIALIZATIONS:
            raise TrainerInputError(
                f"{name_of('weight_initialization')} {self.weight_initialization!r} is not supported: use one of "
                f"{', '.join(WEIGHT_INITIALIZATIONS)} (Normal is A1111's default)."
            )

    def layer_sizes(self) -> list[float]:
        """layer_structure as A1111 stores it: multipliers of the context width, e.g. [1.0, 2.0, 1.0]."""
        return parse_layer_structure(self.layer_structure)

    def dropout_structure(self) -> list[float]:
        return default_dropout_structure(len(self.layer_sizes()), self.dropout, self.last_layer_dropout)


def parse_layer_structure(value) -> list[float]:
    example = 'e.g. "1,2,1" or "1,2,2,1"'
    try:
        parts = value.split(",") if isinstance(value, str) else list(value)
        sizes = [float(str(p).strip()) for p in parts]
    except (TypeError, ValueError):
        raise TrainerInputError(
            f"{name_of('layer_structure')} {value!r} is not a list of numbers: write it {example}.") from None
    if len(sizes) < 2 or sizes[0] != 1 or sizes[-1] != 1:
        raise TrainerInputError(
            f"{name_of('layer_structure')} {value!r} must start and end with 1 (the context width in and out): {example}.")
    if not all(math.isfinite(s) and s > 0 for s in sizes):
        raise TrainerInputError(f"{name_of('layer_structure')} {value!r} must hold numbers above 0: {example}.")
    return sizes


def default_dropout_structure(length: int, use_dropout: bool, last_layer_dropout: bool) -> list[float]:
    """A1111's `parse_dropout_structure`: a dropout after every hidden Linear but the last one,
    which gets one only with last_layer_dropout; never after the output Linear.

    For "1,1" A1111 returns a list one too long that puts a dropout on the output; ComfyUI and
    A1111's own older rule put none there, and neither do we.
    """
    if not use_dropout or length < 3:
        return [0.0] * length
    last_hidden = DROPOUT_PROBABILITY if last_layer_dropout else 0.0
    return [0.0] + [DROPOUT_PROBABILITY] * (length - 3) + [last_hidden, 0.0]


def learning_rate_warning(lr: float) -> Optional[str]:
    """A warning for the user when `lr` is high enough to wreck a hypernetwork, else None."""
    if lr <= LEARNING_RATE_WARNING_ABOVE:
        return None
    return (
        f"{name_of('learning_rate')} {lr:g} is high for a hypernetwork: above {LEARNING_RATE_WARNING_ABOVE:g} "
        "they usually turn to noise (A1111's default is 1e-5; 5e-6 to 5e-5 is usual). "
        "LoRA learning rates do not carry over."
    )


class HypernetworkModule(nn.Module):
    """A1111's HypernetworkModule: `x + linear(x) * strength` for one context width."""

    def __init__(self, width: int, layer_sizes: list[float], activation: str, layer_norm: bool,
                 activate_output: bool, dropout_structure: list[float], weight_initialization: str):
        super().__init__()
        layers = []
        last = len(layer_sizes) - 2
        for i in range(len(layer_sizes) - 1):
            layers.append(nn.Linear(int(width * layer_sizes[i]), int(width * layer_sizes[i + 1])))
            if activation != "linear" and (i < last or activate_output):
                layers.append(ACTIVATIONS[activation]())
            if layer_norm:
                layers.append(nn.LayerNorm(int(width * layer_sizes[i + 1])))
            if dropout_structure[i + 1] > 0:
                layers.append(nn.Dropout(p=dropout_structure[i + 1]))
        self.linear = nn.Sequential(*layers).float()
        _initialize(self.linear, weight_initialization, activation)

    def forward(self, x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        # A1111 trains at full strength whatever the multiplier is set to.
        return x + self.linear(x) * (strength if not self.training else 1.0)

    def weighted_layers(self) -> list[nn.Module]:
        return [m for m in self.linear if isinstance(m, (nn.Linear, nn.LayerNorm))]


def _initialize(sequential: nn.Sequential, weight_initialization: str, activation: str) -> None:
    # A1111 initializes LayerNorm weights like Normal Linears (N(0, 0.01)), not to 1.
    nonlinearity = "leaky_relu" if activation == "leakyrelu" else "relu"
    with torch.no_grad():
        for layer in sequential:
            if not isinstance(layer, (nn.Linear, nn.LayerNorm)):
                continue
            weight, bias = layer.weight, layer.bias
            if weight_initialization == "Normal" or isinstance(layer, nn.LayerNorm):
                nn.init.normal_(weight, mean=0.0, std=0.01)
            elif weight_initialization == "XavierUniform":
                nn.init.xavier_uniform_(weight)
            elif weight_initialization == "XavierNormal":
                nn.init.xavier_normal_(weight)
            elif weight_initialization == "KaimingUniform":
                nn.init.kaiming_uniform_(weight, nonlinearity=nonlinearity)
            else:
                nn.init.kaiming_normal_(weight, nonlinearity=nonlinearity)
            nn.init.zeros_(bias)


def attention_targets(unet: nn.Module) -> dict:
    """module name -> the to_k/to_v Linear of every attn1/attn2 (diffusers and ComfyUI name them alike)."""
    return {
        name: module for name, module in unet.named_modules()
        if isinstance(module, nn.Linear) and any(name == s or name.endswith("." + s) for s in TARGET_SUFFIXES)
    }


class Hypernetwork(nn.Module):
    """A [k-network, v-network] pair per context width.

    Starts in eval mode (dropout off, `strength` applied), as A1111 does; the trainer calls
    `train()`, which enables dropout and trains at strength 1.
    """

    def __init__(self, widths: list[int], config: HypernetworkConfig,
                 dropout_structure: Optional[list[float]] = None):
        """`dropout_structure` overrides the one config implies, for A1111 files that carry their own."""
        super().__init__()
        config.validate_format()
        self.config = config
        self.strength = 1.0
        sizes = config.layer_sizes()
        self.dropout_structure = list(dropout_structure or config.dropout_structure())
        _check_sizes_fit(widths, sizes, config.layer_structure)
        self.nets = nn.ModuleDict()
        for width in sorted({int(w) for w in widths}):
            self.nets[str(width)] = nn.ModuleList(
                HypernetworkModule(width, sizes, config.activation, config.layer_norm, config.activate_output,
                                   self.dropout_structure, config.weight_initialization)
                for _ in ("k", "v")
            )
        self._attached = False
        self.eval()

    @classmethod
    def for_unet(cls, unet: nn.Module, config: HypernetworkConfig) -> "Hypernetwork":
        """A new hypernetwork with one pair per context width the UNet's attention layers read
        (SD1.x: 320, 640, 768, 1280)."""
        config.validate()
        targets = attention_targets(unet)
        if not targets:
            raise TrainerInputError(
                "the model has no attn1/attn2 to_k/to_v layers for a hypernetwork to patch: "
                "use an SD1.x UNet.")
        return cls(sorted({m.in_features for m in targets.values()}), config)

    @property
    def widths(self) -> list[int]:
        return [int(w) for w in self.nets]

    def pair(self, width: int) -> nn.ModuleList:
        """[k-network, v-network] for a context width."""
        return self.nets[str(width)]

    def transform(self, context: torch.Tensor, part: int, strength: float) -> torch.Tensor:
        """The context a to_k (part 0) or to_v (part 1) layer sees instead of `context`; unchanged
        for a width the hypernetwork lacks (as A1111 and ComfyUI leave it). Computed in fp32 like
        the weights: fp16 contexts would lose the small corrections being learned."""
        key = str(context.shape[-1])
        if key not in self.nets:
            return context
        return self.nets[key][part](context.float(), strength).to(context.dtype)

    @contextmanager
    def attached(self, unet: nn.Module, device=None):
        """Transform the k/v contexts of `unet` for the duration of the block; hooks removed on exit.
        The networks run on `device` when given (where the UNet computes), else where its weights are."""
        if self._attached:
            raise RuntimeError("this hypernetwork is already attached")
        handles = []
        self._attached = True
        try:
            targets = attention_targets(unet)
            if targets:
                self.to(device=device or next(iter(targets.values())).weight.device)
            for name, target in targets.items():
                if str(target.in_features) not in self.nets:
                    continue  # A1111 and ComfyUI also leave widths the file lacks alone
                part = 0 if name.endswith("to_k") else 1
                handles.append(target.register_forward_pre_hook(self._hook(part), with_kwargs=True))
            if targets and not handles:
                log.warning("hypernetwork widths %s match none of the model's attention layers", self.widths)
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._attached = False

    def _hook(self, part: int):
        def transform_context(module, args, kwargs):
            if not self.training and self.strength == 0:
                return None
            context = args[0] if args else kwargs["input"]
            new = self.transform(context, part, self.strength)
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "input": new}

        return transform_context

    def param_groups(self, lr: float) -> list[dict]:
        return [{"name": "hypernetwork", "params": list(self.parameters()), "lr": lr}]

    def to_a1111(self, name: str, step: int, sd_checkpoint: str = "", sd_checkpoint_name: str = "") -> dict:
        """The dict A1111 `Hypernetwork.save` writes, key for key and in its order; plain types only,
        so `torch.load(weights_only=True)` reads it."""
        config = self.config
        state = {
            width: tuple(_plain_state_dict(net) for net in self.pair(width))
            for width in self.widths
        }
        state.update({
            "step": int(step),
            "name": str(name),
            "layer_structure": config.layer_sizes(),
            "activation_func": config.activation,
            "is_layer_norm": bool(config.layer_norm),
            "weight_initialization": config.weight_initialization,
            "sd_checkpoint": str(sd_checkpoint),
            "sd_checkpoint_name": str(sd_checkpoint_name),
            "activate_output": bool(config.activate_output),
            # Always False: ComfyUI builds its dropouts from this flag and never switches them to
            # eval, so they would stay active while generating. A1111 (since dropout_structure
            # exists) rebuilds the dropouts from dropout_structure whatever this flag says.
            "use_dropout": False,
            "dropout_structure": [float(p) for p in self.dropout_structure],
            "last_layer_dropout": self.dropout_structure[-2] > 0,  # as A1111 derives it
            "optional_info": None,
        })
        return state

    @classmethod
    def from_a1111(cls, d: dict) -> "Hypernetwork":
        """Rebuild from an A1111 hypernetwork dict (as `torch.load` returns it)."""
        pairs = _width_pairs(d)
        layer_norm = bool(d.get("is_layer_norm", _has_layer_norm(pairs)))
        sizes = d.get("layer_structure") or _infer_layer_sizes(pairs, layer_norm)
        activation = d.get("activation_func") or "linear"
        if activation not in ACTIVATIONS:
            raise TrainerInputError(
                f"this hypernetwork uses activation {activation!r}, which ComfyUI cannot load "
                f"(supported: {', '.join(ACTIVATIONS)}).")
        length = len(parse_layer_structure(sizes))
        file_dropouts = d.get("dropout_structure")
        dropout_structure = file_dropouts if _valid_dropout_structure(file_dropouts, length) else None
        use_dropout = bool(any(file_dropouts)) if dropout_structure else bool(d.get("use_dropout", False))
        # Missing keys default as in ComfyUI's loader, so we compute what HypernetworkLoader does
        # (A1111 itself defaults a missing activate_output to True).
        config = HypernetworkConfig(
            layer_structure=_format_layer_structure(parse_layer_structure(sizes)),
            activation=activation,
            layer_norm=layer_norm,
            dropout=use_dropout,
            last_layer_dropout=bool(d.get("last_layer_dropout", False)),
            activate_output=bool(d.get("activate_output", False)),
            weight_initialization=d.get("weight_initialization") or "Normal",
        )
        if config.weight_initialization not in WEIGHT_INITIALIZATIONS:
            config.weight_initialization = "Normal"  # only matters for new weights; these are loaded
        net = cls(list(pairs), config, dropout_structure=dropout_structure)
        _load_weights(net, pairs)
        return net


def _plain_state_dict(module: HypernetworkModule) -> dict:
    # Copies: training goes on after a save and must not change what was saved.
    return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in module.state_dict().items()}


def _check_sizes_fit(widths, sizes, layer_structure):
    for width in widths:
        if any(int(width * s) < 1 for s in sizes):
            raise TrainerInputError(
                f"layer_structure {layer_structure!r} makes a layer of 0 features for width {width}: "
                'use multipliers such as "1,2,1".')


def _not_a_hypernetwork(what: str) -> TrainerInputError:
    return TrainerInputError(
        f"{what}; expected an A1111 hypernetwork .pt (a dict with integer context widths such as "
        "320/640/768/1280, each holding a [k, v] pair of `linear.N.weight/bias` state dicts).")


def _looks_like(keys) -> str:
    keys = list(keys)
    kind = describe_state_dict(keys)
    if kind == "not a LoRA file":  # describe_state_dict's answer when it does not know the keys
        return f"something else (keys such as {', '.join(map(str, keys[:3])) or 'none'})"
    return kind


def _width_pairs(d) -> dict:
    if not isinstance(d, dict):
        raise _not_a_hypernetwork(f"the file holds a {type(d).__name__}")
    pairs = {k: v for k, v in d.items() if isinstance(k, int) and not isinstance(k, bool)}
    if not pairs:
        inner = d.get("state_dict", d)
        keys = inner.keys() if isinstance(inner, dict) else d.keys()
        raise _not_a_hypernetwork(f"the file looks like {_looks_like(keys)}")
    for width, pair in pairs.items():
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, dict) for s in pair)):
            raise _not_a_hypernetwork(f"width {width} does not hold a [k, v] pair of state dicts")
        for state in pair:
            if not _weights_in_order(state) or not all(isinstance(t, torch.Tensor) for t in state.values()):
                raise _not_a_hypernetwork(f"width {width} holds no weight tensors")
    return pairs


def _weights_in_order(state: dict) -> list:
    """[weight, bias, weight, bias, ...] in file order, the order ComfyUI's loader relies on."""
    tensors = []
    for key in state:
        if key.endswith(".weight"):
            tensors += [state[key], state.get(key[: -len("weight")] + "bias")]
    return tensors


def _has_layer_norm(pairs) -> bool:
    return any(t is not None and t.dim() == 1 for pair in pairs.values()
               for t in _weights_in_order(pair[0])[0::2])


def _infer_layer_sizes(pairs, layer_norm) -> list[float]:
    """layer_structure from the widest width's Linear shapes, for files without the key."""
    width = max(pairs)
    weights = _weights_in_order(pairs[width][0])[0::2]
    linears = weights[::2] if layer_norm else weights
    return [1.0] + [t.shape[0] / width for t in linears]


def _valid_dropout_structure(value, length) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == length and value[-1] == 0
            and all(isinstance(p, (int, float)) and 0 <= p < 1 for p in value))


def _format_layer_structure(sizes) -> str:
    # "1,2,1" for whole numbers; repr keeps fractional multipliers exact.
    return ",".join(str(int(s)) if s == int(s) else repr(s) for s in sizes)


def _load_weights(net: Hypernetwork, pairs) -> None:
    with torch.no_grad():
        for width, pair in pairs.items():
            for module, state in zip(net.pair(width), pair):
                tensors = _weights_in_order(state)
                params = [p for layer in module.weighted_layers() for p in (layer.weight, layer.bias)]
                found = [None if t is None else tuple(t.shape) for t in tensors]
                built = [tuple(p.shape) for p in params]
                if found != built:
                    raise TrainerInputError(
                        f"hypernetwork width {width}: the file's weights have shapes {found} but its "
                        f"layer_structure {net.config.layer_sizes()} and is_layer_norm "
                        f"{net.config.layer_norm} need {built}; the file is damaged or was edited.")
                for param, tensor in zip(params, tensors):
                    param.copy_(tensor)


# ---------------------------------------------------------------------------------------
# Files


def save_hypernetwork(path, net: Hypernetwork, name: str, step: int, sd_checkpoint: str = "",
                      sd_checkpoint_name: str = "", overwrite: bool = False) -> None:
    state = net.to_a1111(name, step, sd_checkpoint, sd_checkpoint_name)
    atomic_write(path, lambda tmp: torch.save(state, tmp), overwrite=overwrite)


def load_hypernetwork(path) -> tuple[Hypernetwork, int]:
    """(the hypernetwork, its training step). Loaded with weights_only=True: no code runs."""
    d = _load_pt(path)
    try:
        net = Hypernetwork.from_a1111(d)
    except TrainerInputError as error:
        raise TrainerInputError(f"{os.path.basename(path)}: {error}") from None
    return net, int(d.get("step") or 0)


def _load_pt(path):
    path = os.fspath(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise TrainerInputError(f"hypernetwork file {path} does not exist: check the name and folder.")
    if path.lower().endswith((".safetensors", ".sft")):
        try:
            with safe_open(path, framework="pt") as f:
                looks_like = _looks_like(f.keys())
        except Exception:
            looks_like = "a damaged safetensors file"
        raise _not_a_hypernetwork(f"{name} is a .safetensors file that looks like {looks_like}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise _not_a_hypernetwork(
            f"{name} could not be read as a plain PyTorch file ({type(error).__name__}); a full checkpoint "
            "or a file from another tool?") from None


def save_optimizer_sidecar(pt_path, optimizer_name: str, optimizer_state_dict: dict,
                           overwrite: bool = False) -> str:
    """Write A1111's `<file>.pt.optim` next to a saved hypernetwork, tied to it by its hash;
    returns the sidecar's path. A1111 resumes its optimizer from this file."""
    sidecar = os.fspath(pt_path) + OPTIMIZER_SIDECAR_SUFFIX
    state = {
        "optimizer_name": optimizer_name,
        "hash": file_short_hash(pt_path),
        "optimizer_state_dict": optimizer_state_dict,
    }
    atomic_write(sidecar, lambda tmp: torch.save(state, tmp), overwrite=overwrite)
    return sidecar


def load_optimizer_sidecar(pt_path) -> Optional[dict]:
    """The `<file>.pt.optim` dict, or None when missing, unreadable or made for another version
    of the file (A1111 ignores a sidecar whose hash does not match, and so do we)."""
    sidecar = os.fspath(pt_path) + OPTIMIZER_SIDECAR_SUFFIX
    if not os.path.isfile(sidecar):
        log.warning("no optimizer state %s; the optimizer starts fresh", sidecar)
        return None
    try:
        state = torch.load(sidecar, map_location="cpu", weights_only=True)
    except Exception as error:
        log.warning("cannot read optimizer state %s (%s); the optimizer starts fresh", sidecar, error)
        return None
    if not isinstance(state, dict) or state.get("hash") != file_short_hash(pt_path):
        log.warning("optimizer state %s belongs to another version of %s; the optimizer starts fresh",
                    sidecar, os.path.basename(pt_path))
        return None
    if state.get("optimizer_state_dict") is None:
        return None
    return state
