"""Our LoRATrain node against ComfyUI's own TrainLoraNode, side by side in one real ComfyUI.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_comfyui.py [--checkpoint sd15.safetensors]
        [--steps 20] [--threads 2] [--rank 4] [--batch 1] [--resolution 64]

Both trainers train the same SD1 checkpoint on the same pictures (the pack's sample_dataset) at
the same resolution, batch, rank and number of steps, each as a queued prompt run by ComfyUI's
own executor:

  ours: CheckpointLoaderSimple -> LoadDataset -> LoRATrain -> SaveLoRANode
  core: CheckpointLoaderSimple -> LoadImageTextSetFromFolderNode (captions encoded by the CLIP)
        -> VAEEncode -> TrainLoraNode -> SaveLoRANode

Core's node runs at its fastest CPU setting (training_dtype and lora_dtype fp32, gradient
checkpointing off) and once more at its defaults (bf16, checkpointing on). Each trainer runs in
a fresh subprocess, so its peak memory (RSS on CPU, allocated VRAM on CUDA) is its own. Seconds
per step are the median step-to-step interval after warm-up, model load excluded: ours from its
progress bar, core's from its per-step loss callback (it has no progress bar). The lower bound
is one forward+backward of the same ComfyUI UNet with no adapter. The CLI line is
benchmarks/bench_cli.py on the diffusers backend (the tiny built-in model, or --checkpoint).
With no --checkpoint the tiny SD1 checkpoint of the integration tests is written and used.
Compare only figures from one run: the machine and thread count must be the same.

Full-size mode (issue 17): the whole SD1.5 architecture with random weights at 512 px.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_comfyui.py --full-size
        [--rows ours,ours_checkpointing,core_fp32,core_default,ours_busy,cli] [--steps 3]

The checkpoint is tests/integration/full_size_sd15.py's (written on first use, about 15-25 s;
$SD15_FULL_SIZE_CHECKPOINT keeps it between runs). Batch 1, rank 8, one picture (so one warm-up
step covers our first encode), one warm-up step, then --steps timed steps for every row. Each row
prints s/step, the process's peak RSS, the RSS added while the training node ran, and the
trainer's memory plan estimate against the measured peak; then the ratios against issue 17's
targets (TrainLoraNode at each setting, kohya sd-scripts' figure from the issue).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (  # noqa: E402
    KOHYA_PEAK_GB, KOHYA_SECONDS_PER_STEP, MemoryPlanCatcher, busy_core, estimate_text, full_size_checkpoint,
    sample_subset)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTEGRATION = os.path.join(REPO, "tests", "integration")
SAMPLES = os.path.join(REPO, "sample_dataset")
BENCH_CLI = os.path.join(REPO, "benchmarks", "bench_cli.py")
COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
RESULT_MARK = "BENCH_RESULT "
CHECKPOINT_NAME = "bench_sd1.safetensors"
CORE_DATASET_FOLDER = "bench_samples"
INSTANCE_TOKEN = "skkmtn"
LEARNING_RATE = 1e-4
WARMUP = 3
# Step timestamps come from these nodes of the prompts below.
OUR_TRAIN_NODE = "3"
CORE_TRAIN_NODE = "4"

TARGET_STEP_RATE = 1.5       # ours at least 1.5x core's step rate
TARGET_MEMORY = 0.8          # ours at most 0.8x core's peak memory
TARGET_OVER_BARE = 1.3       # ours at most 1.3x the bare forward+backward
TARGET_BATCH_SCALING = 8.0   # a batch of 8 costs at most 8x a batch of 1
TARGET_REQUEUE_SECONDS = 2.0


# -- measurement, in a fresh process per trainer -------------------------------------------------

def start_comfyui(spec):
    """A real ComfyUI in this process (the integration tests' harness), with the checkpoint and
    the core dataset folder in its model and input folders."""
    import torch
    torch.set_num_threads(spec["threads"])
    sys.path.insert(0, INTEGRATION)
    sys.path.insert(0, COMFYUI_PATH)
    if torch.cuda.is_available():
        # The harness puts ComfyUI on the CPU by setting its --cpu flag before
        # comfy.model_management is imported; importing it first keeps the GPU.
        import comfy.model_management  # noqa: F401
    root = spec["root"]
    for folder in ("checkpoints", "input"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    os.symlink(spec["checkpoint"], os.path.join(root, "checkpoints", CHECKPOINT_NAME))
    if spec.get("pictures"):
        sample_subset(os.path.join(root, "input", CORE_DATASET_FOLDER), spec["pictures"])
    else:
        shutil.copytree(SAMPLES, os.path.join(root, "input", CORE_DATASET_FOLDER))
    from comfy_harness import ComfyUI
    comfyui = ComfyUI(root)
    if not comfyui.pack_loaded:
        raise RuntimeError(f"the pack did not load into ComfyUI: {comfyui.pack_load_log}")
    return comfyui


def save_lora_node(comfyui) -> str:
    """Core's Save LoRA Weights node: SaveLoRANode up to ComfyUI 0.3.6x, SaveLoRA since."""
    return next(name for name in ("SaveLoRA", "SaveLoRANode") if name in comfyui.node_classes)


def inputs_with_defaults(comfyui, class_type, **values) -> dict:
    """Every widget input of a node at its default, then the given values (links included)."""
    inputs = {}
    definitions = comfyui.node_classes[class_type].INPUT_TYPES()
    for name, spec in definitions.get("required", {}).items():
        kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
        if "default" in options:
            inputs[name] = options["default"]
        elif isinstance(kind, list) and kind:
            inputs[name] = kind[0]
    inputs.update(values)
    return {"class_type": class_type, "inputs": inputs}


def build_our_prompt(comfyui, spec) -> dict:
    # With a picture count both trainers read the same subset, from the same input folder.
    sample_dataset = CORE_DATASET_FOLDER if spec.get("pictures") else comfyui.pack_module("nodes.dataset").SAMPLE_DATASET
    return {
        "1": inputs_with_defaults(comfyui, "CheckpointLoaderSimple", ckpt_name=CHECKPOINT_NAME),
        "2": inputs_with_defaults(comfyui, "LoadDataset", folder=sample_dataset, instance_token=INSTANCE_TOKEN,
                                  resolution=spec["resolution"], bucketing=False),
        OUR_TRAIN_NODE: inputs_with_defaults(
            comfyui, "LoRATrain", model=["1", 0], clip=["1", 1], vae=["1", 2], dataset=["2", 0],
            output_name="bench_ours", steps=spec["warmup"] + spec["steps"], learning_rate=LEARNING_RATE,
            rank=spec["rank"], alpha=float(spec["rank"]), batch_size=spec["batch"], precision="auto",
            gradient_checkpointing=spec.get("our_checkpointing", False), seed=0),
        "5": inputs_with_defaults(comfyui, save_lora_node(comfyui), lora=[OUR_TRAIN_NODE, 2], prefix="loras/bench_ours"),
    }


def build_core_prompt(comfyui, spec) -> dict:
    resolution = spec["resolution"]
    return {
        "1": inputs_with_defaults(comfyui, "CheckpointLoaderSimple", ckpt_name=CHECKPOINT_NAME),
        "2": inputs_with_defaults(comfyui, "LoadImageTextSetFromFolderNode", folder=CORE_DATASET_FOLDER,
                                  clip=["1", 1], resize_method="Stretch", width=resolution, height=resolution),
        "3": inputs_with_defaults(comfyui, "VAEEncode", pixels=["2", 0], vae=["1", 2]),
        CORE_TRAIN_NODE: inputs_with_defaults(
            comfyui, "TrainLoraNode", model=["1", 0], latents=["3", 0], positive=["2", 1],
            batch_size=spec["batch"], steps=spec["warmup"] + spec["steps"], grad_accumulation_steps=1,
            learning_rate=LEARNING_RATE, rank=spec["rank"], optimizer="AdamW", loss_function="MSE", seed=0,
            training_dtype=spec["core_dtype"], lora_dtype=spec["core_dtype"], algorithm="LoRA",
            gradient_checkpointing=spec["core_checkpointing"], existing_lora="[None]"),
        "5": inputs_with_defaults(comfyui, save_lora_node(comfyui), lora=[CORE_TRAIN_NODE, 1], prefix="loras/bench_core"),
    }


def stamp() -> tuple:
    """(wall clock, this process's CPU time) in seconds."""
    return time.perf_counter(), time.process_time()


def step_times(stamps, warmup) -> dict:
    """Step-to-step intervals after the warm-up steps (the first stamp also holds the setup)."""
    pairs = list(zip(stamps[warmup - 1:], stamps[warmup:]))
    return {"step_times": [b[0] - a[0] for a, b in pairs], "step_cpu_times": [b[1] - a[1] for a, b in pairs]}


def status_mb(field) -> float:
    """A memory line of /proc/self/status (VmRSS: now, VmHWM: peak since start or last reset).

    Not getrusage's ru_maxrss: on Linux a child starts with its parent's peak there."""
    with open("/proc/self/status", encoding="ascii") as f:
        for row in f:
            if row.startswith(field + ":"):
                return int(row.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class NodePeak:
    """Peak memory while one node of a prompt runs, beside the whole process's peak.

    ComfyUI announces each node it starts ("executing"); at the training node the RSS high-water
    mark (and CUDA's peak counter) is reset, and at the next node or the end of the prompt it is
    read. So model loading, which precedes the node, is left out, and what remains is the memory
    the trainer itself adds on top of the loaded model.
    """

    def __init__(self, server, node_id):
        self.node_id, self.start_rss, self.peak_rss, self.peak_vram = node_id, None, None, None
        self.peak_before = None
        send = server.send_sync

        def send_sync(event, data, sid=None):
            node = data.get("node") if isinstance(data, dict) else None
            if event == "executing" and node == self.node_id:
                self._reset()
            elif self.start_rss is not None and self.peak_rss is None and (
                    event == "executing" or event.startswith("execution_")):
                self._read()
            send(event, data, sid)
        server.send_sync = send_sync

    def _reset(self):
        import torch
        self.peak_before = status_mb("VmHWM")
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux 4.0+)
        self.start_rss = status_mb("VmRSS")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def _read(self):
        import torch
        self.peak_rss = status_mb("VmHWM")
        if torch.cuda.is_available():
            self.peak_vram = torch.cuda.max_memory_allocated() / 2 ** 20

    def figures(self) -> dict:
        process_peak = max(self.peak_before, status_mb("VmHWM"))
        return {"process_peak_rss_mb": process_peak, "node_start_rss_mb": self.start_rss,
                "node_peak_rss_mb": self.peak_rss, "node_peak_vram_mb": self.peak_vram}


def trained_parameters(lora_state_dict) -> int:
    """Trained numbers in a LoRA state dict (alpha scalars are settings, not trained)."""
    return sum(t.numel() for k, t in lora_state_dict.items() if not k.endswith(".alpha"))


def measure_ours(comfyui, spec) -> dict:
    prompt = build_our_prompt(comfyui, spec)
    stamps = {}

    def on_progress(node_id, value, total):
        # The node also updates the bar with a loss chart; the first update of a step marks it.
        if str(node_id) == OUR_TRAIN_NODE:
            stamps.setdefault(value, stamp())

    comfyui.on_progress = on_progress
    peak = NodePeak(comfyui.executor.server, OUR_TRAIN_NODE)
    run = comfyui.run(prompt)
    result = peak.figures()
    result.update(step_times([stamps[s] for s in sorted(stamps)], spec["warmup"]))
    result.update(steps_done=len(stamps), prompt_seconds=run.seconds,
                  trained_parameters=trained_parameters(run.output(OUR_TRAIN_NODE, 2)))
    if spec.get("requeue"):
        result.update(requeue(comfyui, prompt, stamps))
    return result


def requeue(comfyui, prompt, stamps) -> dict:
    """The same graph queued again: in the same ComfyUI (its in-memory cache) and in a fresh
    executor, as after restarting ComfyUI (the trainer's file cache). No step may run."""
    stamps.clear()
    same = comfyui.run(prompt)
    same_steps = len(stamps)
    stamps.clear()
    fresh = comfyui.run(prompt, executor=comfyui.new_executor())
    return {"requeue_seconds": same.seconds, "requeue_steps": same_steps,
            "requeue_cached": len(same.cached_nodes()), "restart_requeue_seconds": fresh.seconds,
            "restart_requeue_steps": len(stamps), "restart_requeue_cached": len(fresh.cached_nodes())}


def measure_core(comfyui, spec) -> dict:
    import importlib
    module = importlib.import_module(comfyui.node_classes["TrainLoraNode"].__module__)
    stamps = []

    class TimedTrainSampler(module.TrainSampler):
        """Core's sampler with a timestamp at every step (its loss callback runs once a step)."""

        def __init__(self, *args, loss_callback=None, **kwargs):
            def timed(loss):
                stamps.append(stamp())
                if loss_callback is not None:
                    loss_callback(loss)
            super().__init__(*args, loss_callback=timed, **kwargs)

    module.TrainSampler = TimedTrainSampler
    peak = NodePeak(comfyui.executor.server, CORE_TRAIN_NODE)
    run = comfyui.run(build_core_prompt(comfyui, spec))
    result = peak.figures()
    result.update(step_times(stamps, spec["warmup"]))
    result.update(steps_done=len(stamps),
                  prompt_seconds=run.seconds, trained_parameters=trained_parameters(run.output(CORE_TRAIN_NODE, 1)))
    return result


def measure_bare(comfyui, spec) -> dict:
    """One forward+backward of the ComfyUI UNet with no adapter and frozen weights (gradients to
    the input only): the floor for any adapter trainer on this model. Its attention is the one our
    trainer runs (torch SDPA where this ComfyUI lets a call choose, nodes/comfy_bridge.py's
    training_attention), not ComfyUI's start-up choice (sub-quadratic on a CPU), so the two differ
    by what the trainer adds only."""
    import comfy.model_management
    import nodes
    import torch
    model, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(CHECKPOINT_NAME)[:3]
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    unet = model.model.diffusion_model.requires_grad_(False)
    dtype = model.model.manual_cast_dtype or model.model.get_dtype()
    device = comfy.model_management.get_torch_device()
    with torch.no_grad():
        context = clip.encode_from_tokens(clip.tokenize(INSTANCE_TOKEN)).to(device, dtype)
    batch, latent = spec["batch"], spec["resolution"] // 8
    context = context.expand(batch, -1, -1)
    attention = comfyui.pack_module("nodes.comfy_bridge").training_attention()
    stamps = []
    for _ in range(spec["warmup"] + spec["steps"]):
        x = torch.randn(batch, 4, latent, latent, device=device, dtype=dtype, requires_grad=True)
        t = torch.randint(0, 1000, (batch,), device=device).float()
        options = {} if attention is None else {"optimized_attention_override": attention}
        start = stamp()
        out = unet(x, timesteps=t, context=context, transformer_options=options)
        out.float().pow(2).mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append((start, stamp()))
    timed = stamps[spec["warmup"]:]
    return {"step_times": [end[0] - start[0] for start, end in timed],
            "step_cpu_times": [end[1] - start[1] for start, end in timed], "steps_done": len(stamps)}


MEASURES = {"ours": measure_ours, "core": measure_core, "bare": measure_bare}


def worker(spec: dict) -> None:
    plan = MemoryPlanCatcher()
    comfyui = start_comfyui(spec)
    plan.enable()
    import torch
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with busy_core(spec.get("busy_core", False)):
        result = MEASURES[spec["kind"]](comfyui, spec)
    result.update(estimate_mb=plan.estimate_mb, busy_core=spec.get("busy_core", False))
    planned = spec["warmup"] + spec["steps"]
    if result["steps_done"] != planned:
        raise RuntimeError(f"{spec['kind']}: {result['steps_done']} steps timed, {planned} planned")
    import comfy.model_management
    result.update(device=str(comfy.model_management.get_torch_device()), threads=torch.get_num_threads())
    print(RESULT_MARK + json.dumps(result), flush=True)


# -- the run: one subprocess per measurement -----------------------------------------------------

def run_subprocess(command, threads, label) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    # OpenMP threads spin while they wait for each other by default; on a CPU shared with other
    # work that turns every descheduled thread into a stall and makes timings swing 4x. Passive
    # waiting (the same for every measurement) keeps them steady. A value set by the caller wins.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = (proc.stdout + proc.stderr)[-4000:]
    raise RuntimeError(f"{label}: the measurement failed (exit code {proc.returncode}):\n{tail}")


def measure(kind, args, root, checkpoint, **settings) -> dict:
    spec = dict(kind=kind, threads=args.threads, resolution=args.resolution, rank=args.rank, batch=args.batch,
                steps=args.steps, warmup=WARMUP, checkpoint=checkpoint,
                root=tempfile.mkdtemp(prefix=f"{kind}_", dir=root))
    spec.update(settings)
    label = f"{kind} {json.dumps({k: v for k, v in spec.items() if k not in ('root', 'checkpoint')})}"
    print(f"  running {label}", file=sys.stderr, flush=True)
    result = run_subprocess([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                            args.threads, label)
    print(f"  {line(kind, result)}", file=sys.stderr, flush=True)  # kept if a later measurement fails
    return result


def our_warmup(batch) -> int:
    """Our trainer encodes each picture the first time it is drawn (then keeps the latent), so its
    warm-up covers the first pass over the 8 sample pictures; core's VAEEncode runs before training."""
    return math.ceil(len(sample_images()) / batch) + 1


def sample_images() -> list:
    return [name for name in os.listdir(SAMPLES) if name.lower().endswith(".png")]


def measure_cli(args) -> dict:
    command = [sys.executable, BENCH_CLI, "--json", "--steps", str(args.steps), "--batch", str(args.batch),
               "--rank", str(args.rank), "--threads", str(args.threads), "--resolution", str(args.resolution)]
    if args.checkpoint:
        command += ["--model", args.checkpoint]
    print(f"  running {' '.join(command[1:])}", file=sys.stderr, flush=True)
    try:
        return run_subprocess(command, args.threads, "bench_cli.py")
    except RuntimeError as error:
        # The diffusers backend loads only full SD1.x files; the ComfyUI figures stand without it.
        return {"error": str(error).strip().splitlines()[-1]}


def measure_full_size_cli(args, checkpoint, busy=False) -> dict:
    command = [sys.executable, BENCH_CLI, "--json", "--model", checkpoint, "--pictures", "1", "--no-bare",
               "--steps", str(args.steps), "--batch", str(args.batch), "--rank", str(args.rank),
               "--threads", str(args.threads), "--resolution", str(args.resolution)]
    if busy:
        command.append("--busy-core")
    print(f"  running {' '.join(command[1:])}", file=sys.stderr, flush=True)
    result = run_subprocess(command, args.threads, "bench_cli.py")
    print(f"  cli: {result['ours_ms'] / 1000:.2f} s/step", file=sys.stderr, flush=True)
    return result


def write_tiny_checkpoint(path) -> None:
    sys.path.insert(0, INTEGRATION)
    sys.path.insert(0, COMFYUI_PATH)
    from comfy.cli_args import args
    args.cpu = True  # this process only writes the file; read when comfy.model_management is imported
    from tiny_sd1_checkpoint import write_tiny_sd1_checkpoint
    write_tiny_sd1_checkpoint(path)


def comfyui_version() -> str:
    try:
        with open(os.path.join(COMFYUI_PATH, "comfyui_version.py"), encoding="utf-8") as f:
            return f.read().split("__version__ = ")[1].split()[0].strip("\"'")
    except (OSError, IndexError):
        return "unknown"


# -- report --------------------------------------------------------------------------------------

def median_ms(result, clock="step_times") -> float:
    return statistics.median(result[clock]) * 1000


def ratio(a, b, clock) -> float:
    return median_ms(a, clock) / median_ms(b, clock)


def trainer_added_mb(result) -> float:
    """Memory the training node added on top of what was resident when it started."""
    if result.get("node_peak_vram_mb") is not None:
        return result["node_peak_vram_mb"]
    return result["node_peak_rss_mb"] - result["node_start_rss_mb"]


def memory_text(result) -> str:
    if "node_peak_rss_mb" not in result:
        return "memory: n/a (no trainer)"
    vram = result.get("node_peak_vram_mb")
    vram_text = f"peak VRAM allocated while training {vram:.0f} MiB" if vram is not None else "VRAM not measured"
    return (f"process peak RSS {result['process_peak_rss_mb']:.0f} MiB, while training "
            f"{result['node_peak_rss_mb']:.0f} MiB (+{result['node_peak_rss_mb'] - result['node_start_rss_mb']:.0f} "
            f"over the loaded model); {vram_text}")


def line(name, result) -> str:
    times = result["step_times"]
    params = result.get("trained_parameters")
    extra = f"; {params / 1e6:.3f} M trained parameters" if params else ""
    return (f"{name:<40} {median_ms(result):7.1f} ms/step (median of {len(times)}, min {min(times) * 1000:.1f}, "
            f"max {max(times) * 1000:.1f}; CPU time {median_ms(result, 'step_cpu_times'):.1f} ms/step); "
            f"{memory_text(result)}{extra}")


def cli_line(cli) -> str:
    return (f"{'CLI   trainer_core, diffusers backend':<40} {cli['ours_ms']:7.1f} ms/step "
            f"(CPU time {cli['ours_cpu_ms']:.1f}); bare forward+backward of its own model {cli['bare_ms']:.1f} ms "
            f"(CPU time {cli['bare_cpu_ms']:.1f}), ratio {cli['ours_ms'] / cli['bare_ms']:.2f} "
            f"(CPU time {cli['ours_cpu_ms'] / cli['bare_cpu_ms']:.2f}); {cli['model']} model; "
            f"process peak {cli['peak_kind']} {cli['peak_mb']:.0f} MiB")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def timed_target(text, value, limit, at_least=False) -> str:
    """One target judged on the wall clock (as asked) and on CPU time (steady on a shared CPU)."""
    judged = [f"{clock} {verdict(v >= limit if at_least else v <= limit)} {v:.2f}"
              for clock, v in zip(("wall", "CPU"), value)]
    return f"  {text} {'>=' if at_least else '<='} {limit}: " + ", ".join(judged)


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def report(args, results, cli, total_seconds, load_before) -> None:
    ours, fastest, default, bare = results["ours"], results["core_fp32"], results["core_default"], results["bare"]
    b8_ours, b8_core = results.get("ours_b8"), results.get("core_fp32_b8")
    on_cuda = ours.get("node_peak_vram_mb") is not None
    clocks = ("step_times", "step_cpu_times")
    print(f"ComfyUI {comfyui_version()}, device {ours['device']}, torch threads {ours['threads']}, model "
          f"{args.checkpoint or 'tiny SD1 checkpoint (tests/integration/tiny_sd1_checkpoint.py)'}, "
          f"{args.resolution} px, batch {args.batch}, rank {args.rank}, {args.steps} timed steps after warm-up "
          f"(core defaults and batch 8: {len(default['step_times'])}); OMP_WAIT_POLICY "
          f"{os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}; load average before {load_before}, after {load_average()}")
    print(line("ours  LoRATrain (precision auto = fp32)", ours))
    print(line("ours  with gradient checkpointing", results["ours_checkpointing"]))
    print(line("core  TrainLoraNode fp32, no checkpointing", fastest))
    print(line("core  TrainLoraNode defaults (bf16, ckpt)", default))
    print(line("bare  UNet forward+backward, no adapter", bare))
    if b8_ours:
        print(line("ours  batch 8", b8_ours))
        print(line("core  fp32, batch 8", b8_core))
    if "error" in cli:
        print(f"{'CLI   trainer_core, diffusers backend':<40} failed: {cli['error']}")
    else:
        print(cli_line(cli))
    print(f"re-queue of the unchanged LoRA graph: same ComfyUI {ours['requeue_seconds']:.2f} s "
          f"({ours['requeue_steps']} training steps, {ours['requeue_cached']} nodes from ComfyUI's cache); after a "
          f"restart (new executor) {ours['restart_requeue_seconds']:.2f} s ({ours['restart_requeue_steps']} steps, "
          f"{ours['restart_requeue_cached']} nodes cached: checkpoint loaded again, LoRA from the trainer's "
          f"file cache)")

    rate = [ratio(fastest, ours, c) for c in clocks]
    rate_default = [ratio(default, ours, c) for c in clocks]
    memory_field = "node_peak_vram_mb" if on_cuda else "process_peak_rss_mb"
    memory = ours[memory_field] / fastest[memory_field]
    added = trainer_added_mb(ours) / trainer_added_mb(fastest)
    requeue = max(ours["requeue_seconds"], ours["restart_requeue_seconds"])
    no_steps = ours["requeue_steps"] == 0 and ours["restart_requeue_steps"] == 0
    print(f"ratios ours/core fp32: step time {1 / rate[0]:.2f} (CPU time {1 / rate[1]:.2f}), "
          f"{'peak VRAM' if on_cuda else 'process peak RSS'} {memory:.2f}, memory added by the trainer {added:.2f}; "
          f"ours/core defaults: step time {1 / rate_default[0]:.2f} (CPU time {1 / rate_default[1]:.2f})")
    saving = results["ours_checkpointing"]
    print(f"ours with gradient checkpointing / core fp32: step time {1 / ratio(fastest, saving, clocks[0]):.2f} "
          f"(CPU time {1 / ratio(fastest, saving, clocks[1]):.2f}), "
          f"{'peak VRAM' if on_cuda else 'process peak RSS'} {saving[memory_field] / fastest[memory_field]:.2f}, "
          f"memory added by the trainer {trainer_added_mb(saving) / trainer_added_mb(fastest):.2f}")
    print("targets (informational, one run; time targets judged on the wall clock and on CPU time):")
    print(timed_target("step rate ours/core fp32", rate, TARGET_STEP_RATE, at_least=True)
          + f" (ours/core defaults: wall {rate_default[0]:.2f}, CPU {rate_default[1]:.2f})")
    if on_cuda:
        print(f"  peak VRAM ours/core fp32 <= {TARGET_MEMORY}: {verdict(memory <= TARGET_MEMORY)} {memory:.2f}")
    else:
        print(f"  process peak RSS ours/core fp32 <= {TARGET_MEMORY}: {verdict(memory <= TARGET_MEMORY)} {memory:.2f}")
        print(f"  RSS added by the trainer ours/core fp32 <= {TARGET_MEMORY}: {verdict(added <= TARGET_MEMORY)} "
              f"{added:.2f} ({trainer_added_mb(ours):.0f} vs {trainer_added_mb(fastest):.0f} MiB)")
        print("  peak VRAM: not measured (no CUDA device)")
    print(timed_target("step time ours/bare forward+backward", [ratio(ours, bare, c) for c in clocks],
                       TARGET_OVER_BARE))
    if b8_ours:
        print(timed_target("batch 8 per step / batch 1, ours", [ratio(b8_ours, ours, c) for c in clocks],
                           TARGET_BATCH_SCALING) + " (core fp32: wall {:.2f}, CPU {:.2f})".format(
                               *[ratio(b8_core, fastest, c) for c in clocks]))
    else:
        print("  batch 8 per step / batch 1: not measured (--no-batch-8)")
    print(f"  re-queue unchanged graph, no training step, < {TARGET_REQUEUE_SECONDS:.0f} s: "
          f"{verdict(requeue < TARGET_REQUEUE_SECONDS and no_steps)} {requeue:.2f} s (the slower of the two)")
    print(f"benchmark wall time {total_seconds:.0f} s")


# -- full-size mode ------------------------------------------------------------------------------

FULL_SIZE_ROWS = {
    # row: (label, measurement kind, settings)
    "ours": ("ours  LoRATrain, defaults", "ours", {}),
    "ours_checkpointing": ("ours  with gradient checkpointing", "ours", {"our_checkpointing": True}),
    "core_fp32": ("core  TrainLoraNode fp32, no checkpointing", "core",
                  {"core_dtype": "fp32", "core_checkpointing": False}),
    "core_default": ("core  TrainLoraNode defaults (bf16, ckpt)", "core",
                     {"core_dtype": "bf16", "core_checkpointing": True}),
    "ours_busy": ("ours  defaults, one busy core beside it", "ours", {"busy_core": True}),
    "cli": ("CLI   trainer_core, diffusers backend", "cli", {}),
    "bare": ("bare  UNet forward+backward, no adapter", "bare", {}),
}
DEFAULT_FULL_SIZE_ROWS = "ours,ours_checkpointing,core_fp32,core_default,ours_busy,cli"
TARGET_ADDED_MEMORY = 0.6    # ours with checkpointing adds <= 0.6x what core adds at its lowest
TARGET_ESTIMATE = 0.25       # the memory plan within 25% of the measured peak


def run_full_size(args) -> None:
    rows = [row.strip() for row in args.rows.split(",") if row.strip()]
    unknown = [row for row in rows if row not in FULL_SIZE_ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {','.join(FULL_SIZE_ROWS)}")
    started, load_before = time.perf_counter(), load_average()
    checkpoint = os.path.abspath(args.checkpoint) if args.checkpoint else full_size_checkpoint()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_comfyui_") as root:
        for row in rows:
            _, kind, settings = FULL_SIZE_ROWS[row]
            if kind == "cli":
                results[row] = measure_full_size_cli(args, checkpoint)
            else:
                results[row] = measure(kind, args, root, checkpoint, warmup=1, pictures=1, **settings)
    report_full_size(args, checkpoint, results, time.perf_counter() - started, load_before)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(row.split(":", 1)[1].strip() for row in f if row.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def seconds(result) -> float:
    if "ours_ms" in result:  # bench_cli.py's figures
        return result["ours_ms"] / 1000
    return statistics.median(result["step_times"])


def added_mb(result):
    return result.get("added_mb") if "ours_ms" in result else trainer_added_mb(result)


def full_size_line(label, result) -> str:
    if "ours_ms" in result:
        timing = f"{seconds(result):6.2f} s/step (median of {result['timed_steps']})"
        memory = (f"process peak RSS {result['process_peak_mb']:.0f} MiB, while training {result['peak_mb']:.0f} MiB "
                  f"(+{result['added_mb'] or 0:.0f})")
        measured = result["peak_mb"]
    else:
        times = result["step_times"]
        timing = (f"{seconds(result):6.2f} s/step (median of {len(times)}, min {min(times):.2f}, max {max(times):.2f}; "
                  f"CPU time {statistics.median(result['step_cpu_times']):.2f})")
        if "node_peak_rss_mb" not in result:
            return f"{label:<44} {timing}"
        memory = (f"process peak RSS {result['process_peak_rss_mb']:.0f} MiB, while training "
                  f"{result['node_peak_rss_mb']:.0f} MiB (+{trainer_added_mb(result):.0f})")
        measured = result.get("node_peak_vram_mb") or result["node_peak_rss_mb"]
    if label.startswith("core"):
        estimate = "estimate n/a (core's node has no memory plan)"
    else:
        estimate = estimate_text(result.get("estimate_mb"), measured, "peak while training")
    return f"{label:<44} {timing}; {memory}; {estimate}"


def report_full_size(args, checkpoint, results, total_seconds, load_before) -> None:
    first = next((r for r in results.values() if "device" in r), {})
    print(f"full-size SD1.5 (random weights, {checkpoint}); ComfyUI {comfyui_version()}; {cpu_model()}; device "
          f"{first.get('device', 'cpu')}, torch threads {args.threads}; {args.resolution} px, batch {args.batch}, "
          f"rank {args.rank}, 1 picture, 1 warm-up step + {args.steps} timed; OMP_WAIT_POLICY "
          f"{os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}; load average before {load_before}, after {load_average()}")
    for row, result in results.items():
        print(full_size_line(FULL_SIZE_ROWS[row][0], result))
    print(f"{'kohya sd-scripts (issue 17, not run here)':<44} {KOHYA_SECONDS_PER_STEP:6.2f} s/step; process peak "
          f"{KOHYA_PEAK_GB} GB (fp32, checkpointing, --sdpa, cached latents, UNet only)")

    print("targets (informational, one run):")
    ours = results.get("ours")
    cores = {row: results[row] for row in ("core_fp32", "core_default") if row in results}
    if ours:
        for row, core in cores.items():
            speedup = seconds(core) / seconds(ours)
            print(f"  ours defaults faster than {row}: {verdict(speedup > 1)} {speedup:.2f}x "
                  f"({seconds(ours):.2f} vs {seconds(core):.2f} s/step)")
        if args.resolution == 512 and args.batch == 1 and args.rank == 8:
            kohya = KOHYA_SECONDS_PER_STEP / seconds(ours)
            print(f"  ours defaults at least as fast as kohya's {KOHYA_SECONDS_PER_STEP} s/step (the issue's figure, "
                  f"another run): {verdict(kohya >= 1)} {kohya:.2f}x")
        else:
            print("  against kohya: n/a (its figure is for 512 px, batch 1, rank 8)")
    saving = results.get("ours_checkpointing")
    if saving and cores:
        lowest_row = min(cores, key=lambda row: trainer_added_mb(cores[row]))
        share = trainer_added_mb(saving) / trainer_added_mb(cores[lowest_row])
        print(f"  ours with checkpointing adds <= {TARGET_ADDED_MEMORY}x what {lowest_row} (core's lowest) adds: "
              f"{verdict(share <= TARGET_ADDED_MEMORY)} {share:.2f} ({trainer_added_mb(saving):.0f} vs "
              f"{trainer_added_mb(cores[lowest_row]):.0f} MiB)")
    if ours and "ours_busy" in results:
        print(f"  ours with one busy core / idle: {seconds(results['ours_busy']) / seconds(ours):.2f}x the step time")
    for row, result in results.items():
        estimate = result.get("estimate_mb")
        measured = result.get("peak_mb") if "ours_ms" in result else (
            result.get("node_peak_vram_mb") or result.get("node_peak_rss_mb"))
        if FULL_SIZE_ROWS[row][1] in ("ours", "cli"):
            if estimate is None or not measured:
                print(f"  memory plan within {TARGET_ESTIMATE:.0%} ({row}): estimate n/a")
            else:
                error = estimate / measured - 1
                print(f"  memory plan within {TARGET_ESTIMATE:.0%} ({row}): {verdict(abs(error) <= TARGET_ESTIMATE)} "
                      f"{error:+.0%} ({estimate:.0f} vs {measured:.0f} MiB)")
    print(f"benchmark wall time {total_seconds:.0f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="", help="an SD1.x single-file checkpoint (default: the tiny one)")
    parser.add_argument("--steps", type=int, help="timed steps per trainer, after warm-up (default 20; "
                                                  "3 with --full-size)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, the same for every measurement")
    parser.add_argument("--rank", type=int, help="default 4; 8 with --full-size")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=0, help="default: 64 (tiny model), 512 (--checkpoint)")
    parser.add_argument("--no-batch-8", action="store_true",
                        help="skip the batch 8 runs: core's node samples batch x batch pictures per step, which "
                             "takes many minutes per step at large resolutions on a CPU")
    parser.add_argument("--full-size", action="store_true",
                        help="the random full-size SD1.5 checkpoint at 512 px (issue 17's rows; see --rows)")
    parser.add_argument("--rows", default=DEFAULT_FULL_SIZE_ROWS,
                        help=f"full-size rows to run, comma-separated, from {','.join(FULL_SIZE_ROWS)} "
                             f"(default {DEFAULT_FULL_SIZE_ROWS})")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--write-tiny-checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.write_tiny_checkpoint:
        write_tiny_checkpoint(args.write_tiny_checkpoint)
        return
    if not COMFYUI_PATH:
        parser.error("set COMFYUI_PATH to a ComfyUI checkout whose requirements are installed in this Python")
    args.resolution = args.resolution or (512 if args.checkpoint or args.full_size else 64)
    args.steps = args.steps or (3 if args.full_size else 20)
    args.rank = args.rank or (8 if args.full_size else 4)
    if args.full_size:
        run_full_size(args)
        return
    started, load_before = time.perf_counter(), load_average()
    with tempfile.TemporaryDirectory(prefix="bench_comfyui_") as root:
        checkpoint = os.path.abspath(args.checkpoint or os.path.join(root, "tiny_sd1.safetensors"))
        if not args.checkpoint:
            # In a subprocess: this process stays small, and so the memory its children start with.
            subprocess.run([sys.executable, os.path.abspath(__file__), "--write-tiny-checkpoint", checkpoint],
                           check=True, cwd=REPO)
        # Core's defaults run about ten times slower on a CPU: fewer timed steps keep the run short.
        slow_steps = max(3, args.steps // 4)
        batch_steps = max(3, args.steps // 4)
        results = {
            "ours": measure("ours", args, root, checkpoint, warmup=our_warmup(args.batch), requeue=True),
            "core_fp32": measure("core", args, root, checkpoint, core_dtype="fp32", core_checkpointing=False),
            "core_default": measure("core", args, root, checkpoint, core_dtype="bf16", core_checkpointing=True,
                                    steps=slow_steps),
            "ours_checkpointing": measure("ours", args, root, checkpoint, warmup=our_warmup(args.batch),
                                          our_checkpointing=True),
            "bare": measure("bare", args, root, checkpoint),
        }
        if not args.no_batch_8:
            results["ours_b8"] = measure("ours", args, root, checkpoint, batch=8, steps=batch_steps,
                                         warmup=our_warmup(8))
            results["core_fp32_b8"] = measure("core", args, root, checkpoint, batch=8, steps=batch_steps,
                                              core_dtype="fp32", core_checkpointing=False)
        cli = measure_cli(args)
    report(args, results, cli, time.perf_counter() - started, load_before)


if __name__ == "__main__":
    main()
