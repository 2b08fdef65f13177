"""LyCORIS LoHa and LoKr layers, in the layout and with the scale rules of the `lycoris-lora`
package's kohya wrapper, attached by the same forward hooks as the LoRA (see lora.py).

LyCORIS's own modules replace each layer's `forward` and name layers from the model's module
paths; ComfyUI's UNet has other paths (input_blocks...), so the layers here are ours, named with
the kohya names the bridge takes from ComfyUI's key map. tests/test_lycoris.py checks them
against `lycoris-lora` (same weight change for the same factors, files its loader reads).

For a target with weight W (out x in, or out x in x k x k):

    LoHa  dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank
    LoKr  dW = kron(w1, w2) * alpha / rank,  w2 = w2_a @ w2_b, or a full w2 with scale 1

and the hook adds `linear(x, dW)` (or the convolution with the target's stride and padding) to
the target's output. The weight change is rebuilt in every forward; its memory is that of the
target's weight.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TrainerInputError, name_of

INSTALL_HINT = "pip install lycoris-lora (or the pack's [lycoris] extra)"


def check_module_type(name: str, module: dict, expected: str, label: str) -> None:
    """Refuse a file module of another type than this network's (a LoHa file into a LoCon...)."""
    found = module.get("type", "lora")
    if found != expected:
        raise TrainerInputError(
            f"{name}: the file holds a {found} module where this network has {label} one: set "
            f"{name_of('network_type')} to {found if found != 'lora' else 'lora or locon'} to continue this file.")


def factorization(dimension: int, factor: int) -> tuple[int, int]:
    """LyCORIS's split of a layer size into (small, large) Kronecker factor sizes.

    Taken from `lycoris-lora` itself, so a LoKr trained here has exactly the factor shapes
    LyCORIS would choose (its loader re-derives the factor from them)."""
    try:
        from lycoris.functional import factorization as lycoris_factorization
    except ImportError as error:
        raise TrainerInputError(
            f"network_type lokr needs the lycoris-lora package, which is not installed: {INSTALL_HINT}, "
            "then restart.") from error
    return lycoris_factorization(dimension, factor)


def loha_weight(w1_a, w1_b, w2_a, w2_b, shape) -> torch.Tensor:
    """The unscaled LoHa weight change, in the target's weight shape."""
    return ((w1_a @ w1_b) * (w2_a @ w2_b)).reshape(shape)


def lokr_weight(w1, w2, shape) -> torch.Tensor:
    """The unscaled LoKr weight change kron(w1, w2), in the target's weight shape. A conv's w2 may
    come flattened ([out_k, in_n * k * k]); ComfyUI reads it the same way."""
    return torch.kron(w1, w2.flatten(1)).reshape(shape)


def file_weight_change(module: dict, shape) -> tuple[torch.Tensor, float]:
    """(unscaled dW in fp32, its scale) of one LoHa or LoKr module as `formats.network_modules`
    reads it, with ComfyUI's rules: alpha / the rank of the low-rank half, 1 without one (or
    without an alpha). Kept apart as ComfyUI keeps them, so a merge rounds as LoraLoader does."""
    def t(part):
        tensor = module.get(part)
        return None if tensor is None else tensor.to(torch.float32)

    alpha = None if module["alpha"] is None else float(module["alpha"])
    if module["type"] == "loha":
        w1_b = t("hada_w1_b")
        scale = alpha / w1_b.shape[0] if alpha is not None else 1.0
        return loha_weight(t("hada_w1_a"), w1_b, t("hada_w2_a"), t("hada_w2_b"), shape), scale
    rank = None
    w1 = t("lokr_w1")
    if w1 is None:
        rank = module["lokr_w1_b"].shape[0]
        w1 = t("lokr_w1_a") @ t("lokr_w1_b")
    w2 = t("lokr_w2")
    if w2 is None:
        rank = module["lokr_w2_b"].shape[0]
        w2 = t("lokr_w2_a") @ t("lokr_w2_b").flatten(1)
    scale = alpha / rank if alpha is not None and rank is not None else 1.0
    return lokr_weight(w1, w2, shape), scale


