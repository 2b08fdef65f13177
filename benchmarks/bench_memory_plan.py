"""The memory plan's estimate against the measured peak memory of real training steps on a CPU.

    python benchmarks/bench_memory_plan.py [--full] [--steps 1] [--threads 1]

Each row trains a LoRA (rank 8, fp32, AdamW) with trainer_core on the diffusers backend in a
fresh process, so peaks never mix, and prints the plan's `estimated peak` (logged before the
first step) beside the process's measured peak RSS (VmHWM, reset with /proc/self/clear_refs just
before training), and the part training adds on top of the loaded model, estimated and measured.
Rows: the tiny built-in model at 64 and 256 px; with --full also a full-size SD1.5 UNet + CLIP-L +
VAE with random weights (the diffusers configs in trainer_core/configs/sd15; about 5-6 GB of RAM)
at 128 and 256 px, with and without gradient checkpointing. Linux only (reads /proc).
The target: the estimated peak within 25% of the measured peak.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(REPO, "sample_dataset")
TARGET = 0.25
TINY_ROWS = [("tiny", 64, "off", 1), ("tiny", 256, "off", 1), ("tiny", 256, "on", 1), ("tiny", 256, "off", 4)]
FULL_ROWS = [("full", 128, "off", 1), ("full", 256, "off", 1), ("full", 256, "on", 1)]


def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _full_parts():
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from trainer_core.backends import diffusers as backend
    configs = backend.SD15_CONFIG_DIR
    tiny = backend.tiny_components(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(configs, "unet")))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(os.path.join(configs, "text_encoder")))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(configs, "vae")))
    alphas_cumprod, prediction_type = backend.schedule_from_config(tiny["scheduler"].config)
    return backend.parts_from_diffusers(unet, text_encoder, tiny["tokenizer"], vae, alphas_cumprod, prediction_type,
                                        "cpu", torch.float32, name="random full-size SD1.5", model_hash="random")


def measure_row(model: str, resolution: int, checkpointing: str, batch: int, steps: int) -> dict:
    import torch
    sys.path.insert(0, REPO)
    from trainer_core.adapters.lora import LoRAConfig
    from trainer_core.backends.diffusers import tiny_parts
    from trainer_core.config import TrainConfig
    from trainer_core.dataset import DatasetConfig, ImageDataset
    from trainer_core.train import train_lora

    parts = tiny_parts(seed=0) if model == "tiny" else _full_parts()
    dataset = ImageDataset.from_folder(DatasetConfig(folder=SAMPLES, instance_token="skkmtn", resolution=resolution))
    lines = []

    class Lines(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())
    logger = logging.getLogger("trainer_core")
    logger.addHandler(Lines())
    logger.setLevel(logging.INFO)
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # the peak (VmHWM) starts again from the current RSS
    config = TrainConfig(output_dir=tempfile.mkdtemp(), steps=steps, precision="fp32", batch_size=batch,
                         gradient_checkpointing=checkpointing, seed=0)
    train_lora(parts, dataset, LoRAConfig(rank=8, alpha=8), config)
    peak = _status("VmHWM")
    plan = next(line for line in lines if line.startswith("memory plan:"))
    estimate = int(re.search(r"estimated peak (\d+) MiB", plan).group(1)) * 2 ** 20
    in_use = int(re.search(r"in use now (\d+) MiB", plan).group(1)) * 2 ** 20
    return {"model": model, "resolution": resolution, "checkpointing": checkpointing, "batch": batch,
            "threads": torch.get_num_threads(), "estimate": estimate, "peak": peak,
            "estimated_added": estimate - in_use, "added": peak - before, "plan": plan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also the full-size SD1.5 rows (5-6 GB of RAM)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        import torch
        torch.set_num_threads(args.threads)
        model, resolution, checkpointing, batch = json.loads(args.row)
        print("ROW " + json.dumps(measure_row(model, resolution, checkpointing, batch, args.steps)))
        return
    rows = TINY_ROWS + (FULL_ROWS if args.full else [])
    print(f"{'model':5} {'px':>4} {'ckpt':>4} {'batch':>5} | {'estimate':>9} {'peak RSS':>9} {'ratio':>6} | "
          f"{'est. added':>10} {'added':>7}")
    worst = 0.0
    for row in rows:
        done = subprocess.run([sys.executable, __file__, "--row", json.dumps(row), "--steps", str(args.steps),
                               "--threads", str(args.threads)], capture_output=True, text=True, cwd=REPO)
        found = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
        if not found:
            print(f"{row}: failed\n{done.stderr[-2000:]}")
            continue
        r = json.loads(found[0][4:])
        ratio = r["estimate"] / r["peak"]
        worst = max(worst, abs(ratio - 1))
        mib = 2 ** 20
        print(f"{r['model']:5} {r['resolution']:>4} {r['checkpointing']:>4} {r['batch']:>5} | "
              f"{r['estimate'] / mib:>6.0f} MiB {r['peak'] / mib:>5.0f} MiB {ratio:>6.2f} | "
              f"{r['estimated_added'] / mib:>6.0f} MiB {r['added'] / mib:>3.0f} MiB")
    print(f"largest deviation of the estimated peak: {worst:.0%} (target <= {TARGET:.0%}): "
          f"{'PASS' if worst <= TARGET else 'MISS'}")


if __name__ == "__main__":
    main()
