"""Training images and their captions: instance/class tokens, tag shuffle/keep/dropout,
A1111 prompt templates, aspect-ratio buckets, repeats, and regularization (class) images.

Images are read lazily: loading a folder reads only each file's header (and checks the file
is whole); `pixels()` decodes one image at its training size when the trainer asks for it, so
a folder of 100-megapixel photos never sits decoded in memory.

Captions: `<stem><caption_extension>` next to each image. An image without one is captioned
with the instance prompt (`"<instance_token> <class_token>"`). A caption that does not mention
the instance token gets the instance prompt prepended as its first tag, so every caption the
model sees names the subject (with prompt templates, `[name]` supplies the token instead).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import warnings as py_warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .errors import TrainerInputError, name_of

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# A bucket keeps at least this share of resolution^2 pixels, so matching the aspect ratio
# never costs much detail (and the bucket list stays short enough for batches to fill).
MIN_BUCKET_AREA = 0.8
# Subfolders named like kohya's "10_skkmtn" give their images 10 repeats.
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
# A regularization set's resolution that means "the training dataset's".
FOLLOW_DATASET_RESOLUTION = 0
# Bumped when the way pixels or captions are made changes, so cached trainings are redone.
FINGERPRINT_VERSION = "dataset-1"
MAX_LISTED = 20
EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass
class DatasetConfig:
    """How a folder of images becomes training examples. `validate()` names any bad field.

    caption_dropout: with this probability a step's caption is the bare instance prompt
    ("skkmtn girl") instead of the image's caption, so the token alone calls up the subject.
    tag_dropout: each tag after the first `keep_tokens` is left out with this probability;
    the tag holding the instance token is never left out.
    center_crop: only without bucketing: crop the centre square (else squash to a square).
    captions_as_written: captions are used exactly as written, with no instance prompt added
    (regularization images: their captions describe them; images without one get the
    instance prompt, which for them is the class prompt).
    ignore_caption_files: caption files are not read: every image is captioned with the instance
    prompt, as the Dreambooth extension trains without captions.
    """
    folder: str = ""
    instance_token: str = ""
    class_token: str = ""
    caption_extension: str = ".txt"
    repeats: int = 1
    resolution: int = 512
    bucketing: bool = True
    center_crop: bool = False
    flip: bool = False
    shuffle_tags: bool = False
    keep_tokens: int = 0
    caption_dropout: float = 0.0
    tag_dropout: float = 0.0
    template_lines: Optional[list] = None
    captions_as_written: bool = False
    ignore_caption_files: bool = False

    def validate(self) -> None:
        if not isinstance(self.instance_token, str) or not self.instance_token.strip():
            raise TrainerInputError(
                f"{name_of('instance_token')} is empty: fill it with a unique trigger word such as "
                "'skkmtn'. The model learns to tie your subject to this word; put it in a prompt "
                "later to call the subject up.")
        if not isinstance(self.class_token, str):
            raise TrainerInputError(f"{name_of('class_token')} must be text, e.g. 'girl' or 'dog' (or empty).")
        ext = self.caption_extension
        if not isinstance(ext, str) or not ext.strip(".").strip() or "/" in ext or "\\" in ext:
            raise TrainerInputError(
                f"{name_of('caption_extension')} {ext!r} is not a file extension: use e.g. '.txt' or '.caption'.")
        _check_whole(self.repeats, "repeats", minimum=1, hint="how often each image is seen per epoch")
        check_resolution(self.resolution)
        _check_whole(self.keep_tokens, "keep_tokens", minimum=0,
                     hint="how many leading caption tags stay in place")
        for name in ("bucketing", "center_crop", "flip", "shuffle_tags", "captions_as_written",
                     "ignore_caption_files"):
            if not isinstance(getattr(self, name), bool):
                raise TrainerInputError(f"{name_of(name)} must be true or false, got {getattr(self, name)!r}.")
        for name in ("caption_dropout", "tag_dropout"):
            _check_probability(getattr(self, name), name)
        if self.template_lines is not None:
            lines = self.template_lines
            if isinstance(lines, str) or not all(isinstance(line, str) for line in lines) \
                    or not any(line.strip() for line in lines):
                raise TrainerInputError(
                    "template_lines must be a list of prompt lines such as 'a photo of [name], "
                    "[filewords]' (or None for no template).")

    @property
    def instance_prompt(self) -> str:
        """The bare prompt for the subject: instance token, then class token if any."""
        return " ".join(filter(None, [self.instance_token.strip(), self.class_token.strip()]))


@dataclass
class DatasetItem:
    """One image: where its pixels come from, its caption text and its training size."""
    name: str                       # path relative to the dataset folder, or "image N"
    size: tuple                     # (width, height) after EXIF orientation
    bucket: tuple                   # (width, height) it is trained at
    text: Optional[str]             # the caption the user wrote; None -> the instance prompt
    repeats: int = 1
    path: Optional[str] = None      # image file (decoded lazily), or
    image: Optional[Image.Image] = None   # an image given in memory
    file_stats: tuple = ()          # (relative path, size, mtime_ns) of the image and caption files


class ImageDataset:
    """Images with captions, sized into buckets. Build it with `from_folder` or `from_images`."""

    def __init__(self, config: DatasetConfig, items: list, warnings: Optional[list] = None):
        self.config = config
        self.items = items
        self.warnings = list(warnings or [])
        upscaled = [f"{it.name} ({it.size[0]}x{it.size[1]} -> {it.bucket[0]}x{it.bucket[1]})"
                    for it in items if _cover_scale(it.size, it.bucket) > 1]
        if upscaled:
            self.warnings.append(
                f"{len(upscaled)} image(s) are smaller than their training size and are upscaled "
                f"(they will look soft; use larger images or a lower resolution): {_listing(upscaled)}")
        for message in self.warnings:
            log.warning(message)

    @classmethod
    def from_folder(cls, config: DatasetConfig) -> "ImageDataset":
        """Every image in `config.folder` (and in `<N>_<name>` subfolders, with N repeats)."""
        config.validate()
        notes = []
        items = _scan_folder(config.folder, config, notes, read_captions=not config.ignore_caption_files,
                             name=name_of("folder"))
        return cls(config, items, notes)

    @classmethod
    def from_images(cls, images: list, captions: Optional[list], config: DatasetConfig) -> "ImageDataset":
        """Images already in memory (e.g. a ComfyUI IMAGE batch), with one caption each or none."""
        config.validate()
        if not images or not all(isinstance(image, Image.Image) for image in images):
            raise TrainerInputError("images must be a non-empty list of PIL images.")
        if captions is not None and len(captions) != len(images):
            raise TrainerInputError(
                f"captions has {len(captions)} entries for {len(images)} images: give one caption "
                f"per image, or none to caption every image with the instance prompt.")
        return cls(config, _memory_items(images, captions, config))

    def __len__(self) -> int:
        return len(self.items)

    def at_resolution(self, resolution: int) -> "ImageDataset":
        """The same pictures and captions, sized for `resolution`."""
        config = dataclasses.replace(self.config, resolution=resolution)
        config.validate()
        items = [dataclasses.replace(item, bucket=_bucket_for(item.size, config)) for item in self.items]
        return ImageDataset(config, items)

    def pixels(self, index: int, flip: bool) -> torch.Tensor:
        """[3, H, W] float32 in [-1, 1] at the item's bucket size, mirrored when `flip`."""
        item = self.items[index]
        try:
            if item.path is None:
                rgb = _fit(item.image, item.bucket, self.config, from_file=False)
            else:
                with _open(item.path) as image:
                    rgb = _fit(image, item.bucket, self.config, from_file=True)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise TrainerInputError(
                f"cannot read image {item.path or item.name}: {e}. Re-save it or remove it.") from e
        array = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
        tensor = torch.from_numpy(array).permute(2, 0, 1)
        return tensor.flip(2).contiguous() if flip else tensor.contiguous()

    def caption(self, index: int, rng: random.Random) -> str:
        """The caption for one step: caption dropout, then template, tag dropout and shuffle."""
        config = self.config
        if config.caption_dropout and rng.random() < config.caption_dropout:
            return config.instance_prompt
        text = self.items[index].text
        if config.template_lines:
            return self._templated(text, rng)
        return self._process(self._full_caption(text), rng)

    def _full_caption(self, text: Optional[str]) -> str:
        if text is None:
            return self.config.instance_prompt
        return text if self.config.captions_as_written else with_instance_token(text, self.config)

    def _templated(self, text: Optional[str], rng: random.Random) -> str:
        config = self.config
        # [name] brings the token, so [filewords] is the caption as written (the class token
        # stands in for an image without a caption file).
        filewords = self._process(config.class_token.strip() if text is None else text, rng)
        line = rng.choice([line.strip() for line in config.template_lines if line.strip()])
        values = {"name": config.instance_token.strip(), "filewords": filewords}
        prompt = re.sub(r"\[(name|filewords)\]", lambda m: values[m.group(1)], line)
        if not filewords:
            prompt = ", ".join(part.strip() for part in prompt.split(",") if part.strip())
        return prompt

    def _process(self, text: str, rng: random.Random) -> str:
        config = self.config
        return process_tags(text, rng, keep_tokens=config.keep_tokens, shuffle=config.shuffle_tags,
                            tag_dropout=config.tag_dropout, protected=config.instance_token)

    def epoch_batches(self, batch_size: int, rng: random.Random) -> list:
        """One epoch: every item `repeats` times, shuffled, in batches that share one bucket.

        A bucket's last batch may be smaller than batch_size.
        """
        _check_whole(batch_size, "batch_size", minimum=1, hint="images per training step")
        by_bucket = {}
        for index, item in enumerate(self.items):
            by_bucket.setdefault(item.bucket, []).extend([index] * item.repeats)
        batches = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            rng.shuffle(indices)
            batches.extend(indices[i:i + batch_size] for i in range(0, len(indices), batch_size))
        rng.shuffle(batches)
        return batches

    def fingerprint(self) -> str:
        """sha256 over what training sees: files (path, size, mtime), pixels of in-memory
        images, caption texts and every option except the folder's location, so a moved
        folder keeps its trained result."""
        digest = hashlib.sha256(FINGERPRINT_VERSION.encode())
        options = {k: v for k, v in dataclasses.asdict(self.config).items() if k != "folder"}
        if not options["ignore_caption_files"]:  # the default keeps the fingerprints made before the option
            del options["ignore_caption_files"]
        digest.update(json.dumps(options, sort_keys=True, default=str).encode())
        for item in self.items:            # in order: the order decides which image each step sees
            digest.update(json.dumps([item.name, item.text, item.repeats, list(item.file_stats)]).encode())
            if item.image is not None:
                digest.update(f"{item.image.mode} {item.image.size}".encode())
                digest.update(item.image.tobytes())
        return digest.hexdigest()

    def _top_folder_name(self) -> str:
        # kohya names a dataset folder "<repeats>_<name>"; top-level images get the same form.
        name = os.path.basename(os.path.normpath(self.config.folder)) if self.config.folder else ""
        return f"{self.config.repeats}_{name or 'images'}"

    def summary(self) -> dict:
        """Facts for the saved file's metadata (kohya `ss_*` keys)."""
        buckets, tags, dirs = {}, {}, {}
        for item in self.items:
            key = f"{item.bucket[0]}x{item.bucket[1]}"
            buckets[key] = buckets.get(key, 0) + 1
            for tag in split_tags(self._full_caption(item.text)):
                tags[tag] = tags.get(tag, 0) + 1
            folder = (os.path.dirname(item.name) if item.path else "") or self._top_folder_name()
            entry = dirs.setdefault(folder, {"n_repeats": item.repeats, "img_count": 0})
            entry["img_count"] += 1
        return {
            "num_images": len(self.items),
            "num_train_images": sum(item.repeats for item in self.items),
            "repeats": self.config.repeats,
            "resolution": self.config.resolution,
            "buckets": dict(sorted(buckets.items())),
            "tag_frequency": tags,
            "dataset_dirs": dirs,
        }


