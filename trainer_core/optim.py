"""Optimizers and learning-rate schedules. bitsandbytes and prodigyopt are optional."""
from __future__ import annotations

import logging
import math

import torch

from .errors import TrainerInputError, name_of

log = logging.getLogger(__name__)


def build_optimizer(param_groups: list, config) -> tuple:
    """Returns (optimizer, the name of the optimizer actually used)."""
    if config.optimizer == "AdamW8bit":
        optimizer = _adamw_8bit(param_groups)
        if optimizer is not None:
            return optimizer, "AdamW8bit"
    if config.optimizer == "Prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as error:
            raise TrainerInputError(
                f"{name_of('optimizer')} Prodigy needs the prodigyopt package: `pip install prodigyopt`, "
                "or pick AdamW.") from error
        # Prodigy finds the step size itself; the learning rates act as multipliers of it.
        groups = [dict(g, lr=1.0 * g["lr"] / param_groups[0]["lr"]) for g in param_groups]
        return Prodigy(groups, lr=1.0, weight_decay=0.01, safeguard_warmup=True,
                       use_bias_correction=True), "Prodigy"
    return torch.optim.AdamW(param_groups, weight_decay=1e-2, **_fast_path(param_groups)), "AdamW"


def _fast_path(param_groups) -> dict:
    """The fused kernel where torch has one for these tensors, else the multi-tensor loop.

    Plain AdamW on a CPU updates tensor by tensor in Python: ~5x slower for a LoRA's ~100 tensors.
    """
    params = [p for group in param_groups for p in group["params"]]
    if all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        return {"fused": True}
    return {"foreach": True}


def resolved_optimizer_name(config, device) -> str:
    """The optimizer a run will really use: AdamW8bit falls back to AdamW off CUDA."""
    if config.optimizer == "AdamW8bit" and device.type != "cuda":
        return "AdamW"
    return config.optimizer


def _adamw_8bit(param_groups):
    device = param_groups[0]["params"][0].device
    if device.type != "cuda":
        log.warning("AdamW8bit needs a CUDA GPU (training on %s); using AdamW instead", device.type)
        return None
    try:
        import bitsandbytes as bnb
    except Exception as error:  # ImportError, or a broken CUDA setup raising at import
        log.warning("AdamW8bit needs bitsandbytes (`pip install bitsandbytes`): %s; using AdamW instead", error)
        return None
    return bnb.optim.AdamW8bit(param_groups, weight_decay=1e-2)


def lr_factor(step: int, config) -> float:
    """Multiplier of the base learning rate for optimizer step `step` (0-based)."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_scheduler == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if config.lr_scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress
