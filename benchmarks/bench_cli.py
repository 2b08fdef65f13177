"""Step time and peak memory of the standalone trainer, against a bare UNet forward+backward.

    python benchmarks/bench_cli.py [--model PATH] [--steps 30] [--batch 1] [--rank 4] [--threads 2]

With no --model it uses the tiny built-in model at 64px. It prints the median seconds per step
after warm-up (model load excluded), peak memory (RSS on CPU, allocated VRAM on CUDA), and the
ratio to the lower bound: one forward+backward of the same UNet with no adapter.
Compare only figures from one run with the same thread count.
"""
from __future__ import annotations

import argparse
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


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bare_step_seconds(parts, batch, resolution, repeats) -> float:
    """One UNet forward+backward with grads on the input only: the floor for any adapter trainer."""
    latent = resolution // 8
    times = []
    context = parts.encode_text(["skkmtn"] * batch).detach()
    for i in range(WARMUP + repeats):
        x = torch.randn(batch, 4, latent, latent, device=parts.device, dtype=parts.dtype, requires_grad=True)
        t = torch.randint(0, 1000, (batch,), device=parts.device)
        start = time.perf_counter()
        out = parts.predict_noise(x, t, context)
        out.float().pow(2).mean().backward()
        if parts.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolution = args.resolution or (512 if args.model else 64)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    parts = load_parts(args.model, device=device, dtype=dtype) if args.model else tiny_parts(device=device)
    dataset = ImageDataset.from_folder(DatasetConfig(folder=SAMPLES, instance_token="skkmtn",
                                                     resolution=resolution, bucketing=False, center_crop=True,
                                                     repeats=max(1, args.batch)))
    stamps = []
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(output_dir=out, output_name="bench", steps=WARMUP + args.steps,
                             batch_size=args.batch, precision=args.precision, optimizer=args.optimizer,
                             gradient_checkpointing=args.gradient_checkpointing)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        train_lora(parts, dataset, LoRAConfig(rank=args.rank, alpha=args.rank), config,
                   callbacks=Callbacks(on_step=lambda s, t, l: stamps.append(time.perf_counter())))
    step_times = [b - a for a, b in zip(stamps[WARMUP:], stamps[WARMUP + 1:])]
    ours = statistics.median(step_times)
    peak = peak_memory_mb(device)
    bare = bare_step_seconds(parts, args.batch, resolution, repeats=max(5, args.steps // 3))
    print(f"device {device}, threads {torch.get_num_threads()}, model {args.model or 'tiny built-in'}, "
          f"{resolution}px, batch {args.batch}, rank {args.rank}, precision {args.precision}")
    print(f"trainer_core CLI: {ours * 1000:.1f} ms/step (median of {len(step_times)}), "
          f"peak {'VRAM allocated' if device.type == 'cuda' else 'RSS'} {peak:.0f} MiB")
    print(f"bare UNet forward+backward: {bare * 1000:.1f} ms")
    print(f"ratio ours/bare: {ours / bare:.2f}")


if __name__ == "__main__":
    main()
