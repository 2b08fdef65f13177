"""Step time and peak memory of the standalone trainer, against a bare UNet forward+backward.

    python benchmarks/bench_cli.py [--model PATH | --full-size] [--steps 30] [--batch 1] [--rank 4]
        [--threads 2] [--precision auto] [--optimizer AdamW] [--gradient-checkpointing]

With no --model it uses the tiny built-in model at 64px; --full-size uses the random full-size
SD1.5 checkpoint (tests/integration/full_size_sd15.py, written on first use, cached at
$SD15_FULL_SIZE_CHECKPOINT) at 512 px, rank 8, one picture, 3 timed steps. It prints the median
seconds per step after warm-up (model load excluded), peak memory (RSS on CPU, allocated VRAM on
CUDA), the memory added while training, the trainer's memory plan estimate (when it logs one),
and the ratio to the lower bound: one forward+backward of the same UNet with no adapter
(--no-bare skips it). Compare only figures from one run with the same thread count. --json adds
one machine-readable line (read by bench_comfyui.py and gpu_check.sh).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from trainer_core.adapters.lora import LoRAConfig  # noqa: E402
from trainer_core.backends.diffusers import load_parts, tiny_parts  # noqa: E402
from trainer_core.config import TrainConfig  # noqa: E402
from trainer_core.dataset import DatasetConfig, ImageDataset  # noqa: E402
from trainer_core.cli import model_dtype  # noqa: E402
from trainer_core.train import Callbacks, train_lora  # noqa: E402
from bench_common import (  # noqa: E402
    MemoryPlanCatcher, busy_core, estimate_text, full_size_checkpoint, reset_peak_rss, sample_subset, status_mb)

SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sample_dataset")
WARMUP = 3
RESULT_MARK = "BENCH_RESULT "


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    # VmHWM where Linux has it: ru_maxrss of a child process starts at its parent's peak.
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status", encoding="ascii") as f:
            for row in f:
                if row.startswith("VmHWM:"):
                    return int(row.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stamp() -> tuple:
    """(wall clock, this process's CPU time) in seconds. On a CPU shared with other work the CPU
    time per step stays steady where the wall clock does not."""
    return time.perf_counter(), time.process_time()


def medians(pairs) -> tuple:
    """Median (wall, CPU) seconds of (start stamp, end stamp) pairs."""
    return tuple(statistics.median(end[i] - start[i] for start, end in pairs) for i in (0, 1))


def bare_step_seconds(parts, batch, resolution, repeats) -> tuple:
    """One UNet forward+backward with grads on the input only: the floor for any adapter trainer."""
    latent = resolution // 8
    timed = []
    context = parts.encode_text(["skkmtn"] * batch).detach()
    for i in range(WARMUP + repeats):
        x = torch.randn(batch, 4, latent, latent, device=parts.device, dtype=parts.dtype, requires_grad=True)
        t = torch.randint(0, 1000, (batch,), device=parts.device)
        start = stamp()
        out = parts.predict_noise(x, t, context)
        out.float().pow(2).mean().backward()
        if parts.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= WARMUP:
            timed.append((start, stamp()))
    return medians(timed)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="")
    parser.add_argument("--full-size", action="store_true",
                        help="the random full-size SD1.5 checkpoint; defaults 512 px, rank 8, 1 picture, 3 steps")
    parser.add_argument("--steps", type=int, help="timed steps after warm-up (default 30; 3 with --full-size)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, help="default 4; 8 with --full-size")
    parser.add_argument("--resolution", type=int, default=0)
    parser.add_argument("--pictures", type=int, help="train on the first N sample pictures (default all 8; "
                                                     "1 with --full-size, so one warm-up step encodes them all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--optimizer", default="AdamW")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--busy-core", action="store_true", help="run `yes > /dev/null` beside the training")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare forward+backward")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = parser.parse_args()
    # As the CLI does: the trainer's choices (attention kernel, optimizer fallback, memory plan) show.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    steps = args.steps or (3 if args.full_size else 30)
    rank = args.rank or (8 if args.full_size else 4)
    pictures = args.pictures or (1 if args.full_size else 0)
    model = full_size_checkpoint() if args.full_size else args.model
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolution = args.resolution or (512 if model else 64)
    plan = MemoryPlanCatcher()
    plan.enable()
    parts = load_parts(model, device=device, dtype=model_dtype(device, args.precision)) if model \
        else tiny_parts(device=device)
    stamps = []
    with tempfile.TemporaryDirectory() as out:
        folder = sample_subset(os.path.join(out, "pictures"), pictures) if pictures else SAMPLES
        dataset = ImageDataset.from_folder(DatasetConfig(folder=folder, instance_token="skkmtn",
                                                         resolution=resolution, bucketing=False, center_crop=True,
                                                         repeats=max(1, args.batch)))
        # The trainer encodes each picture the first time it is drawn: warm up past the first epoch.
        warmup = math.ceil(len(dataset) * dataset.config.repeats / args.batch) + (0 if pictures else 1)
        config = TrainConfig(output_dir=out, output_name="bench", steps=warmup + steps,
                             batch_size=args.batch, precision=args.precision, optimizer=args.optimizer,
                             gradient_checkpointing=args.gradient_checkpointing)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start_memory = current_memory_mb(device)
        load_peak = peak_memory_mb(device)  # loading the model may peak higher than training
        peak_reset = reset_peak_rss() if device.type == "cpu" else True
        with busy_core(args.busy_core):
            train_lora(parts, dataset, LoRAConfig(rank=rank, alpha=rank), config,
                       callbacks=Callbacks(on_step=lambda s, t, l: stamps.append(stamp())))
    timed = list(zip(stamps[warmup - 1:], stamps[warmup:]))
    ours, ours_cpu = medians(timed)
    peak = peak_memory_mb(device)
    added = peak - start_memory if peak_reset else None
    peak_kind = "VRAM allocated" if device.type == "cuda" else "RSS"
    bare = bare_cpu = None
    if not args.no_bare:
        bare, bare_cpu = bare_step_seconds(parts, args.batch, resolution, repeats=max(5, steps // 3))
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, threads "
          f"{torch.get_num_threads()}, model {model or 'tiny built-in'}, {resolution}px, batch {args.batch}, rank "
          f"{rank}, precision {args.precision}, optimizer {args.optimizer}, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}{', one busy core beside it' if args.busy_core else ''}")
    added_text = f" (+{added:.0f} MiB while training)" if added is not None else ""
    if device.type == "cpu":
        added_text += f"; process peak RSS {max(load_peak, peak):.0f} MiB (model loading included)"
    print(f"trainer_core CLI: {ours:.3f} s/step (median of {len(timed)}; CPU time {ours_cpu:.3f} s), "
          f"peak {peak_kind} while training {peak:.0f} MiB{added_text}; "
          f"{estimate_text(plan.estimate_mb, peak, 'peak ' + peak_kind)}")
    if bare is not None:
        print(f"bare UNet forward+backward: {bare:.3f} s (CPU time {bare_cpu:.3f} s)")
        print(f"ratio ours/bare: {ours / bare:.2f} (CPU time {ours_cpu / bare_cpu:.2f})")
    if args.json:
        print(RESULT_MARK + json.dumps({
            "ours_ms": ours * 1000, "ours_cpu_ms": ours_cpu * 1000, "timed_steps": len(timed),
            "bare_ms": bare and bare * 1000, "bare_cpu_ms": bare_cpu and bare_cpu * 1000,
            "model": model or "tiny built-in", "peak_kind": peak_kind, "peak_mb": peak, "added_mb": added,
            "process_peak_mb": max(load_peak, peak),
            "estimate_mb": plan.estimate_mb, "busy_core": args.busy_core, "precision": args.precision,
            "optimizer": args.optimizer, "gradient_checkpointing": args.gradient_checkpointing,
            "resolution": resolution, "rank": rank, "batch": args.batch}))


def current_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2 ** 20
    return status_mb("VmRSS") if os.path.exists("/proc/self/status") else 0.0


if __name__ == "__main__":
    main()
