"""Files the trainer reads and writes: kohya LoRA safetensors with `ss_*` metadata,
training-state files for resume, and the atomic write every file goes through.

Every write lands in a temp file in the destination folder and is moved into place with
`os.replace`, so a crash, Ctrl-C or full disk never leaves a half-written LoRA under the
user's name, and an existing file is only replaced when the caller asked for it.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import secrets
import stat
import time
from contextlib import suppress

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from .errors import TrainerInputError, name_of


# kohya's module-name prefixes for the UNet and the (SD1.x, single) text encoder.
UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"
LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
TRAINING_STATE_FORMAT = "sd1-trainer-state"
TRAINING_STATE_VERSION = 1


class OutputExistsError(TrainerInputError, FileExistsError):
    """The output file exists and overwriting was not asked for."""


# ---------------------------------------------------------------------------------------
# Atomic writes and safe names


def atomic_write(path, write_fn, overwrite=False):
    """Call `write_fn(tmp_path)`, then move the finished file to `path`.

    The temp file sits in the same folder (so `os.replace` is atomic) and is named
    `.<name>.<random>.tmp`; it is removed on any exception, KeyboardInterrupt included.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if not overwrite and os.path.exists(path):
        raise _exists_error(path)
    os.makedirs(folder, exist_ok=True)
    tmp = _new_temp_file(folder, os.path.basename(path))
    mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0666 less the umask
    try:
        write_fn(tmp)
        # Writers that replace the file (safetensors makes it 0600) would leave it unreadable to
        # a ComfyUI or A1111 running as another user: every file gets the umask's mode.
        os.chmod(tmp, mode)
        _fsync_file(tmp)
        # Checked again: training takes minutes, another run may have written the file since.
        if not overwrite and os.path.exists(path):
            raise _exists_error(path)
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_folder(folder)


