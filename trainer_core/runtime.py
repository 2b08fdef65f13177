"""How a run uses the machine: CPU threads, precision and gradient checkpointing, chosen once
before the first step.

On a CPU both the thread count and the precision are chosen by timing the run's own UNet
(forward + backward at batch 1) rather than by rules of thumb, because the right answer depends
on the model's size, the resolution and the machine's current load:

- Threads: torch uses one thread per core, but when another process keeps a core busy every
  torch operation waits for the slowest thread. On a 2-core machine with one busy process a small
  model trained 3x faster with 1 thread than with 2. The caller's setting (ComfyUI's) comes back
  when training ends.
- Precision "auto": bf16 autocast pays only on a CPU with bf16 units (AMX or AVX512-BF16) and
  only where matrix work dominates: measured on the tiny built-in model, bf16 took 2.05x the fp32
  time at 64 px and 0.74x at 256 px. Without bf16 units it is the ~10x slow path, never chosen.
"""
from __future__ import annotations

import contextlib
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .errors import TrainingCancelled
from .memory_plan import (FreedMemoryReturn, MemoryPlan, check_setting, choose_checkpointing, gradient_checkpointing,
                          plan_memory, release_freed_memory)
from .optim import resolved_optimizer_name

log = logging.getLogger(__name__)

THREAD_PROBE_LATENT = 16      # threads are timed at up to 128 px: same operations, less waiting
PRECISION_PROBE_LATENT = 32   # precision at up to 256 px: bf16 gains grow with size
PROBE_REPEATS = 3
SLOW_PASS_SECONDS = 0.5       # above this a probe pass is timed once per choice
BF16_MARGIN = 0.9             # bf16 must be at least 10% faster to be picked
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Runtime:
    autocast_dtype: Optional[torch.dtype]
    threads: Optional[int]          # None: left as the caller had it
    memory: Optional[MemoryPlan]

    @property
    def gradient_checkpointing(self) -> bool:
        return bool(self.memory and self.memory.checkpointing)

    def state(self) -> dict:
        """What a resumed run must reuse to continue bit for bit."""
        return {"autocast": _dtype_name(self.autocast_dtype), "threads": self.threads}


@contextlib.contextmanager
def training_runtime(parts, job, config, resolution: int, resumed: Optional[dict] = None):
    """Chooses the run's threads, precision and checkpointing; puts the caller's thread count back
    on exit. `resumed` is a saved Runtime.state(): a resumed run keeps its choices. A CPU run that
    checkpoints has the memory freed during its steps returned to the system meanwhile
    (memory_plan.FreedMemoryReturn)."""
    previous = torch.get_num_threads()
    with FreedMemoryReturn(parts.device) as freed_memory_return:
        try:
            try:
                probe = UNetProbe(parts, resolution)
                decided = _decided_before(parts, resolution, previous, config.precision)
                resumed = resumed or decided or {}
                threads = _threads(parts.device, probe, previous, resumed.get("threads"))
                autocast = resolve_precision(config.precision, parts.device, probe, resumed.get("autocast"))
                _DECIDED[_decision_key(parts, resolution, previous, config.precision)] = {
                    "threads": threads, "autocast": _dtype_name(autocast)}
                # The probes' activations are freed; their pages go back before memory in use is read,
                # and so do those the plan's own pass over the UNet leaves.
                release_freed_memory()
                plan = plan_memory(parts, job, config.batch_size, resolution, autocast,
                                   resolved_optimizer_name(config, parts.device), checkpointing=False)
                release_freed_memory()
                plan = choose_checkpointing(plan, check_setting(config.gradient_checkpointing))
                if not plan.checkpointing:
                    freed_memory_return.stop()
            except KeyboardInterrupt:
                raise TrainingCancelled("training cancelled before its first step", last_save=None, step=0) from None
            yield Runtime(autocast_dtype=autocast, threads=threads, memory=plan)
        finally:
            torch.set_num_threads(previous)


# Timings are noisy, so two runs of the same model in one process could time their way to different
# threads or precision, and so to results that differ in the last bits. The first decision for a
# model, resolution and setting is kept for the rest of the process: runs in one ComfyUI session (or
# one test session) that should match bit for bit do.
_DECIDED: dict = {}


def _dtype_name(autocast_dtype: Optional[torch.dtype]) -> str:
    return "float32" if autocast_dtype is None else str(autocast_dtype).split(".")[-1]


def _decision_key(parts, resolution: int, previous_threads: int, precision: str) -> tuple:
    unet = parts.unet
    shapes = tuple((name, tuple(p.shape)) for name, p in unet.named_parameters())
    return (type(unet).__name__, hash(shapes), str(parts.device), resolution, previous_threads, precision)


def _decided_before(parts, resolution: int, previous_threads: int, precision: str) -> Optional[dict]:
    decided = _DECIDED.get(_decision_key(parts, resolution, previous_threads, precision))
    if decided is not None:
        log.info("threads and precision as decided for this model earlier in this process")
    return decided