@dataclass
class RegularizationSet:
    """Class images trained alongside the subject, their loss weighted by prior_loss_weight.

    With `follows_dataset_resolution` they are trained at the training dataset's resolution
    (`for_dataset`), whatever size they were sized for when the set was made.
    """
    dataset: ImageDataset
    prior_loss_weight: float = 1.0
    follows_dataset_resolution: bool = False

    def __post_init__(self):
        _check_prior_loss_weight(self.prior_loss_weight)

    def for_dataset(self, dataset: ImageDataset) -> "RegularizationSet":
        resolution = dataset.config.resolution
        if not self.follows_dataset_resolution or self.dataset.config.resolution == resolution:
            return self
        return dataclasses.replace(self, dataset=self.dataset.at_resolution(resolution))


def regularization_set(folder=None, images=None, class_prompt="", prior_loss_weight=1.0,
                       resolution=FOLLOW_DATASET_RESOLUTION,
                       blank_count=0, bucketing=True, center_crop=False, flip=False,
                       repeats=1, use_caption_files=False) -> RegularizationSet:
    """Class images from a folder, from PIL images and/or `blank_count` blank ("transparent")
    images, captioned with `class_prompt`. With `use_caption_files`, a folder image with a
    caption file is captioned with that file exactly as written instead (as prior preservation
    with captioned class images trains: the caption says what the picture shows).
    `resolution` FOLLOW_DATASET_RESOLUTION (0): trained at the training dataset's resolution.
    """
    if not isinstance(class_prompt, str) or not class_prompt.strip():
        raise TrainerInputError(
            f"{name_of('class_prompt')} is empty: regularization images need the prompt that describes them, "
            "e.g. 'a photo of a girl' (the class your subject belongs to, without the instance token).")
    _check_whole(blank_count, "blank_count", minimum=0, hint="how many blank images to generate")
    if not isinstance(use_caption_files, bool):
        raise TrainerInputError(f"{name_of('use_caption_files')} must be true or false, got {use_caption_files!r}.")
    follows = resolution == FOLLOW_DATASET_RESOLUTION
    if follows:
        resolution = DatasetConfig.resolution  # sized again for the dataset when training starts
    config = DatasetConfig(folder=folder or "", instance_token=class_prompt.strip(), resolution=resolution,
                           bucketing=bucketing, center_crop=center_crop, flip=flip, repeats=repeats,
                           captions_as_written=True)
    config.validate()
    _check_prior_loss_weight(prior_loss_weight)
    if not folder and not images and not blank_count:
        raise TrainerInputError(
            f"no regularization images: give {name_of('reg_folder', 'folder')}, images, or a {name_of('blank_count')} above 0.")
    if images and not all(isinstance(image, Image.Image) for image in images):
        raise TrainerInputError("regularization images must be PIL images.")
    notes, items = [], []
    if folder:
        items += _scan_folder(folder, config, notes, read_captions=use_caption_files,
                              name=name_of("reg_folder", "folder"))
    in_memory = list(images or []) + blank_images(blank_count, resolution)
    if in_memory:
        items += _memory_items(in_memory, None, config)
    return RegularizationSet(ImageDataset(config, items, notes), prior_loss_weight, follows)