def _new_temp_file(folder, name):
    # Not tempfile.mkstemp: its 0600 mode would stay on the final file; 0666 lets the umask decide.
    while True:
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def file_short_hash(path) -> str:
    """A1111's short hash of a file (checkpoints, hypernetworks): the first 10 hex digits of its sha256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


def check_writable_folder(folder):
    """Create `folder` if needed and prove a file can be written there, before hours of training."""
    try:
        os.makedirs(folder, exist_ok=True)
        os.remove(_new_temp_file(folder, "write-check"))
    except OSError as error:
        raise TrainerInputError(
            f"{name_of('output_dir')} {folder} is not writable ({error.strerror or error}). Choose a folder you can "
            f"write to, or free disk space.") from error


def remove_stale_temp_files(path, sidecars=()):
    """Delete temp files a killed run left for `path` (and `path + sidecar`): `.<name>.<8 hex>.tmp`."""
    folder = os.path.dirname(os.path.abspath(path))
    names = [os.path.basename(path) + extra for extra in ("",) + tuple(sidecars)]
    pattern = re.compile(r"^\.(%s)\.[0-9a-f]{8}\.tmp$" % "|".join(re.escape(n) for n in names))
    with suppress(FileNotFoundError):
        for entry in os.listdir(folder):
            if pattern.match(entry):
                with suppress(OSError):
                    os.remove(os.path.join(folder, entry))


def _exists_error(path):
    return OutputExistsError(
        f"{path} already exists. Choose another {name_of('output_name')}, or turn on {name_of('overwrite')} to "
        f"replace it."
    )


def _fsync_file(path):
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_folder(folder):
    # Makes the rename itself durable on POSIX; Windows cannot open folders for fsync.
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_UNSAFE_CHARS = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*]')
_WINDOWS_DEVICE_NAMES = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"} | {
    f"{base}{n}" for base in ("COM", "LPT") for n in list("123456789") + ["¹", "²", "³"]
}
_MAX_NAME_BYTES = 150


def safe_output_path(folder, name, suffix, overwrite=False) -> str:
    """The path `folder/<cleaned name><suffix>`, always inside `folder`.

    The name is what a user typed in a node: path separators, `..`, characters Windows
    forbids, control characters, leading dots and device names (CON, NUL, COM1...) are
    replaced, so the file always lands in `folder` on every OS.
    """
    if not isinstance(name, str) or not name.strip():
        raise TrainerInputError(f"{name_of('output_name')} is empty: type a file name such as 'my_lora'.")
    stem = name.strip()
    if suffix and stem.lower().endswith(suffix.lower()):
        stem = stem[: -len(suffix)]
    stem = _clean_stem(stem)
    if not stem.strip("_ ."):  # nothing left but what we replaced
        raise TrainerInputError(
            f"{name_of('output_name')} {name!r} has no usable characters: use letters, digits, '-' or '_'."
        )
    folder = os.path.abspath(os.fspath(folder))
    path = os.path.join(folder, stem + suffix)
    real_folder = os.path.realpath(folder)
    if os.path.commonpath([real_folder, os.path.realpath(path)]) != real_folder:
        raise TrainerInputError(
            f"{name_of('output_name')} {name!r} points outside {folder} (a link?). Choose another name."
        )
    if not overwrite and os.path.exists(path):
        raise _exists_error(path)
    return path


def _clean_stem(stem):
    stem = stem.encode("utf-8", "replace").decode("utf-8")  # lone surrogates cannot be file names
    stem = _UNSAFE_CHARS.sub("_", stem).replace("..", "_")
    stem = _truncate_utf8(stem, _MAX_NAME_BYTES)
    # Windows drops trailing dots and spaces; leading dots hide files on POSIX.
    stem = stem.strip(" .")
    if stem.split(".")[0].strip().upper() in _WINDOWS_DEVICE_NAMES:
        stem = "_" + stem
    return stem


def _truncate_utf8(text, max_bytes):
    return text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")


# ---------------------------------------------------------------------------------------
# What kind of file is this?


def describe_state_dict(keys) -> str:
    """A short guess at what a state dict is, for error messages about the wrong file."""
    keys = list(keys)
    if any(isinstance(k, int) for k in keys):
        return "an A1111 hypernetwork"
    keys = [str(k) for k in keys]

    def starts(*prefixes):
        return any(k.startswith(prefixes) for k in keys)

    def contains(*parts):
        return any(p in k for k in keys for p in parts)

    if starts("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."):
        return "a full Stable Diffusion checkpoint, not a LoRA"
    if contains(".hada_w1_", ".lokr_w1", ".lokr_w2", ".lora_mid.", ".oft_", "oft_blocks", ".dora_scale") or any(
        k.endswith((".diff", ".diff_b")) for k in keys
    ):
        return "a LyCORIS file (LoHa/LoKr/LoCon/OFT/DoRA), not a plain kohya LoRA"
    if starts("lora_te1_", "lora_te2_"):
        return "an SDXL LoRA (it has two text encoders)"
    if starts("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"):
        return "a LoRA with LDM/SGM module names (input_blocks...), as kohya writes for SDXL"
    if contains(".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", "lora_linear_layer"):
        return "a diffusers/PEFT-format LoRA"
    if starts("diffusion_model."):
        return "a ComfyUI-format LoRA (diffusion_model.* keys)"
    if keys and all(k.endswith(LORA_SUFFIXES) for k in keys):
        return "a kohya LoRA"
    if contains("down_blocks.", "text_model.", "encoder.layers."):
        return "a diffusers model state dict, not a LoRA"
    return "not a LoRA file"


def kohya_modules(state_dict) -> dict:
    """kohya module name -> {"down": tensor, "up": tensor, "alpha": tensor or None}.

    Raises TrainerInputError naming the kind of file when it is not a kohya LoRA.
    """
    foreign = [k for k in state_dict if not (isinstance(k, str) and k.endswith(LORA_SUFFIXES))]
    if foreign or not state_dict:
        kind = describe_state_dict(state_dict.keys())
        shown = ", ".join(repr(k) for k in foreign[:4]) or "no tensors at all"
        raise TrainerInputError(
            f"This file looks like {kind}; expected a kohya LoRA whose keys end in "
            f".lora_down.weight, .lora_up.weight and .alpha. Unexpected keys: {shown}."
        )
    modules = {}
    for key, tensor in state_dict.items():
        name, part = _split_kohya_key(key)
        modules.setdefault(name, {"down": None, "up": None, "alpha": None})[part] = tensor
    incomplete = [n for n, m in modules.items() if m["down"] is None or m["up"] is None]
    if incomplete:
        raise TrainerInputError(
            f"This LoRA is incomplete: {len(incomplete)} module(s) lack lora_down or lora_up "
            f"(e.g. {', '.join(incomplete[:3])}). Re-save it from the tool that made it."
        )
    return modules


def module_alpha(module) -> float:
    """A kohya module's alpha; kohya and ComfyUI treat a missing one as alpha = rank (scale 1)."""
    alpha = module["alpha"]
    return float(alpha) if alpha is not None else float(module["down"].shape[0])