# -- precision ---------------------------------------------------------------------------------------

def resolve_precision(precision: str, device: torch.device, probe: Optional["UNetProbe"] = None,
                      resumed: Optional[str] = None) -> Optional[torch.dtype]:
    """The autocast dtype, or None for plain fp32. The one place precision is decided."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if precision == "fp16" else torch.bfloat16
    if precision == "bf16" and cpu_has_native_bf16():
        return torch.bfloat16
    if precision in ("fp16", "bf16"):
        log.warning("precision %s asked for on %s; training in fp32 (%s)", precision, device.type,
                    "fp16 is much slower on a CPU" if precision == "fp16" else "this CPU has no bf16 units")
        return None
    if not (device.type == "cpu" and cpu_has_native_bf16()):
        return None
    if resumed is not None:
        log.info("precision auto: %s, as decided for this run before", resumed)
        return torch.bfloat16 if resumed == "bfloat16" else None
    if probe is None:
        return None
    times = probe.compare({"fp32": None, "bf16": torch.bfloat16}, PRECISION_PROBE_LATENT)
    chosen = times["bf16"] < BF16_MARGIN * times["fp32"]
    log.info("precision auto: %s (this CPU has bf16 units; one UNet forward+backward took %.0f ms in fp32, "
             "%.0f ms with bf16 autocast)", "bf16 autocast" if chosen else "fp32",
             times["fp32"] * 1e3, times["bf16"] * 1e3)
    return torch.bfloat16 if chosen else None


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16 units, from the CPU flags (Linux) or torch's CPU capability."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in NATIVE_BF16_FLAGS)
    except OSError:
        pass
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    return "AMX" in capability.upper()


# -- threads -----------------------------------------------------------------------------------------

def _threads(device, probe, previous: int, resumed: Optional[int]) -> Optional[int]:
    if device.type != "cpu" or previous <= 1:
        return None
    if resumed:
        torch.set_num_threads(resumed)
        log.info("training threads: %d, as decided for this run before (ComfyUI/caller had %d)", resumed, previous)
        return resumed
    candidates = sorted({1, max(1, previous // 2), previous})
    times = probe.compare({n: n for n in candidates}, THREAD_PROBE_LATENT, setup=torch.set_num_threads)
    chosen = min(candidates, key=lambda n: (times[n], n))
    torch.set_num_threads(chosen)
    log.info("training threads: %d of %d (one UNet forward+backward took %s; restored to %d afterwards)",
             chosen, previous, ", ".join(f"{times[n] * 1e3:.0f} ms with {n}" for n in candidates), previous)
    return chosen


# -- the probe ---------------------------------------------------------------------------------------

class UNetProbe:
    """Times one forward+backward of the run's UNet at batch 1 (gradients to the input only).

    The blocks are recomputed in the backward pass, as gradient checkpointing does, whatever the
    run's setting: the probe must not need more memory than the training it prepares. Without
    that, the bf16 pass kept autocast's bf16 copy of every UNet weight for its backward pass: at
    256 px on the full-size SD1.5 on a CPU it peaked 1.75 GiB above the loaded model, more than a
    checkpointed training step at 512 px. Both choices are timed the same way, so the comparison
    holds.
    """

    def __init__(self, parts, resolution: int, clock: Callable[[], float] = time.perf_counter):
        self.parts, self.clock = parts, clock
        self.latent = max(1, resolution // 8)
        self._context = None

    def compare(self, choices: dict, max_latent: int, setup=None) -> dict:
        """Median seconds of a pass for each choice ({name: value}), alternating between choices.
        `setup(value)` is applied before each pass; a value that is a dtype is used for autocast."""
        times = {name: [] for name in choices}
        repeats = PROBE_REPEATS
        with gradient_checkpointing(self.parts.unet):
            for round_ in range(repeats + 1):  # the first round warms up and is not counted
                for name, value in choices.items():
                    if setup is not None:
                        setup(value)
                    seconds = self.pass_seconds(value if isinstance(value, torch.dtype) else None, max_latent)
                    if round_:
                        times[name].append(seconds)
                    elif seconds > SLOW_PASS_SECONDS:
                        repeats = 1
                if round_ >= repeats:
                    break
        return {name: statistics.median(values) for name, values in times.items()}

    def pass_seconds(self, autocast_dtype, max_latent: int) -> float:
        parts = self.parts
        latent = min(max_latent, self.latent)
        if self._context is None:
            with torch.no_grad():
                self._context = parts.encode_text([""]).detach()
        x = torch.zeros(1, 4, latent, latent, device=parts.device, dtype=parts.dtype, requires_grad=True)
        t = torch.full((1,), 500, device=parts.device)
        autocast = (torch.autocast(parts.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
        start = self.clock()
        with torch.enable_grad():
            with autocast:
                out = parts.predict_noise(x, t, self._context)
            torch.autograd.grad(out.float().square().mean(), x)
        return self.clock() - start