class _WeightChangeModule(nn.Module):
    """A layer whose change to the target is a weight dW, applied as linear/conv of the input."""

    def __init__(self, target: nn.Module, rank: int, alpha: float, dropout: float):
        super().__init__()
        if not isinstance(target, (nn.Linear, nn.Conv2d)) or getattr(target, "groups", 1) != 1:
            raise TypeError(f"LoHa/LoKr targets must be nn.Linear or nn.Conv2d (no groups), got {target!r}")
        self.shape = tuple(target.weight.shape)
        self.conv = None
        if isinstance(target, nn.Conv2d):
            self.conv = {"stride": target.stride, "padding": target.padding, "dilation": target.dilation}
        self.rank = rank
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def weight_change(self) -> torch.Tensor:
        raise NotImplementedError

    def unscaled_delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(torch.float32))
        weight = self.weight_change()
        if self.conv is None:
            return F.linear(x, weight)
        return F.conv2d(x, weight, **self.conv)

    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def _copy_in(self, name, module, parts):
        for part in parts:
            mine, theirs = getattr(self, part), module[part]
            if tuple(theirs.shape) != tuple(mine.shape):
                raise TrainerInputError(
                    f"{name}.{part}: the file has shape {list(theirs.shape)}, this network needs "
                    f"{list(mine.shape)}: set rank, conv_rank (and factor for LoKr) to the file's values to "
                    "continue it.")
        with torch.no_grad():
            for part in parts:
                getattr(self, part).copy_(module[part])
            if module["alpha"] is not None:
                self.alpha.fill_(float(module["alpha"]))


class LoHaModule(_WeightChangeModule):
    """hada_w1_a [out, r], hada_w1_b [r, in*k*k], hada_w2_a [out, r], hada_w2_b [r, in*k*k]."""

    parts = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def __init__(self, target, rank, alpha, dropout=0.0):
        super().__init__(target, rank, alpha, dropout)
        out_size, in_size = self.shape[0], math.prod(self.shape[1:])
        self.hada_w1_a = nn.Parameter(torch.empty(out_size, rank))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, in_size))
        self.hada_w2_a = nn.Parameter(torch.empty(out_size, rank))
        self.hada_w2_b = nn.Parameter(torch.empty(rank, in_size))
        # LyCORIS's initialisation: w2_a at zero makes the first product, and dW, zero.
        nn.init.normal_(self.hada_w1_b, std=1)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w2_b, std=1)
        nn.init.zeros_(self.hada_w2_a)

    def weight_change(self):
        return loha_weight(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.shape)

    def file_tensors(self) -> dict:
        return {**{part: getattr(self, part) for part in self.parts}, "alpha": self.alpha}

    def load_file_tensors(self, name, module):
        check_module_type(name, module, "loha", "a LoHa")
        self._copy_in(name, module, self.parts)


class LoKrModule(_WeightChangeModule):
    """lokr_w1 [out_l, in_m] and lokr_w2 [out_k, in_n(, k, k)], or its low-rank halves
    lokr_w2_a [out_k, r] and lokr_w2_b [r, in_n*k*k], where out = out_l*out_k, in = in_m*in_n.

    As LyCORIS: w2 is full when the rank is at least half its larger side, and a full w2 means
    scale 1 (the file's alpha is then the rank)."""

    def __init__(self, target, rank, alpha, factor=-1, dropout=0.0):
        super().__init__(target, rank, alpha, dropout)
        out_size, in_size, *kernel = self.shape
        in_m, in_n = factorization(in_size, factor)
        out_l, out_k = factorization(out_size, factor)
        self.full_w2 = rank >= max(out_k, in_n) / 2
        if self.full_w2:
            self.lokr_w2 = nn.Parameter(torch.zeros(out_k, in_n, *kernel))
            self.alpha.fill_(rank)
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_k, rank))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, in_n * math.prod(kernel)))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
        self.lokr_w1 = nn.Parameter(torch.empty(out_l, in_m))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))

    @property
    def parts(self):
        return ("lokr_w1", "lokr_w2") if self.full_w2 else ("lokr_w1", "lokr_w2_a", "lokr_w2_b")

    def weight_change(self):
        w2 = self.lokr_w2 if self.full_w2 else self.lokr_w2_a @ self.lokr_w2_b
        return lokr_weight(self.lokr_w1, w2, self.shape)

    def scale(self) -> float:
        return 1.0 if self.full_w2 else float(self.alpha) / self.rank

    def file_tensors(self) -> dict:
        return {**{part: getattr(self, part) for part in self.parts}, "alpha": self.alpha}

    def load_file_tensors(self, name, module):
        check_module_type(name, module, "lokr", "a LoKr")
        unexpected = [p for p in ("lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
                      if p in module and p not in self.parts]
        if unexpected:
            raise TrainerInputError(
                f"{name}: the file has {', '.join(unexpected)}, this network has {', '.join(self.parts)}: "
                "set rank and factor to the file's values to continue it.")
        self._copy_in(name, module, self.parts)