# LyCORIS tensors per module (kohya-style names, as LyCORIS's kohya wrapper writes them) next to
# LoRA's. Tucker cores, DoRA scales and the other LyCORIS algorithms are not read or written.
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def network_modules(state_dict) -> dict:
    """kohya module name -> its tensors, for kohya LoRA/LoCon and LyCORIS LoHa/LoKr files.

    LoRA modules look as in `kohya_modules` plus "type": "lora"; LoHa modules have "type":
    "loha" and the four hada_* tensors; LoKr modules "type": "lokr" and lokr_w1 (or its _a/_b
    halves) and lokr_w2 (or its halves). "alpha" is None when the file has none.
    """
    if not isinstance(state_dict, dict):
        raise TrainerInputError(f"expected a LoRA state dict, got {type(state_dict).__name__}")
    if not state_dict:
        kohya_modules(state_dict)  # says the file holds no tensors at all
    parts_by_name, foreign = {}, []
    for key in state_dict:
        name, _, part = key.rpartition(".") if isinstance(key, str) else ("", "", "")
        if part == "weight" and name.endswith((".lora_down", ".lora_up")):
            name, _, part = name.rpartition(".")
        if not name or part not in ("lora_down", "lora_up", "alpha") + LOHA_PARTS + LOKR_PARTS:
            foreign.append(key)
            continue
        parts_by_name.setdefault(name, {})[part] = state_dict[key]
    if foreign:
        raise TrainerInputError(
            f"This file looks like {describe_state_dict(state_dict.keys())}; expected a kohya LoRA or a "
            f"LyCORIS LoCon/LoHa/LoKr file (keys ending in .lora_down.weight / .lora_up.weight, "
            f".hada_w1_a ... or .lokr_w1 ..., and .alpha). Keys this trainer cannot read: "
            f"{', '.join(repr(k) for k in foreign[:4])}.")
    modules = {}
    for name, parts in parts_by_name.items():
        modules[name] = _network_module(name, parts)
    return modules