def blank_images(count: int, resolution: int) -> list:
    """The "transparent images" regularization guides use: fully transparent squares, which
    training composites on white (so they train as pure white images)."""
    _check_whole(count, "blank_count", minimum=0, hint="how many blank images to generate")
    check_resolution(resolution)
    return [Image.new("RGBA", (resolution, resolution), (0, 0, 0, 0)) for _ in range(count)]


# ---------------------------------------------------------------------------------------
# Captions


def clean_caption(text: str) -> Optional[str]:
    """One line of caption: lines joined with ", ", stray commas trimmed; None when empty."""
    parts = [line.strip().strip(",").strip() for line in text.splitlines()]
    joined = ", ".join(part for part in parts if part)
    return joined or None


def split_tags(text: str) -> list:
    return [tag.strip() for tag in text.split(",") if tag.strip()]


def mentions(text: str, word: str) -> bool:
    """Whether `word` appears in `text` as a whole word (case-insensitive)."""
    word = word.strip()
    return bool(word) and re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


def with_instance_token(text: str, config: DatasetConfig) -> str:
    """The caption, with the instance prompt prepended as its first tag when it lacks the token."""
    if mentions(text, config.instance_token):
        return text
    return f"{config.instance_prompt}, {text}"


def process_tags(text: str, rng: random.Random, keep_tokens: int = 0, shuffle: bool = False,
                 tag_dropout: float = 0.0, protected: str = "") -> str:
    """Shuffle and/or drop comma-separated tags after the first `keep_tokens`.

    A tag mentioning `protected` (the instance token) is never dropped. With neither shuffle
    nor dropout the text comes back unchanged, so prose captions keep their own punctuation.
    """
    if not shuffle and not tag_dropout:
        return text
    tags = split_tags(text)
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    if tag_dropout:
        rest = [tag for tag in rest if rng.random() >= tag_dropout or mentions(tag, protected)]
    if shuffle:
        rng.shuffle(rest)
    return ", ".join(fixed + rest)


def _read_caption(path: str, name: str, notes: list) -> Optional[str]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Japanese Windows tools save Shift-JIS (cp932); latin-1 decodes anything else.
        for encoding in ("cp932", "latin-1"):
            try:
                text = data.decode(encoding)
                break
            except UnicodeDecodeError:
                continue
        notes.append(f"caption {name} is not UTF-8; read it as {encoding}. Save it as UTF-8 to be sure "
                     f"it reads as you wrote it.")
    return clean_caption(text)


# ---------------------------------------------------------------------------------------
# Folders


def check_folder(folder, name: str = "folder") -> None:
    """Refuse an empty, missing or non-folder image folder, naming its option `name`."""
    if not isinstance(folder, str) or not folder.strip():
        raise TrainerInputError(f"{name} is empty: set it to the folder that holds your training images.")
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise TrainerInputError(f"{name} {folder} {what}: set {name} to the folder that holds your images.")


def _scan_folder(folder, config: DatasetConfig, notes: list, read_captions: bool, name: str) -> list:
    check_folder(folder, name)
    groups, ignored = [("", config.repeats)], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        match = REPEAT_FOLDER.match(entry.name)
        if match and int(match.group(1)) > 0:
            groups.append((entry.name, int(match.group(1))))
        else:
            ignored.append(entry.name)
    if ignored:
        notes.append(f"subfolders not read (only <repeats>_<name> subfolders such as 10_skkmtn are): "
                     f"{_listing(ignored)}")
    items, unreadable = [], []
    for subfolder, repeats in groups:
        items += _scan_images(folder, subfolder, repeats, config, notes, unreadable, read_captions)
    if unreadable:
        notes.append(f"skipped {len(unreadable)} unreadable image(s): {_listing(unreadable)}")
    if not items:
        if unreadable:
            raise TrainerInputError(f"no readable images in {folder}: {_listing(unreadable)}. "
                                    f"Re-save them as PNG or JPEG.")
        hint = f" (subfolders are read only when named <repeats>_<name>: {_listing(ignored)})" if ignored else ""
        raise TrainerInputError(f"no images in {folder}: accepted extensions are "
                                f"{', '.join(IMAGE_EXTENSIONS)}{hint}.")
    return items


