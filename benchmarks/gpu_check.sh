#!/usr/bin/env bash
# The GPU check of issue 17: the CUDA tests, then CLI training on the random full-size SD1.5 at
# 512 px (rank 8, batch 1) in three precisions, on a bare CUDA machine that has torch and no network.
#
#   benchmarks/gpu_check.sh --prepare    here, with a package index: packs the Python packages the
#                                        GPU machine lacks into .gpu_check/wheels.tar.xz (about
#                                        41 MiB). Carry that one path to the GPU machine.
#   benchmarks/gpu_check.sh              there: installs them offline (pip --no-index), then runs
#                                        the checks. About 3-4 minutes on one H100 (at most 6).
#   benchmarks/gpu_check.sh --dry-run    prints every step instead of running it.
#   benchmarks/gpu_check.sh --no-install runs the checks with the packages already installed.
#
# Settings, each its own process so that torch.cuda.max_memory_allocated is its own:
#   1. fp16 autocast + AdamW8bit + gradient checkpointing + SDPA (target: peak <= 4 GB)
#   2. bf16 autocast, otherwise the same
#   3. fp32, otherwise the same
# Each prints s/step (median of the timed steps after one warm-up step), the peak allocated VRAM
# while training and the trainer's memory plan estimate ("estimate n/a" when it logs none).
#
# Environment: PYTHON (default python3); GPU_PYTHON_VERSION for --prepare when the GPU machine's
# Python differs from this one (e.g. 3.12); GPU_CHECK_RESOLUTION / GPU_CHECK_STEPS to shrink the
# run (e.g. 64 and 1 for a CPU smoke run with GPU_CHECK_ALLOW_CPU=1); SD15_FULL_SIZE_CHECKPOINT
# to reuse a written checkpoint (default .gpu_check/full_size_sd15_random.safetensors).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
WORK=.gpu_check
WHEELS_ARCHIVE="$WORK/wheels.tar.xz"
RESOLUTION="${GPU_CHECK_RESOLUTION:-512}"
STEPS="${GPU_CHECK_STEPS:-5}"
export SD15_FULL_SIZE_CHECKPOINT="${SD15_FULL_SIZE_CHECKPOINT:-$PWD/$WORK/full_size_sd15_random.safetensors}"
export PYTHONUNBUFFERED=1
# What the tests and the CLI need besides torch (requirements-dev.txt, plus bitsandbytes).
PACKAGES="diffusers transformers accelerate peft prodigyopt safetensors pillow numpy tqdm pytest hypothesis bitsandbytes"

mode=run
case "${1:-}" in
  --prepare) mode=prepare ;;
  --dry-run) mode=dry ;;
  --no-install) mode=no-install ;;
  "") ;;
  *) sed -n '2,24p' "$0"; exit 2 ;;
esac

step() {  # print a step; run it unless this is a dry run
  echo "+ $*"
  if [ "$mode" != dry ]; then "$@"; fi
}

if [ "$mode" = prepare ]; then
  mkdir -p "$WORK"
  # The packages and their dependencies as installed here, minus torch and what torch brings
  # (the GPU machine has its own), downloaded as wheels, stored uncompressed and packed with xz:
  # about half the size of the wheels as they come (xz -9; it takes 5-20 minutes). bitsandbytes keeps only its CPU library and
  # the ones for the CUDA major version of this torch build (GPU_CUDA_MAJOR overrides, e.g. 12).
  "$PYTHON" - "$WORK" "${GPU_PYTHON_VERSION:-}" "${GPU_CUDA_MAJOR:-}" $PACKAGES <<'EOF'
import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

from packaging.requirements import Requirement

work, python_version, cuda_major, packages = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]