def _network_module(name, parts):
    alpha = parts.get("alpha")
    if "lora_down" in parts or "lora_up" in parts:
        kind, needed = "lora", [("lora_down",), ("lora_up",)]
    elif any(p in parts for p in LOHA_PARTS):
        kind, needed = "loha", [(p,) for p in LOHA_PARTS]
    elif any(p in parts for p in LOKR_PARTS):
        kind, needed = "lokr", [("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a")]
        if "lokr_w1_a" in parts:
            needed.append(("lokr_w1_b",))
        if "lokr_w2_a" in parts:
            needed.append(("lokr_w2_b",))
    else:
        raise TrainerInputError(f"This file is incomplete: module {name} has only an alpha. Re-save it "
                                "from the tool that made it.")
    lacking = [" or ".join(options) for options in needed if not any(o in parts for o in options)]
    mixed = [p for p in parts if p != "alpha" and p not in {o for options in needed for o in options}
             and not (kind == "lokr" and p in LOKR_PARTS)]
    if lacking or mixed:
        raise TrainerInputError(
            f"This file is incomplete or mixed: module {name} ({kind}) lacks {', '.join(lacking) or 'nothing'}"
            f"{' and also has ' + ', '.join(mixed) if mixed else ''}. Re-save it from the tool that made it.")
    if kind == "lora":
        return {"type": "lora", "down": parts["lora_down"], "up": parts["lora_up"], "alpha": alpha}
    return {"type": kind, **{p: t for p, t in parts.items() if p != "alpha"}, "alpha": alpha}


def _split_kohya_key(key):
    for suffix, part in ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha")):
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    raise AssertionError(key)


# ---------------------------------------------------------------------------------------
# kohya LoRA files


def save_lora(path, state_dict, metadata, overwrite=False):
    """Write a kohya LoRA safetensors file with string metadata and kohya's sshs_* hashes."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    network_modules(tensors)  # refuse to write anything a LoRA/LyCORIS loader would not read
    metadata = {str(k): str(v) for k, v in metadata.items()}
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = lora_file_hashes(tensors, metadata)
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata), overwrite=overwrite)


def load_lora(path) -> tuple[dict, dict]:
    """(state_dict, metadata) of a kohya LoRA safetensors file."""
    path = os.fspath(path)
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise TrainerInputError(
            f"{os.path.basename(path)} is a pickled file (.ckpt/.pt), which can run code when "
            "loaded. Convert the LoRA to .safetensors (for example with kohya sd-scripts or the "
            "A1111 'safetensors conversion' extension) and load that instead."
        )
    if not os.path.isfile(path):
        raise TrainerInputError(f"LoRA file not found: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state_dict = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise TrainerInputError(
            f"{os.path.basename(path)} is not a readable safetensors file ({err}). "
            "It may be truncated or not a LoRA at all."
        ) from err
    try:
        network_modules(state_dict)
    except TrainerInputError as err:
        raise TrainerInputError(f"{os.path.basename(path)}: {err}") from None
    return state_dict, metadata


def lora_file_hashes(tensors, metadata) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) exactly as kohya's `precalculate_safetensors_hashes`.

    The model hash is the sha256 of the tensor bytes after the safetensors header (what the
    A1111 additional-networks extension computes from the file); the legacy hash is the
    old A1111 8-hex hash of the serialized bytes with only the `ss_*` metadata.
    """
    ss_metadata = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors.torch.save(tensors, ss_metadata)
    header_size = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_size:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def lora_metadata(
    *,
    output_name: str,
    rank: int,
    alpha: float,
    base_model_name: str = "",
    base_model_hash: str = "",
    base_model_sha256: str = "",
    resolution=512,
    max_train_steps: int = 0,
    steps: int = 0,
    learning_rate: float = 0.0,
    unet_lr=None,
    text_encoder_lr=None,
    num_train_images: int = 0,
    num_reg_images: int = 0,
    tag_frequency: dict | None = None,
    dataset_dirs: dict | None = None,
    seed=None,
    training_started_at: float | None = None,
    network_dropout: float = 0.0,
    clip_skip=None,
    prediction_type: str = "epsilon",
    trigger_phrase: str = "",
    extra: dict | None = None,
) -> dict[str, str]:
    """kohya `ss_*` metadata plus the minimal ModelSpec keys for an SD1.x LoRA.

    `tag_frequency` is kohya's {folder: {tag: count}}; a flat {tag: count} is put under the
    first folder of `dataset_dirs` (or the output name). `dataset_dirs` is
    {folder: {"n_repeats": r, "img_count": n}}. `extra` adds more `ss_*` keys as they are.
    """
    started = time.time() if training_started_at is None else float(training_started_at)
    width, height = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    dataset_dirs = dataset_dirs or {}
    tag_frequency = tag_frequency or {}
    if any(isinstance(v, int) for v in tag_frequency.values()):
        tag_frequency = {next(iter(dataset_dirs), output_name): dict(tag_frequency)}
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": rank,
        "ss_network_alpha": alpha,
        "ss_network_dropout": network_dropout,
        "ss_output_name": output_name,
        "ss_sd_model_name": base_model_name,
        "ss_sd_model_hash": base_model_hash,
        "ss_resolution": (width, height),
        "ss_max_train_steps": max_train_steps,
        "ss_steps": steps,
        "ss_learning_rate": learning_rate,
        "ss_unet_lr": unet_lr,
        "ss_text_encoder_lr": text_encoder_lr,
        "ss_num_train_images": num_train_images,
        "ss_num_reg_images": num_reg_images,
        "ss_tag_frequency": json.dumps(tag_frequency, ensure_ascii=False),
        "ss_dataset_dirs": json.dumps(dataset_dirs, ensure_ascii=False),
        "ss_seed": seed,
        "ss_training_started_at": started,
        "ss_base_model_version": "sd_v1",
        "ss_v2": False,
        "ss_clip_skip": clip_skip,
    }
    if base_model_sha256:
        metadata["ss_new_sd_model_hash"] = base_model_sha256
    metadata.update(extra or {})
    metadata.update(_modelspec(output_name, width, height, started, prediction_type, trigger_phrase))
    return {k: str(v) for k, v in metadata.items()}