def _scan_images(root, subfolder, repeats, config, notes, unreadable, read_captions) -> list:
    directory = os.path.join(root, subfolder)
    files = sorted(e.name for e in os.scandir(directory) if e.is_file() and not e.name.startswith("."))
    suffix = "." + config.caption_extension.strip().lstrip(".").lower()
    images = [n for n in files if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    captions = {os.path.splitext(n)[0].lower(): n for n in files
                if n.lower().endswith(suffix) and n not in images}
    relative = (lambda n: f"{subfolder}/{n}") if subfolder else (lambda n: n)
    stems = {}
    for name in images:
        stems.setdefault(os.path.splitext(name)[0].lower(), []).append(name)
    if read_captions:
        _note_caption_mismatches(stems, captions, relative, notes)
    elif captions and config.captions_as_written:  # a training dataset ignores them only when told to
        notes.append(f"caption files in {directory} are ignored: regularization images are all "
                     f"captioned with class_prompt (turn on {name_of('use_caption_files')} to use them).")
    items, empty_captions = [], []
    for name in images:
        path = os.path.join(directory, name)
        try:
            size = _probe(path)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            unreadable.append(f"{relative(name)} ({_reason(path, e)})")
            continue
        stats = [_stat(path, relative(name))]
        text = None
        caption_name = captions.get(os.path.splitext(name)[0].lower()) if read_captions else None
        if caption_name:
            caption_path = os.path.join(directory, caption_name)
            stats.append(_stat(caption_path, relative(caption_name)))
            text = _read_caption(caption_path, relative(caption_name), notes)
            if text is None:
                empty_captions.append(relative(caption_name))
        items.append(DatasetItem(name=relative(name), size=size, bucket=_bucket_for(size, config), text=text,
                                 repeats=repeats, path=path, file_stats=tuple(stats)))
    if empty_captions:
        fallback = "class_prompt" if config.captions_as_written else "the instance prompt"
        notes.append(f"empty caption files (their images use {fallback}): {_listing(empty_captions)}")
    return items


def _note_caption_mismatches(stems, captions, relative, notes):
    orphans = [relative(n) for stem, n in captions.items() if stem not in stems]
    if orphans:
        notes.append(f"caption files without an image (not used): {_listing(orphans)}")
    shared = [" and ".join(relative(n) for n in names) + (f" share {relative(captions[stem])}"
                                                           if stem in captions else " share a name")
              for stem, names in stems.items() if len(names) > 1]
    if shared:
        notes.append(f"images with the same name (both are used): {_listing(shared)}")


def _stat(path, name):
    st = os.stat(path)
    return (name, st.st_size, st.st_mtime_ns)


def _reason(path, error) -> str:
    if os.path.getsize(path) == 0:
        return "empty file"
    if isinstance(error, Image.DecompressionBombError):
        return "larger than Pillow's safety limit"
    return str(error) or type(error).__name__


def _listing(names: list) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown if len(names) <= MAX_LISTED else f"{shown} and {len(names) - MAX_LISTED} more"


def _memory_items(images: list, captions: Optional[list], config: DatasetConfig) -> list:
    items = []
    for i, image in enumerate(images):
        caption = None if captions is None else captions[i]
        text = None if caption is None else clean_caption(str(caption))
        size = _oriented_size(image)
        items.append(DatasetItem(name=f"image {i}", size=size, bucket=_bucket_for(size, config),
                                 text=text, repeats=config.repeats, image=image))
    return items


# ---------------------------------------------------------------------------------------
# Pixels


def _open(path) -> Image.Image:
    # Our own images may exceed Pillow's bomb warning size (~89 MP); we shrink them anyway.
    with py_warnings.catch_warnings():
        py_warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def _probe(path) -> tuple:
    """(width, height) after EXIF orientation, raising if the file is not a whole image.

    The cheapest check that finds a truncated file: a JPEG is decoded at 1/8 size, a PNG's
    chunks are checksummed without decoding, other formats are decoded.
    """
    with _open(path) as image:
        size = _oriented_size(image)
        if image.format == "JPEG":
            image.draft(None, (1, 1))
            image.load()
        elif image.format == "PNG":
            image.verify()
        else:
            image.load()
    return size


def _orientation(image: Image.Image) -> int:
    # A PNG keeps EXIF either before its pixels (already read) or after them (needs a full
    # decode, which loading a folder avoids; pixels() still applies it).
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    return image.getexif().get(0x0112, 1)


def _oriented_size(image: Image.Image) -> tuple:
    width, height = image.size
    return (height, width) if _orientation(image) in (5, 6, 7, 8) else (width, height)


def check_resolution(resolution) -> None:
    if isinstance(resolution, int) and not isinstance(resolution, bool) and resolution >= 64 \
            and resolution % 64 == 0:
        return
    hint = "e.g. 512"
    if isinstance(resolution, (int, float)) and not isinstance(resolution, bool) and math.isfinite(resolution):
        lower = max(64, int(resolution) // 64 * 64)
        hint = " or ".join(str(v) for v in sorted({lower, lower + 64}) if v == lower or resolution > lower)
    raise TrainerInputError(
        f"{name_of('resolution')} {resolution!r} must be a multiple of 64 (at least 64): use {hint}. 512 suits SD1.x.")


@lru_cache(maxsize=None)
def bucket_sizes(resolution: int) -> tuple:
    """All (width, height), multiples of 64, with area in [MIN_BUCKET_AREA, 1] x resolution^2
    and no side above twice the resolution."""
    area, unit = resolution * resolution, 64
    sides = range(unit, 2 * resolution + 1, unit)
    return tuple((w, h) for w in sides for h in sides if MIN_BUCKET_AREA * area <= w * h <= area)


def _bucket_for(size: tuple, config: DatasetConfig) -> tuple:
    if not config.bucketing:
        return (config.resolution, config.resolution)
    aspect = math.log(size[0] / size[1])
    # Closest aspect ratio; among equals the larger bucket.
    return min(bucket_sizes(config.resolution),
               key=lambda b: (round(abs(math.log(b[0] / b[1]) - aspect), 9), -b[0] * b[1]))


def _cover_scale(size: tuple, bucket: tuple) -> float:
    return max(bucket[0] / size[0], bucket[1] / size[1])


def _fit(image: Image.Image, bucket: tuple, config: DatasetConfig, from_file: bool) -> Image.Image:
    """The image as RGB at exactly `bucket`: scaled to cover it and centre-cropped (or squashed
    to a square when bucketing and center_crop are both off). Shrinks before any heavy work."""
    orientation = _orientation(image)
    size = _oriented_size(image)
    squash = not config.bucketing and not config.center_crop
    scale = _cover_scale(size, bucket)
    target = bucket if squash else (max(bucket[0], round(size[0] * scale)), max(bucket[1], round(size[1] * scale)))
    raw_target = target[::-1] if orientation in (5, 6, 7, 8) else target
    if from_file:
        image.draft(None, raw_target)      # JPEG: decode at 1/2, 1/4 or 1/8 size when that is enough
    image = _workable_mode(image)
    factor = min(image.width // raw_target[0], image.height // raw_target[1])
    if factor >= 2:
        image = image.reduce(factor)
    if orientation in EXIF_TRANSPOSE:      # as ImageOps.exif_transpose, on the shrunk image
        image = image.transpose(EXIF_TRANSPOSE[orientation])
    image = _on_white(image).resize(target, Image.Resampling.LANCZOS)
    left, top = (target[0] - bucket[0]) // 2, (target[1] - bucket[1]) // 2
    return image.crop((left, top, left + bucket[0], top + bucket[1]))


def _workable_mode(image: Image.Image) -> Image.Image:
    """L, LA, RGB or RGBA: modes Pillow can shrink, transparency kept for compositing."""
    mode = image.mode
    if mode.startswith("I;16"):
        return _to_8bit(np.asarray(image).astype(np.float32) / 257.0)
    if mode in ("I", "F"):
        # 16-bit PNGs open as "I" in some Pillow versions: values above 255 mean 16-bit.
        values = np.asarray(image).astype(np.float32)
        return _to_8bit(values / 257.0 if values.max(initial=0) > 255 else values)
    if mode in ("P", "PA", "RGBa", "La"):
        rgba = "transparency" in image.info or mode != "P"
        return image.convert("RGBA" if rgba else "RGB")
    if mode in ("L", "RGB") and "transparency" in image.info:
        return image.convert(mode[0] + "A" if mode == "L" else "RGBA")
    if mode in ("L", "LA", "RGB", "RGBA"):
        return image
    return image.convert("RGB")            # 1, CMYK, YCbCr, LAB, HSV


def _to_8bit(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def _on_white(image: Image.Image) -> Image.Image:
    if image.mode in ("LA", "RGBA"):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------
# Option checks


def _check_whole(value, name, minimum, hint):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TrainerInputError(f"{name_of(name)} must be a whole number of at least {minimum} ({hint}), got {value!r}.")


def _check_prior_loss_weight(weight):
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
            or weight <= 0:
        raise TrainerInputError(f"{name_of('prior_loss_weight')} must be a number above 0 (1.0 is usual), got {weight!r}.")


def _check_probability(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise TrainerInputError(f"{name_of(name)} must be a probability between 0 and 1 (0 = off), got {value!r}.")
