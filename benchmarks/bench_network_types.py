"""File size and step time of the four LoRATrain network types (lora, locon, loha, lokr) at one rank.

    python benchmarks/bench_network_types.py [--rank 4] [--rounds 30] [--threads 1] [--resolution 64]

Step times: the tiny built-in model (trainer_core's diffusers backend), one process, the types
interleaved round by round (lora, locon, loha, lokr, lora, ...) so that a busy machine slows them
alike; the median of each type's steps and its ratio to lora are printed. A step is what the
trainer does per step: forward and backward of the UNet with the network attached, and an AdamW
update. File sizes: the tensors of the file LoRATrain writes (fp32) for the tiny model and for
the SD1.5 UNet's shapes (from trainer_core/configs/sd15, built on the meta device: no weights).
lokr needs the lycoris-lora package.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer_core.adapters.lora import NETWORK_TYPES, LoRAConfig, LoRANetwork  # noqa: E402
from trainer_core.backends import diffusers as backend  # noqa: E402


def config(network_type, rank):
    return LoRAConfig(rank=rank, alpha=rank, conv_rank=rank, conv_alpha=rank, network_type=network_type)


def file_bytes(network) -> int:
    return sum(t.numel() * t.element_size() for t in network.kohya_state_dict(dtype=None).values())


def sd15_unet_targets():
    from diffusers import UNet2DConditionModel
    unet_config = UNet2DConditionModel.load_config(os.path.join(backend.SD15_CONFIG_DIR, "unet"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    return backend.kohya_unet_targets(unet), backend.kohya_unet_conv_targets(unet)


def step_timer(parts, network, resolution):
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    size = resolution // 8
    x = torch.randn((1, 4, size, size), generator=generator)
    target = torch.randn((1, 4, size, size), generator=generator)
    context = parts.encode_text(["skkmtn"]).detach()
    t = torch.tensor([500])

    def step() -> float:
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with network.attached():
            loss = torch.nn.functional.mse_loss(parts.predict_noise(x, t, context), target)
            loss.backward()
        optimizer.step()
        return time.perf_counter() - started
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    parts = backend.tiny_parts(seed=0)
    sd15_unet, sd15_convs = sd15_unet_targets()
    networks, timers, sizes = {}, {}, {}
    for network_type in NETWORK_TYPES:
        torch.manual_seed(0)
        networks[network_type] = LoRANetwork(parts.unet_lora_targets, {}, config(network_type, args.rank),
                                             conv_targets=parts.unet_conv_targets)
        timers[network_type] = step_timer(parts, networks[network_type], args.resolution)
        full = LoRANetwork(sd15_unet, {}, config(network_type, args.rank), conv_targets=sd15_convs)
        sizes[network_type] = (file_bytes(networks[network_type]), file_bytes(full), len(full.loras()))

    times = {network_type: [] for network_type in NETWORK_TYPES}
    for round_index in range(args.warmup + args.rounds):
        for network_type in NETWORK_TYPES:
            seconds = timers[network_type]()
            if round_index >= args.warmup:
                times[network_type].append(seconds)

    print(f"rank {args.rank} (alpha = rank; conv_rank = rank for locon/loha/lokr; lokr factor -1), UNet only, "
          f"{args.resolution} px, batch 1, {args.threads} thread(s), {args.rounds} interleaved rounds")
    print(f"{'type':6} {'tiny file':>10} {'SD1.5 file':>11} {'SD1.5 modules':>14} {'tiny step ms':>13} {'vs lora':>8}")
    base = statistics.median(times["lora"])
    for network_type in NETWORK_TYPES:
        tiny, full, modules = sizes[network_type]
        median = statistics.median(times[network_type])
        print(f"{network_type:6} {tiny / 1024:>8.1f} K {full / 2**20:>9.2f} M {modules:>14} {median * 1000:>13.1f} "
              f"{median / base:>7.2f}x")


if __name__ == "__main__":
    main()
