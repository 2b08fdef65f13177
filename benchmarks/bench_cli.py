"""Step time and peak memory of the standalone trainer, against a bare UNet forward+backward.

    python benchmarks/bench_cli.py [--model PATH] [--steps 30] [--batch 1] [--rank 4] [--threads 2]

With no --model it uses the tiny built-in model at 64px. It prints the median seconds per step
after warm-up (model load excluded), peak memory (RSS on CPU, allocated VRAM on CUDA), and the
ratio to the lower bound: one forward+backward of the same UNet with no adapter.
Compare only figures from one run with the same thread count. --json adds one machine-readable
line (read by bench_comfyui.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer_core.adapters.lora import LoRAConfig  # noqa: E402
from trainer_core.backends.diffusers import load_parts, tiny_parts  # noqa: E402
from trainer_core.config import TrainConfig  # noqa: E402
from trainer_core.dataset import DatasetConfig, ImageDataset  # noqa: E402
from trainer_core.train import Callbacks, train_lora  # noqa: E402

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
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--optimizer", default="AdamW")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolution = args.resolution or (512 if args.model else 64)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    parts = load_parts(args.model, device=device, dtype=dtype) if args.model else tiny_parts(device=device)
    dataset = ImageDataset.from_folder(DatasetConfig(folder=SAMPLES, instance_token="skkmtn",
                                                     resolution=resolution, bucketing=False, center_crop=True,
                                                     repeats=max(1, args.batch)))
    # The trainer encodes each picture the first time it is drawn: warm up past the first epoch.
    warmup = math.ceil(len(dataset) * dataset.config.repeats / args.batch) + 1
    stamps = []
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(output_dir=out, output_name="bench", steps=warmup + args.steps,
                             batch_size=args.batch, precision=args.precision, optimizer=args.optimizer,
                             gradient_checkpointing=args.gradient_checkpointing)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        train_lora(parts, dataset, LoRAConfig(rank=args.rank, alpha=args.rank), config,
                   callbacks=Callbacks(on_step=lambda s, t, l: stamps.append(stamp())))
    timed = list(zip(stamps[warmup - 1:], stamps[warmup:]))
    ours, ours_cpu = medians(timed)
    peak = peak_memory_mb(device)
    bare, bare_cpu = bare_step_seconds(parts, args.batch, resolution, repeats=max(5, args.steps // 3))
    print(f"device {device}, threads {torch.get_num_threads()}, model {args.model or 'tiny built-in'}, "
          f"{resolution}px, batch {args.batch}, rank {args.rank}, precision {args.precision}")
    print(f"trainer_core CLI: {ours * 1000:.1f} ms/step (median of {len(timed)}; CPU time {ours_cpu * 1000:.1f} ms), "
          f"peak {'VRAM allocated' if device.type == 'cuda' else 'RSS'} {peak:.0f} MiB")
    print(f"bare UNet forward+backward: {bare * 1000:.1f} ms (CPU time {bare_cpu * 1000:.1f} ms)")
    print(f"ratio ours/bare: {ours / bare:.2f} (CPU time {ours_cpu / bare_cpu:.2f})")
    if args.json:
        print(RESULT_MARK + json.dumps({
            "ours_ms": ours * 1000, "bare_ms": bare * 1000, "ours_cpu_ms": ours_cpu * 1000,
            "bare_cpu_ms": bare_cpu * 1000, "model": args.model or "tiny built-in",
            "peak_kind": "VRAM allocated" if device.type == "cuda" else "RSS", "peak_mb": peak}))


if __name__ == "__main__":
    main()