def lycoris_metadata(network_type: str, conv_rank: int, conv_alpha: float, factor: int) -> dict:
    """The `ss_*` keys that tell kohya's tools and A1111/Forge a file is a LyCORIS network, as
    LyCORIS's kohya wrapper writes them; none for a plain LoRA."""
    if network_type == "lora":
        return {}
    args = {"algo": network_type, "conv_dim": str(conv_rank), "conv_alpha": f"{conv_alpha:g}",
            "factor": str(factor)}
    return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)}


def _modelspec(title, width, height, started, prediction_type, trigger_phrase):
    # kohya writes implementation "diffusers" for SD1.x LoRAs: the module names are diffusers'.
    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(started)).isoformat(),
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
    }
    if trigger_phrase:
        spec["modelspec.trigger_phrase"] = trigger_phrase
    return spec


# ---------------------------------------------------------------------------------------
# Training state for resume


def save_training_state(path, state: dict, overwrite=True):
    """Write the resume state (training key, step, loss history, optimizer state_dict and name, config).

    Only plain types and tensors go in, so `load_training_state` can use weights_only=True.
    Overwrites by default: the state is a sidecar of the LoRA file saved just before it,
    whose own overwrite check already ran.
    """
    payload = {"format": TRAINING_STATE_FORMAT, "format_version": TRAINING_STATE_VERSION, **state}
    atomic_write(path, lambda tmp: torch.save(payload, tmp), overwrite=overwrite)


def load_training_state(path) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TrainerInputError(f"training state file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for foreign files
        raise TrainerInputError(
            f"{os.path.basename(path)} is not a training state file written by this trainer "
            f"({type(err).__name__}). Delete it to resume with a fresh optimizer state."
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != TRAINING_STATE_FORMAT:
        raise TrainerInputError(
            f"{os.path.basename(path)} is not a training state file written by this trainer. "
            "Delete it to resume with a fresh optimizer state."
        )
    if payload.get("format_version") != TRAINING_STATE_VERSION:
        raise TrainerInputError(
            f"{os.path.basename(path)} was written by another version of the trainer "
            f"(format {payload.get('format_version')}); start a new training instead of resuming."
        )
    return {k: v for k, v in payload.items() if k not in ("format", "format_version")}