def key(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(names, stop=()):
    found, todo = {}, list(names)
    while todo:
        name = todo.pop()
        if key(name) in found or key(name) in stop:
            continue
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            # Not installed here (bitsandbytes on a CPU machine): its newest wheel; its own
            # dependencies (torch, numpy, packaging) are among the others.
            found[key(name)] = None
            continue
        found[key(name)] = distribution.version
        for text in distribution.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


if not cuda_major:
    import torch
    cuda_major = (torch.version.cuda or "12").split(".")[0]
pins = closure(packages, stop=set(closure(["torch"])))
download = tempfile.mkdtemp(prefix="gpu_wheels_")
command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", download]
if python_version:
    command += ["--python-version", python_version, "--platform", "manylinux_2_28_x86_64"]
subprocess.run(command + [f"{name}=={version}" if version else name for name, version in sorted(pins.items())],
               check=True)

stored = os.path.join(download, "stored")
os.makedirs(stored)
kept_library = re.compile(rf"bitsandbytes/libbitsandbytes_(cpu|cuda{cuda_major}\d)\.")
for wheel in sorted(os.listdir(download)):
    if not wheel.endswith(".whl"):
        continue
    with zipfile.ZipFile(os.path.join(download, wheel)) as source, \
            zipfile.ZipFile(os.path.join(stored, wheel), "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            name = info.filename
            if name.startswith("bitsandbytes/libbitsandbytes_") and not kept_library.match(name):
                continue
            data = source.read(name)
            if wheel.startswith("bitsandbytes") and name.endswith(".dist-info/RECORD"):
                data = b"".join(line + b"\n" for line in data.splitlines()
                                if not line.startswith(b"bitsandbytes/libbitsandbytes_")
                                or kept_library.match(line.decode()))
            info.compress_type = zipfile.ZIP_STORED  # so xz, with its large window, compresses it
            target.writestr(info, data)
with open(os.path.join(stored, "requirements.txt"), "w", encoding="utf-8") as f:
    f.write("".join(f"{name}=={version}\n" if version else f"{name}\n" for name, version in sorted(pins.items())))
archive = os.path.join(work, "wheels.tar.xz")
with tarfile.open(archive + ".tmp", "w:xz", preset=9) as tar:  # a 64 MiB window spans wheels
    for name in sorted(os.listdir(stored)):
        tar.add(os.path.join(stored, name), arcname=name)
os.replace(archive + ".tmp", archive)
shutil.rmtree(download)
print(f"{archive}: {os.path.getsize(archive) / 2**20:.1f} MiB, {len(pins)} packages "
      f"(bitsandbytes libraries for CUDA {cuda_major}.x); carry this path to the GPU machine")
EOF
  exit 0
fi

started=$(date +%s)
if [ "$mode" != dry ] && [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check needs one (GPU_CHECK_ALLOW_CPU=1 runs it on the CPU)')"
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" || true

if [ "$mode" = run ] || [ "$mode" = dry ]; then
  echo "== installing the carried packages (offline)"
  if [ "$mode" = run ] && [ ! -f "$WHEELS_ARCHIVE" ]; then
    echo "$WHEELS_ARCHIVE is missing: make it with 'benchmarks/gpu_check.sh --prepare' where a package index is reachable, and carry it" >&2
    exit 1
  fi
  step mkdir -p "$WORK/wheels"
  step tar -xJf "$WHEELS_ARCHIVE" -C "$WORK/wheels"
  step "$PYTHON" -m pip install -q --no-index --find-links "$WORK/wheels" -r "$WORK/wheels/requirements.txt"
fi

echo "== the CUDA tests"
tests_status=0
# A failing test is reported at the end; the measurements still run.
step "$PYTHON" -m pytest -q -k cuda -p no:cacheprovider tests || tests_status=$?

echo "== the random full-size SD1.5 checkpoint"
step "$PYTHON" tests/integration/full_size_sd15.py "$SD15_FULL_SIZE_CHECKPOINT"

echo "== CLI training on it: ${RESOLUTION} px, rank 8, batch 1, 1 warm-up step + ${STEPS} timed"
results="$WORK/results.jsonl"
if [ "$mode" != dry ]; then : > "$results"; fi
for precision in fp16 bf16 fp32; do
  echo "-- precision $precision, AdamW8bit, gradient checkpointing"
  if [ "$mode" = dry ]; then
    step "$PYTHON" benchmarks/bench_cli.py --json --full-size --resolution "$RESOLUTION" --steps "$STEPS" \
      --precision "$precision" --optimizer AdamW8bit --gradient-checkpointing --no-bare
    continue
  fi
  "$PYTHON" benchmarks/bench_cli.py --json --full-size --resolution "$RESOLUTION" --steps "$STEPS" \
    --precision "$precision" --optimizer AdamW8bit --gradient-checkpointing --no-bare 2>&1 \
    | tee "$WORK/bench_$precision.log" | grep -E "^(device|trainer_core CLI)|attention:|AdamW8bit needs|bitsandbytes|precision|memory plan" || true
  grep '^BENCH_RESULT ' "$WORK/bench_$precision.log" | cut -d' ' -f2- >> "$results" \
    || echo "{\"precision\": \"$precision\", \"failed\": true}" >> "$results"
done

if [ "$mode" != dry ]; then
  echo "== summary"
  "$PYTHON" - "$results" <<'EOF'
import json
import sys

TARGET_MB = 4 * 1024
rows = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8") if line.strip()]
for row in rows:
    if row.get("failed"):
        print(f"{row['precision']:<5} FAILED (see .gpu_check/bench_{row['precision']}.log)")
        continue
    estimate = f"{row['estimate_mb']:.0f} MiB" if row.get("estimate_mb") is not None else "n/a"
    print(f"{row['precision']:<5} {row['ours_ms'] / 1000:.3f} s/step, peak {row['peak_kind']} while training "
          f"{row['peak_mb']:.0f} MiB, memory plan estimate {estimate}")
first = rows[0] if rows else {}
if first and not first.get("failed"):
    verdict = "PASS" if first["peak_mb"] <= TARGET_MB else "MISS"
    print(f"target: fp16 + AdamW8bit + checkpointing peak <= 4 GB: {verdict} {first['peak_mb'] / 1024:.2f} GiB")
EOF
fi
echo "gpu_check took $(( $(date +%s) - started )) s; CUDA tests exit status $tests_status"
exit "$tests_status"
