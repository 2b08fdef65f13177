"""The training loop shared by LoRA and hypernetwork training.

Every random choice of a step (batch order, flips, caption variants, noise, timesteps, dropout)
is drawn from generators seeded with (seed, step), so a run resumed from a save continues exactly
as the uninterrupted run would have.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .adapters.hypernetwork import learning_rate_warning
from .config import TrainConfig
from .errors import TrainerInputError, TrainingCancelled, TrainingStopped, name_of
from .formats import (atomic_write, check_writable_folder, load_training_state, remove_stale_temp_files,
                      save_training_state)
from .jobs import HypernetworkJob, LoRAJob, TrainingJob
from .memory_plan import gradient_checkpointing, release_freed_memory
from .optim import build_optimizer, lr_factor, resolved_optimizer_name
from .parts import ModelParts
from .plots import loss_chart, side_by_side
from .runtime import Runtime, training_runtime
from .sampling import sample_images

log = logging.getLogger(__name__)

STATE_SUFFIX = ".trainstate"
TEXT_CACHE_LIMIT = 1024
PREVIEW_INTERVAL_SECONDS = 2.0


@dataclass
class Callbacks:
    on_step: Optional[Callable[[int, int, float], None]] = None
    on_preview: Optional[Callable[[int, object], None]] = None
    should_stop: Optional[Callable[[], bool]] = None


@dataclass
class TrainResult:
    adapter: object
    final_path: str
    saved_paths: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    from_cache: bool = False
    kohya_state_dict: Optional[dict] = None


def train_lora(parts: ModelParts, dataset, lora_config, train_config: TrainConfig,
               regularization=None, callbacks: Optional[Callbacks] = None) -> TrainResult:
    lora_config.validate()
    with _seeded(train_config.seed):
        job = LoRAJob(parts, lora_config, train_config, dataset)
    return _run(parts, job, dataset, train_config, regularization, callbacks or Callbacks())


def train_hypernetwork(parts: ModelParts, dataset, hypernetwork_config, train_config: TrainConfig,
                       regularization=None, callbacks: Optional[Callbacks] = None) -> TrainResult:
    hypernetwork_config.validate()
    warning = learning_rate_warning(train_config.learning_rate)
    if warning:
        log.warning(warning)
    with _seeded(train_config.seed):
        job = HypernetworkJob(parts, hypernetwork_config, train_config, dataset)
    return _run(parts, job, dataset, train_config, regularization, callbacks or Callbacks())


def train_embedding(parts: ModelParts, dataset, embedding_config, train_config: TrainConfig,
                    regularization=None, callbacks: Optional[Callbacks] = None,
                    embedding_folders: Optional[list] = None) -> TrainResult:
    """Textual inversion or DreamArtist. `dataset` must already caption with `embedding:<name>`
    (adapters.embedding.embedding_dataset); `embedding_folders` are searched for other files that
    `embedding:<name>` would find (default: the output folder)."""
    from .adapters.embedding import EmbeddingJob
    embedding_config.validate()
    train_config.validate()
    with _seeded(train_config.seed):
        job = EmbeddingJob(parts, embedding_config, train_config, dataset)
    planned = [_step_path(job, train_config, s) for s in _save_steps(train_config)]
    planned.append(job.output_path(train_config.output_name))
    job.check_clashes(embedding_folders or [train_config.output_dir], planned, train_config.overwrite)
    return _run(parts, job, dataset, train_config, regularization, callbacks or Callbacks())


@contextlib.contextmanager
def _seeded(seed):
    """Initial adapter weights come from the run's seed, without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def training_key(description: dict, dataset, config: TrainConfig, regularization, base_model_hash: str) -> str:
    """Everything that changes what is learned; equal keys mean the same trained file.
    `description`: the job's describe()."""
    payload = {
        "adapter": description,
        "train": config.learning_key(),
        "dataset": dataset.fingerprint(),
        "regularization": None if regularization is None else {
            "dataset": regularization.dataset.fingerprint(),
            "prior_loss_weight": regularization.prior_loss_weight,
        },
        "base_model": base_model_hash,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _run(parts, job: TrainingJob, dataset, config: TrainConfig, regularization,
         callbacks: Callbacks) -> TrainResult:
    config.validate()
    if regularization is not None:
        regularization = regularization.for_dataset(dataset)
    images = dataset.summary()["num_train_images"]
    if config.batch_size > images:
        raise TrainerInputError(
            f"{name_of('batch_size')} {config.batch_size} is larger than the dataset ({images} images with "
            f"repeats): lower {name_of('batch_size')} or add images/repeats.")
    key = training_key(job.describe(), dataset, config, regularization, parts.base_model_hash)
    final_path = job.output_path(config.output_name)
    cached = _cache_hit(job, final_path, key, config)
    if cached is not None:
        return cached

    start_step, losses, optimizer_state, resumed_key, resumed_runtime = 0, [], None, None, None
    if config.resume_from:
        start_step, losses, optimizer_state, resumed_key, resumed_runtime = _resume(
            job, config.resume_from, resolved_optimizer_name(config, parts.device))
        if start_step >= config.steps:
            raise TrainerInputError(
                f"{name_of('resume_from')} {os.path.basename(config.resume_from)} is already at step "
                f"{start_step}; set {name_of('steps')} above {start_step} to train further.")

    # The files this run writes. Those of the run it continues are its own to replace.
    planned = [_step_path(job, config, s) for s in _save_steps(config) if s > start_step]
    planned.append(final_path)
    own_keys = {key, resumed_key} - {None}
    for path in planned:
        _check_may_write(path, own_keys, config)
    check_writable_folder(config.output_dir)
    for path in planned:
        remove_stale_temp_files(path, sidecars=(STATE_SUFFIX, ".optim"))

    devices = [parts.device.index or 0] if parts.device.type == "cuda" else []
    with training_runtime(parts, job, config, dataset.config.resolution, resumed_runtime) as runtime:
        loop = _Loop(parts, job, dataset, config, regularization, callbacks, key, runtime)
        with torch.random.fork_rng(devices=devices):
            saved = loop.run(start_step, losses, optimizer_state, final_path)
    return TrainResult(adapter=job.module, final_path=final_path, saved_paths=saved, losses=loop.losses,
                       from_cache=False, kohya_state_dict=job.file_state_dict())


def _step_path(job, config: TrainConfig, step: int) -> str:
    """An intermediate save: <output_name>_<step>, or the job's own naming (embeddings: <name>-<step>)."""
    name = getattr(job, "intermediate_name", None)
    return job.output_path(name(config.output_name, step) if name else f"{config.output_name}_{step}")


def _save_steps(config: TrainConfig) -> list:
    if config.save_every_steps <= 0:
        return []
    return list(range(config.save_every_steps, config.steps, config.save_every_steps))


def _state_path(path: str) -> str:
    return path + STATE_SUFFIX


def _read_state(path: str) -> Optional[dict]:
    state_path = _state_path(path)
    if not os.path.exists(state_path):
        return None
    return load_training_state(state_path)


def trained_already(description: dict, final_path: str, dataset, config: TrainConfig, regularization,
                    base_model_hash: str) -> bool:
    """Whether training would be a cache hit: `final_path` holds this very training (said in the
    log, as training would). Needs no model, so a front end can answer before loading one.
    `description`: the job's describe()."""
    if regularization is not None:
        regularization = regularization.for_dataset(dataset)
    key = training_key(description, dataset, config, regularization, base_model_hash)
    if _cached_state(final_path, key, config) is None:
        return False
    _say_already_trained(final_path)
    return True


def _say_already_trained(final_path):
    log.info("already trained: %s was trained with the same settings, data and model; not training again "
             "(%s trains it anew)", final_path, name_of("force_retrain"))


def _cached_state(final_path, key, config) -> Optional[dict]:
    if config.force_retrain or not os.path.exists(final_path):
        return None
    state = _read_state(final_path)
    return state if state is not None and state.get("training_key") == key else None


def _cache_hit(job, final_path, key, config) -> Optional[TrainResult]:
    state = _cached_state(final_path, key, config)
    if state is None:
        return None
    job.load_weights(final_path)
    _say_already_trained(final_path)
    return TrainResult(adapter=job.module, final_path=final_path, saved_paths=[],
                       losses=[tuple(x) for x in state.get("losses", [])],
                       from_cache=True, kohya_state_dict=job.file_state_dict())


def _check_may_write(path, own_keys, config):
    if not os.path.exists(path) or config.overwrite:
        return
    state = _read_state(path)
    if state is not None and state.get("training_key") in own_keys:
        return  # a save of this run, or of the run it continues: safe to replace
    hint = ""
    if state is not None and _same_but_steps(state.get("config"), config.learning_key()):
        hint = (f" It is this training at step {state.get('step')}: to train it further, set "
                f"{name_of('resume_from')} to it.")
    raise TrainerInputError(
        f"{path} already exists from a different training run. Change {name_of('output_name')}, or turn on "
        f"{name_of('overwrite')} to replace it.{hint}")


def _same_but_steps(saved: Optional[dict], ours: dict) -> bool:
    if not isinstance(saved, dict):
        return False
    return {k: v for k, v in saved.items() if k != "steps"} == {k: v for k, v in ours.items() if k != "steps"}


def _resume(job, path, optimizer_name):
    if not os.path.exists(path):
        raise TrainerInputError(f"{name_of('resume_from')}: {path} does not exist. Pick one of the saved files.")
    if not path.endswith(job.suffix):
        raise TrainerInputError(
            f"{name_of('resume_from')}: {os.path.basename(path)} is not a {job.kind} file. A {job.kind} run resumes "
            f"from a {job.suffix} file it saved ({job.other_kind_hint}).")
    step = job.load_weights(path)
    state = _read_state(path)
    if state is None:
        optimizer_state = job.read_foreign_optimizer_state(path)
        log.warning("resume_from: %s has no %s file; continuing from step %d with %s optimizer state",
                    path, STATE_SUFFIX, step, "its" if optimizer_state else "a fresh")
        return step, [], optimizer_state, None, None
    optimizer_state = state.get("optimizer")
    if state.get("optimizer_name", optimizer_name) != optimizer_name:
        log.warning("resume_from: %s was trained with %s; starting a fresh %s optimizer state",
                    path, state.get("optimizer_name"), optimizer_name)
        optimizer_state = None
    losses = [tuple(x) for x in state.get("losses", [])]
    return int(state["step"]), losses, optimizer_state, state.get("training_key"), state.get("runtime")


def _step_seed(seed: int, step: int, stream: int) -> int:
    return (seed * 1_000_003 + step * 7919 + stream) % (2 ** 63)


class _BatchStream:
    """Batches of one dataset in epoch order; batch n is the same whatever step training resumed at."""

    def __init__(self, dataset, batch_size: int, seed: int):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self._epochs = {}
        self.per_epoch = len(self._epoch(0))

    def _epoch(self, epoch: int) -> list:
        if epoch not in self._epochs:
            self._epochs = {epoch: self.dataset.epoch_batches(self.batch_size, random.Random(self.seed + epoch))}
        return self._epochs[epoch]

    def batch(self, n: int) -> list:
        epoch, index = divmod(n, self.per_epoch)
        return self._epoch(epoch)[index]


class _Loop:
    def __init__(self, parts: ModelParts, job: TrainingJob, dataset, config: TrainConfig, regularization,
                 callbacks, key, runtime: Runtime):
        self.parts, self.job, self.dataset, self.config = parts, job, dataset, config
        self.regularization, self.callbacks, self.key = regularization, callbacks, key
        self.device = parts.device
        self.runtime = runtime
        self.autocast_dtype = runtime.autocast_dtype
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.alphas_cumprod = parts.alphas_cumprod.to(self.device, torch.float32)
        self.instance_batches = _BatchStream(dataset, config.batch_size, config.seed)
        self.reg_batches = None if regularization is None else _BatchStream(
            regularization.dataset, config.batch_size, config.seed + 1)
        self.rank, self.world_size = _world()
        self.latent_cache = {}
        self.text_cache = {}
        self.losses = []
        self.saved = []
        self.last_save = None
        self._last_preview = 0.0

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, start_step, losses, optimizer_state, final_path) -> list:
        self.losses = list(losses)
        job, config = self.job, self.config
        optimizer, self.optimizer_name = build_optimizer(job.param_groups(), config)
        if optimizer_state:
            optimizer.load_state_dict(optimizer_state)
        base_lrs = [group["lr"] for group in optimizer.param_groups]
        job.module.train()
        log.info("training %s for steps %d..%d on %s (%s)", job.kind, start_step + 1, config.steps,
                 self.device, self.autocast_dtype or "fp32")
        with contextlib.ExitStack() as stack:
            stack.enter_context(job.attached())
            if self.runtime.gradient_checkpointing:
                stack.enter_context(gradient_checkpointing(self.parts.unet))
            for step in range(start_step + 1, config.steps + 1):
                if self.callbacks.should_stop and self.callbacks.should_stop():
                    raise TrainingCancelled(
                        f"training cancelled at step {step - 1}", last_save=self.last_save, step=step - 1)
                factor = lr_factor(step - 1, config)
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * factor
                loss = self._guarded_step(optimizer, step)
                self.losses.append((step, loss))
                if self.callbacks.on_step and self.rank == 0:
                    self.callbacks.on_step(step, config.steps, loss)
                if config.save_every_steps and step % config.save_every_steps == 0 and step < config.steps:
                    self._save(_step_path(job, config, step), step, optimizer)
                # The last step always shows its chart (and sample) while the adapter is attached.
                self._maybe_preview(step, force=step == config.steps)
            self._save(final_path, config.steps, optimizer)
        job.module.eval()
        return self.saved

    def _guarded_step(self, optimizer, step) -> float:
        try:
            return self._optimizer_step(optimizer, step)
        except KeyboardInterrupt:
            raise TrainingCancelled(f"training interrupted during step {step} ({self._where()})",
                                    last_save=self.last_save, step=step - 1) from None
        except torch.OutOfMemoryError as error:
            optimizer.zero_grad(set_to_none=True)
            raise TrainingStopped(
                f"out of memory at step {step} on {self.device} ({self._where()}). To use less memory: "
                f"{name_of('batch_size')} 1, a lower {name_of('resolution')}, {name_of('gradient_checkpointing')} "
                f"on, {name_of('precision')} auto/fp16, {name_of('optimizer')} AdamW8bit, "
                f"{name_of('train_text_encoder')} off, a lower {name_of('rank')}.",
                last_save=self.last_save, step=step - 1) from error

    def _where(self) -> str:
        return f"last good save: {self.last_save}" if self.last_save else "nothing was saved"

    def _optimizer_step(self, optimizer, step) -> float:
        config = self.config
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(config.gradient_accumulation):
            # With several processes each takes its own micro-batches of the same stream.
            n = ((step - 1) * config.gradient_accumulation + micro) * self.world_size + self.rank
            torch.manual_seed(_step_seed(config.seed, n, 0))  # adapter dropout
            loss = self._micro_batch_loss(self.dataset, self.instance_batches.batch(n), n, stream=1)
            loss = loss / config.gradient_accumulation
            self._backward(loss)
            value = loss.detach()
            if self.reg_batches is not None:
                reg = self._micro_batch_loss(self.regularization.dataset, self.reg_batches.batch(n), n, stream=2)
                reg = reg * (self.regularization.prior_loss_weight / config.gradient_accumulation)
                self._backward(reg)
                value = value + reg.detach()
            total += float(value)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.world_size > 1:
            total = _average_across_processes(params, total)
        if not math.isfinite(total):
            self._stop_non_finite(step)
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        return total

    def _backward(self, loss):
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _stop_non_finite(self, step):
        raise TrainingStopped(
            f"the loss became NaN/inf at step {step}; training stopped ({self._where()}). Lower "
            f"{name_of('learning_rate')} (now {self.config.learning_rate:g}), or use {name_of('precision')} "
            f"fp32/bf16 instead of fp16.",
            last_save=self.last_save, step=step - 1)

    def _micro_batch_loss(self, dataset, indices, n, stream) -> torch.Tensor:
        rng = random.Random(_step_seed(self.config.seed, n, stream))
        generator = torch.Generator().manual_seed(_step_seed(self.config.seed, n, stream + 10))
        flips = [dataset.config.flip and rng.random() < 0.5 for _ in indices]
        captions = [dataset.caption(i, rng) for i in indices]
        latents = self._latents(dataset, indices, flips, n, stream)
        batch = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        if self.config.noise_offset:
            offset = torch.randn((batch, latents.shape[1], 1, 1), generator=generator).to(self.device)
            noise = noise + self.config.noise_offset * offset
        timesteps = torch.randint(0, len(self.alphas_cumprod), (batch,), generator=generator).to(self.device)
        alpha = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        if self.parts.prediction_type == "v_prediction":
            target = alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
        else:
            target = noise
        # A job may compute the prediction itself (DreamArtist combines two UNet outputs).
        predict = getattr(self.job, "predict", None)
        with self._autocast():
            if predict is not None:
                prediction = predict(noisy.to(self.parts.dtype), timesteps, captions)
            else:
                prediction = self.parts.predict_noise(noisy.to(self.parts.dtype), timesteps, self._context(captions))
        per_sample = torch.nn.functional.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3))
        if self.config.min_snr_gamma:
            per_sample = per_sample * self._min_snr_weight(alpha.view(-1))
        return per_sample.mean()

    def _min_snr_weight(self, alpha):
        snr = alpha / (1 - alpha)
        weight = torch.clamp(snr, max=self.config.min_snr_gamma) / snr
        if self.parts.prediction_type == "v_prediction":
            weight = torch.clamp(snr, max=self.config.min_snr_gamma) / (snr + 1)
        return weight

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _latents(self, dataset, indices, flips, n, stream):
        """Latents of the batch: "once" encodes each picture to the posterior's mean one time and
        keeps it; "random" draws a fresh sample every time, seeded by the step."""
        cache = self.config.latent_sampling == "once"
        generator = None if cache else torch.Generator().manual_seed(_step_seed(self.config.seed, n, stream + 20))
        out = []
        encoded = False
        for index, flip in zip(indices, flips):
            key = (id(dataset), index, flip)
            latent = self.latent_cache.get(key) if cache else None
            if latent is None:
                pixels = dataset.pixels(index, flip).unsqueeze(0).to(self.device, self.parts.dtype)
                with torch.no_grad():
                    latent = self.parts.encode_images(pixels, generator).float()
                encoded = True
                if cache:
                    self.latent_cache[key] = latent
            out.append(latent)
        if encoded:
            # The VAE's full-resolution activations are freed; return their pages before the UNet runs.
            release_freed_memory()
        return torch.cat(out)

    def _context(self, captions):
        if self.job.trains_text_encoder:
            with self._autocast():
                return self.parts.encode_text(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self.text_cache]
        if missing:
            if len(self.text_cache) + len(missing) > TEXT_CACHE_LIMIT:
                self.text_cache.clear()
            with torch.no_grad(), self._autocast():
                encoded = self.parts.encode_text(missing)
            for caption, context in zip(missing, encoded):
                self.text_cache[caption] = context
        return torch.stack([self.text_cache[c] for c in captions])

    # -- files --------------------------------------------------------------------------------------
    def _save(self, path, step, optimizer):
        if self.rank != 0:
            _barrier()
            return
        written = []
        try:
            self._write_files(path, step, optimizer, written)
        except BaseException as error:
            for done in written:
                with contextlib.suppress(OSError):
                    os.remove(done)
            if not isinstance(error, OSError):
                raise
            raise TrainingStopped(
                f"could not write {path} at step {step}: {error}. Free disk space or choose a writable "
                f"folder, then resume ({self._where()}).",
                last_save=self.last_save, step=step) from error
        self.saved.append(path)
        self.last_save = path
        log.info("saved %s (step %d)", path, step)
        _barrier()

    def _write_files(self, path, step, optimizer, written):
        """Writes the adapter file and its sidecars, listing each in `written` once it is on disk."""
        written.extend(self.job.save(path, step, self.key, self.optimizer_name, optimizer.state_dict()))
        save_training_state(_state_path(path), {
            "training_key": self.key,
            "step": step,
            "losses": [list(x) for x in self.losses],
            "optimizer": optimizer.state_dict(),
            "optimizer_name": self.optimizer_name,
            "config": self.config.learning_key(),
            "runtime": self.runtime.state(),
        })
        written.append(_state_path(path))
        if self.config.loss_csv:
            self._write_loss_csv(path)

    def _write_loss_csv(self, path):
        csv_path = os.path.splitext(path)[0] + "_loss.csv"

        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("step,loss\n")
                f.writelines(f"{s},{v:.6f}\n" for s, v in self.losses)
        atomic_write(csv_path, write, overwrite=True)

    # -- previews -----------------------------------------------------------------------------------
    def _maybe_preview(self, step, force=False):
        if not self.callbacks.on_preview or self.rank != 0:
            return
        sample_now = self.config.sample_every_steps and step % self.config.sample_every_steps == 0
        now = time.monotonic()
        if not (force or sample_now or now - self._last_preview >= PREVIEW_INTERVAL_SECONDS):
            return
        self._last_preview = now
        image = loss_chart(self.losses)
        if sample_now and self.parts.decode_latents is not None:
            image = side_by_side([image, self._sample_image()])
        self.callbacks.on_preview(step, image)

    def _sample_image(self):
        prompt = self.config.sample_prompt or self.dataset.config.instance_prompt
        size = self.dataset.config.resolution
        was_training = self.job.module.training
        self.job.module.eval()
        try:
            with torch.no_grad():
                return sample_images(self.parts, [prompt], seed=self.config.seed, width=size, height=size)[0]
        finally:
            self.job.module.train(was_training)


def _world() -> tuple:
    """(rank, number of processes) under `accelerate launch` / torchrun, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _average_across_processes(params, loss: float) -> float:
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world
    total = torch.tensor([loss], dtype=torch.float64, device=params[0].device)
    dist.all_reduce(total)
    return float(total) / world


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
