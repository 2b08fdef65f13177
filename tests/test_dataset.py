"""The dataset: captions and tags, buckets and crops, image modes, broken files, fingerprints,
repeats, regularization images. Images are drawn with PIL into tmp_path."""
import io
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from trainer_core.dataset import (DatasetConfig, ImageDataset, RegularizationSet, blank_images,
                                  process_tags, regularization_set)
from trainer_core.errors import TrainerInputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(folder="", **overrides):
    values = dict(folder=str(folder), instance_token="skkmtn", resolution=64)
    values.update(overrides)
    return DatasetConfig(**values)


def save_image(folder, name, size=(64, 64), color=(200, 30, 30), mode="RGB", caption=None):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    Image.new(mode, size, color).save(path)
    if caption is not None:
        with open(os.path.splitext(path)[0] + ".txt", "w", encoding="utf-8") as f:
            f.write(caption)
    return path


def tags(text):
    return [t.strip() for t in text.split(",") if t.strip()]


# --- captions -----------------------------------------------------------------------------


def test_captions_are_read_and_an_image_without_one_gets_the_instance_prompt(tmp_path):
    save_image(tmp_path, "a.png", caption="skkmtn, red dress\n")
    save_image(tmp_path, "b.png")
    dataset = ImageDataset.from_folder(config(tmp_path, class_token="girl"))
    rng = random.Random(0)
    assert [dataset.caption(i, rng) for i in range(2)] == ["skkmtn, red dress", "skkmtn girl"]


def test_ignore_caption_files_captions_every_image_with_the_instance_prompt(tmp_path):
    save_image(tmp_path, "a.png", caption="skkmtn, red dress\n")
    save_image(tmp_path, "b.png")
    read = ImageDataset.from_folder(config(tmp_path, class_token="girl"))
    ignored = ImageDataset.from_folder(config(tmp_path, class_token="girl", ignore_caption_files=True))
    rng = random.Random(0)
    assert [ignored.caption(i, rng) for i in range(2)] == ["skkmtn girl", "skkmtn girl"]
    assert not ignored.warnings, "asked for, so no warning"
    assert ignored.fingerprint() != read.fingerprint()


def test_caption_without_the_token_gets_the_instance_prompt_as_first_tag(tmp_path):
    save_image(tmp_path, "a.png", caption="red dress, smiling")
    save_image(tmp_path, "b.png", caption="photo of SKKMTN smiling")
    dataset = ImageDataset.from_folder(config(tmp_path, class_token="girl"))
    rng = random.Random(0)
    assert dataset.caption(0, rng) == "skkmtn girl, red dress, smiling"
    assert dataset.caption(1, rng) == "photo of SKKMTN smiling"


@pytest.mark.parametrize("token", ["", "   "])
def test_missing_instance_token_says_what_to_fill_in(tmp_path, token):
    save_image(tmp_path, "a.png")
    with pytest.raises(TrainerInputError, match="instance_token") as error:
        ImageDataset.from_folder(config(tmp_path, instance_token=token))
    assert "trigger word" in str(error.value) and "skkmtn" in str(error.value)


def test_shuffle_keeps_leading_tags_in_place_and_moves_the_others():
    text = "skkmtn, girl, a, b, c, d, e"
    orders = set()
    for seed in range(50):
        out = tags(process_tags(text, random.Random(seed), keep_tokens=2, shuffle=True))
        assert out[:2] == ["skkmtn", "girl"]
        assert sorted(out[2:]) == ["a", "b", "c", "d", "e"]
        orders.add(tuple(out[2:]))
    assert len(orders) > 10


def test_tag_dropout_drops_only_unkept_tags_and_never_the_token():
    text = "girl, a, b, skkmtn, c, d"
    seen = set()
    for seed in range(100):
        out = tags(process_tags(text, random.Random(seed), keep_tokens=1, tag_dropout=0.5, protected="skkmtn"))
        assert out[0] == "girl" and "skkmtn" in out
        assert out == [t for t in tags(text) if t in out]        # order kept without shuffle
        seen.add(len(out))
    assert min(seen) == 2 and max(seen) == 6


def test_caption_dropout_gives_the_bare_instance_prompt_at_its_rate(tmp_path):
    images = [Image.new("RGB", (64, 64))]
    always = ImageDataset.from_images(images, ["skkmtn, red dress"], config(class_token="girl", caption_dropout=1.0))
    assert always.caption(0, random.Random(0)) == "skkmtn girl"
    half = ImageDataset.from_images(images, ["skkmtn, red dress"], config(class_token="girl", caption_dropout=0.5))
    rng = random.Random(0)
    dropped = sum(half.caption(0, rng) == "skkmtn girl" for _ in range(1000))
    assert 400 < dropped < 600


def test_captions_repeat_with_the_same_rng_seed():
    dataset = ImageDataset.from_images([Image.new("RGB", (64, 64))], ["skkmtn, a, b, c, d"],
                                       config(shuffle_tags=True, tag_dropout=0.3, caption_dropout=0.2))
    first = [dataset.caption(0, random.Random(seed)) for seed in range(20)]
    assert first == [dataset.caption(0, random.Random(seed)) for seed in range(20)]
    assert len(set(first)) > 3


def test_template_lines_put_the_token_in_name_and_the_caption_in_filewords():
    lines = ["a photo of [name], [filewords]", "[filewords], drawn by [name]"]
    images = [Image.new("RGB", (64, 64))] * 2
    dataset = ImageDataset.from_images(images, ["red dress, smiling", None],
                                       config(class_token="girl", template_lines=lines))
    rng = random.Random(0)
    captions = {dataset.caption(0, rng) for _ in range(40)}
    assert captions == {"a photo of skkmtn, red dress, smiling", "red dress, smiling, drawn by skkmtn"}
    assert dataset.caption(1, random.Random(1)) in {"a photo of skkmtn, girl", "girl, drawn by skkmtn"}


def test_template_filewords_are_shuffled_with_kept_tags_first():
    dataset = ImageDataset.from_images([Image.new("RGB", (64, 64))], ["red dress, a, b, c"],
                                       config(template_lines=["a photo of [name], [filewords]"],
                                              shuffle_tags=True, keep_tokens=1))
    for seed in range(20):
        caption = dataset.caption(0, random.Random(seed))
        assert caption.startswith("a photo of skkmtn, red dress, ")
        assert sorted(tags(caption)[2:]) == ["a", "b", "c"]


caption_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60) | \
    st.lists(st.text(alphabet="abc xyz[]_", max_size=6), max_size=8).map(", ".join)


@settings(max_examples=150, deadline=None)
@given(text=caption_text, keep=st.integers(0, 12), shuffle=st.booleans(),
       tag_dropout=st.floats(0, 1), caption_dropout=st.floats(0, 1), seed=st.integers(0, 2**32))
def test_caption_processing_never_fails_keeps_kept_tags_and_invents_nothing(
        text, keep, shuffle, tag_dropout, caption_dropout, seed):
    options = config(class_token="girl", keep_tokens=keep, shuffle_tags=shuffle,
                     tag_dropout=tag_dropout, caption_dropout=caption_dropout)
    dataset = ImageDataset.from_images([Image.new("RGB", (8, 8))], [text], options)
    caption = dataset.caption(0, random.Random(seed))
    written = [t.strip() for line in text.splitlines() for t in line.split(",") if t.strip()]
    assert set(tags(caption)) <= set(written) | {"skkmtn girl"}
    assert "skkmtn" in caption.casefold()
    if tags(caption) != ["skkmtn girl"]:          # not replaced by caption dropout
        as_written = ImageDataset.from_images([Image.new("RGB", (8, 8))], [text], config(class_token="girl"))
        assert tags(caption)[:keep] == tags(as_written.caption(0, random.Random(0)))[:keep]


# --- sizes, crops, image modes -------------------------------------------------------------


def test_bucket_keeps_the_aspect_ratio_within_the_pixel_budget(tmp_path):
    save_image(tmp_path, "wide.png", size=(768, 512))
    save_image(tmp_path, "tall.png", size=(512, 768))
    dataset = ImageDataset.from_folder(config(tmp_path, resolution=512))
    for index, name in enumerate(["tall.png", "wide.png"]):
        assert dataset.items[index].name == name
    (tw, th), (ww, wh) = dataset.items[0].bucket, dataset.items[1].bucket
    assert ww > wh and abs(ww / wh - 1.5) < 0.1 and ww * wh <= 512 * 512
    assert (th, tw) == (ww, wh)
    assert ww % 64 == 0 and wh % 64 == 0
    assert dataset.pixels(1, flip=False).shape == (3, wh, ww)


def stripes(size):
    """Red, green and blue vertical thirds."""
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, size[0] // 3, size[1]))
    image.paste((0, 255, 0), (size[0] // 3, 0, 2 * size[0] // 3, size[1]))
    return image


def test_center_crop_keeps_the_middle_and_squash_keeps_everything():
    image = stripes((192, 64))
    cropped = ImageDataset.from_images([image], None, config(bucketing=False, center_crop=True))
    pixels = cropped.pixels(0, flip=False)
    assert pixels.shape == (3, 64, 64)
    assert torch.allclose(pixels.mean(dim=(1, 2)), torch.tensor([-1.0, 1.0, -1.0]), atol=0.05)
    squashed = ImageDataset.from_images([image], None, config(bucketing=False, center_crop=False))
    left, right = squashed.pixels(0, flip=False)[:, :, 2], squashed.pixels(0, flip=False)[:, :, -3]
    assert left[0].mean() > 0.9 and right[2].mean() > 0.9


def test_flip_mirrors_left_and_right():
    dataset = ImageDataset.from_images([stripes((192, 192))], None, config())
    plain, flipped = dataset.pixels(0, flip=False), dataset.pixels(0, flip=True)
    assert torch.equal(flipped, plain.flip(2))
    assert plain[0, :, 0].mean() > 0.9 and flipped[2, :, 0].mean() > 0.9


def rgb_of(pixels):
    return ((pixels.mean(dim=(1, 2)) + 1) * 127.5).tolist()


def palette_with_transparency():
    image = Image.new("P", (64, 64), 0)
    image.putpalette([0, 0, 0, 10, 20, 30])
    image.info["transparency"] = 0
    return image


MODES = {
    "rgba_transparent": (lambda: Image.new("RGBA", (64, 64), (0, 0, 0, 0)), "png", (255, 255, 255)),
    "rgba_half": (lambda: Image.new("RGBA", (64, 64), (0, 0, 0, 128)), "png", (127, 127, 127)),
    "rgba_webp": (lambda: Image.new("RGBA", (64, 64), (0, 0, 0, 0)), "webp", (255, 255, 255)),
    "la": (lambda: Image.new("LA", (64, 64), (0, 0)), "png", (255, 255, 255)),
    "palette_transparent": (palette_with_transparency, "png", (255, 255, 255)),
    "palette": (lambda: Image.new("RGB", (64, 64), (10, 200, 30)).convert("P"), "png", (10, 200, 30)),
    "grayscale": (lambda: Image.new("L", (64, 64), 100), "png", (100, 100, 100)),
    "bilevel": (lambda: Image.new("1", (64, 64), 1), "bmp", (255, 255, 255)),
    "16bit": (lambda: Image.fromarray(np.full((64, 64), 65535 // 2, dtype=np.uint16)), "png", (127, 127, 127)),
    "cmyk": (lambda: Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "jpg", (255, 0, 0)),
    "rgb_bmp": (lambda: Image.new("RGB", (64, 64), (10, 200, 30)), "bmp", (10, 200, 30)),
}


@pytest.mark.parametrize("case", sorted(MODES))
def test_every_image_mode_becomes_rgb_with_transparency_on_white(tmp_path, case):
    make, extension, expected = MODES[case]
    make().save(tmp_path / f"image.{extension}")
    dataset = ImageDataset.from_folder(config(tmp_path))
    pixels = dataset.pixels(0, flip=False)
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert np.allclose(rgb_of(pixels), expected, atol=6), rgb_of(pixels)


@pytest.mark.parametrize("mode, value", [("I", 40000), ("I", 200), ("F", 100.0), ("I;16", 0)])
def test_wide_integer_and_float_images_in_memory_become_rgb(mode, value):
    dataset = ImageDataset.from_images([Image.new(mode, (64, 64), value)], None, config())
    expected = value / 257 if value > 255 else value
    assert np.allclose(rgb_of(dataset.pixels(0, flip=False)), [expected] * 3, atol=1)


def test_fully_transparent_image_trains_as_white():
    dataset = ImageDataset.from_images([Image.new("RGBA", (64, 64), (255, 0, 0, 0))], None, config())
    assert torch.allclose(dataset.pixels(0, flip=False), torch.ones(3, 64, 64), atol=1e-6)


def test_exif_orientation_turns_the_image_upright(tmp_path):
    image = Image.new("RGB", (128, 64), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 64, 64))            # left half red
    exif = Image.Exif()
    exif[0x0112] = 6                                     # shown rotated 90 degrees clockwise
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    dataset = ImageDataset.from_folder(config(tmp_path, resolution=128))
    width, height = dataset.items[0].bucket
    assert height > width
    pixels = dataset.pixels(0, flip=False)
    top, bottom = rgb_of(pixels[:, : height // 3]), rgb_of(pixels[:, -height // 3:])
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_small_images_are_upscaled_with_one_warning_listing_them(tmp_path):
    save_image(tmp_path, "tiny.png", size=(40, 40))
    save_image(tmp_path, "small.png", size=(50, 50))
    save_image(tmp_path, "big.png", size=(200, 200))
    dataset = ImageDataset.from_folder(config(tmp_path))
    notes = [w for w in dataset.warnings if "upscaled" in w]
    assert len(notes) == 1 and "tiny.png" in notes[0] and "small.png" in notes[0] and "big.png" not in notes[0]
    assert dataset.pixels(dataset.items.index(next(i for i in dataset.items if i.name == "tiny.png")),
                          flip=False).shape == (3, 64, 64)


def test_huge_jpeg_loads_at_bucket_size_without_decoding_it_whole(tmp_path):
    Image.new("RGB", (10000, 10000), (200, 40, 30)).save(tmp_path / "huge.jpg", quality=50)
    script = textwrap.dedent(f"""
        import random, resource, sys
        import torch
        from trainer_core.dataset import DatasetConfig, ImageDataset
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        dataset = ImageDataset.from_folder(DatasetConfig(folder={str(tmp_path)!r}, instance_token="skkmtn"))
        pixels = dataset.pixels(0, flip=False)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(tuple(pixels.shape), grown / (1024 * 1024 if sys.platform == "darwin" else 1024))
    """)
    pytest.importorskip("resource")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert done.returncode == 0, done.stderr
    shape, grown_mb = done.stdout.split(") ")
    assert shape == "(3, 512, 512"
    assert float(grown_mb) < 100          # decoded whole it would take 300 MB


# --- broken inputs -------------------------------------------------------------------------


def test_truncated_and_empty_images_are_skipped_with_a_warning(tmp_path):
    save_image(tmp_path, "good.png")
    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 64).convert("RGB").save(buffer, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 64).save(buffer, "PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (tmp_path / "empty.webp").write_bytes(b"")
    (tmp_path / "text.bmp").write_text("not an image")
    dataset = ImageDataset.from_folder(config(tmp_path))
    assert [item.name for item in dataset.items] == ["good.png"]
    skipped = [w for w in dataset.warnings if "unreadable" in w]
    assert len(skipped) == 1
    assert all(name in skipped[0] for name in ["cut.jpg", "cut.png", "empty.webp (empty file)", "text.bmp"])


def test_folder_of_only_broken_images_names_the_folder(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(TrainerInputError, match="no readable images") as error:
        ImageDataset.from_folder(config(tmp_path))
    assert str(tmp_path) in str(error.value) and "empty.png" in str(error.value)


def test_missing_folder_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(TrainerInputError, match="does not exist") as error:
        ImageDataset.from_folder(config(missing))
    assert str(missing) in str(error.value)
    with pytest.raises(TrainerInputError, match="folder"):
        ImageDataset.from_folder(config(""))


def test_folder_without_images_lists_the_accepted_extensions(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "photos").mkdir()
    with pytest.raises(TrainerInputError) as error:
        ImageDataset.from_folder(config(tmp_path))
    message = str(error.value)
    assert all(ext in message for ext in [".png", ".jpg", ".jpeg", ".webp", ".bmp"])
    assert "photos" in message


def test_uppercase_extensions_are_images(tmp_path):
    save_image(tmp_path, "A.PNG")
    Image.new("RGB", (64, 64)).save(tmp_path / "B.JPeG", "JPEG")
    assert len(ImageDataset.from_folder(config(tmp_path))) == 2


def test_orphan_captions_and_shared_names_are_reported(tmp_path):
    save_image(tmp_path, "a.png", caption="skkmtn, red")
    Image.new("RGB", (64, 64)).save(tmp_path / "a.jpg")
    (tmp_path / "lonely.txt").write_text("skkmtn, blue")
    dataset = ImageDataset.from_folder(config(tmp_path))
    assert [item.name for item in dataset.items] == ["a.jpg", "a.png"]
    assert [item.text for item in dataset.items] == ["skkmtn, red", "skkmtn, red"]
    report = " ".join(dataset.warnings)
    assert "lonely.txt" in report and "a.jpg and a.png share a.txt" in report


def test_cp932_caption_is_decoded_with_a_warning(tmp_path):
    save_image(tmp_path, "a.png")
    (tmp_path / "a.txt").write_bytes("skkmtn, 赤いドレス, 笑顔".encode("cp932"))
    dataset = ImageDataset.from_folder(config(tmp_path))
    assert dataset.caption(0, random.Random(0)) == "skkmtn, 赤いドレス, 笑顔"
    assert any("cp932" in w and "a.txt" in w for w in dataset.warnings)


def test_caption_in_neither_utf8_nor_cp932_falls_back_to_latin1(tmp_path):
    save_image(tmp_path, "a.png")
    (tmp_path / "a.txt").write_bytes("skkmtn, café au lait".encode("latin-1"))
    dataset = ImageDataset.from_folder(config(tmp_path))
    assert dataset.caption(0, random.Random(0)) == "skkmtn, café au lait"
    assert any("latin-1" in w for w in dataset.warnings)


def test_caption_extension_is_configurable(tmp_path):
    save_image(tmp_path, "a.png")
    (tmp_path / "a.caption").write_text("skkmtn, from caption file")
    (tmp_path / "a.txt").write_text("skkmtn, from txt")
    dataset = ImageDataset.from_folder(config(tmp_path, caption_extension="caption"))
    assert dataset.caption(0, random.Random(0)) == "skkmtn, from caption file"


@pytest.mark.parametrize("field, value", [
    ("repeats", 0), ("resolution", 500), ("resolution", 0), ("keep_tokens", -1), ("caption_dropout", 1.5),
    ("tag_dropout", -0.1), ("tag_dropout", float("nan")), ("caption_extension", ""), ("template_lines", []),
    ("flip", "yes"),
])
def test_bad_options_name_the_field(field, value):
    with pytest.raises(TrainerInputError, match=field):
        config(**{field: value}).validate()


def test_bad_resolution_suggests_the_nearest_valid_values():
    with pytest.raises(TrainerInputError, match="448 or 512"):
        config(resolution=500).validate()


# --- fingerprint, repeats, batches, summary -------------------------------------------------


def test_fingerprint_changes_with_files_captions_and_options_only(tmp_path):
    image = save_image(tmp_path, "a.png", caption="skkmtn, red")
    save_image(tmp_path, "b.png")

    def fingerprint(**overrides):
        return ImageDataset.from_folder(config(tmp_path, **overrides)).fingerprint()

    first = fingerprint()
    assert fingerprint() == first
    assert fingerprint(shuffle_tags=True) != first
    stat = os.stat(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = fingerprint()
    assert touched != first
    Image.new("RGB", (64, 64), (1, 2, 3)).save(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert fingerprint() != touched
    changed = fingerprint()
    (tmp_path / "a.txt").write_text("skkmtn, blue")
    assert fingerprint() != changed


def test_fingerprint_of_images_in_memory_follows_pixels_and_captions():
    red, blue = Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))
    base = ImageDataset.from_images([red], ["skkmtn"], config()).fingerprint()
    assert ImageDataset.from_images([red.copy()], ["skkmtn"], config()).fingerprint() == base
    assert ImageDataset.from_images([blue], ["skkmtn"], config()).fingerprint() != base
    assert ImageDataset.from_images([red], ["skkmtn, red"], config()).fingerprint() != base


def test_repeats_expand_the_epoch_and_batches_never_mix_buckets(tmp_path):
    for i in range(3):
        save_image(tmp_path, f"square{i}.png", size=(256, 256))
    for i in range(2):
        save_image(tmp_path, f"wide{i}.png", size=(384, 256))
    dataset = ImageDataset.from_folder(config(tmp_path, resolution=256, repeats=3))
    assert len({dataset.items[i].bucket for i in range(len(dataset))}) == 2
    batches = dataset.epoch_batches(2, random.Random(0))
    flat = sorted(i for batch in batches for i in batch)
    assert flat == sorted(list(range(5)) * 3)
    assert all(len({dataset.items[i].bucket for i in batch}) == 1 for batch in batches)
    assert all(1 <= len(batch) <= 2 for batch in batches)
    assert batches == dataset.epoch_batches(2, random.Random(0))
    assert batches != dataset.epoch_batches(2, random.Random(1))


def test_repeat_subfolders_give_their_images_that_many_repeats(tmp_path):
    save_image(tmp_path, "top.png")
    save_image(tmp_path / "5_skkmtn girl", "deep.png", caption="skkmtn, closeup")
    save_image(tmp_path / "backup", "ignored.png")
    dataset = ImageDataset.from_folder(config(tmp_path, repeats=2))
    assert [(item.name, item.repeats) for item in dataset.items] == [("top.png", 2), ("5_skkmtn girl/deep.png", 5)]
    assert dataset.caption(1, random.Random(0)) == "skkmtn, closeup"
    assert any("backup" in w for w in dataset.warnings)
    flat = [i for batch in dataset.epoch_batches(1, random.Random(0)) for i in batch]
    assert flat.count(0) == 2 and flat.count(1) == 5
    summary = dataset.summary()
    assert summary["num_train_images"] == 7
    assert summary["dataset_dirs"] == {f"2_{tmp_path.name}": {"n_repeats": 2, "img_count": 1},
                                       "5_skkmtn girl": {"n_repeats": 5, "img_count": 1}}


def test_summary_counts_buckets_and_tags(tmp_path):
    save_image(tmp_path, "a.png", size=(128, 128), caption="skkmtn, red dress, smiling")
    save_image(tmp_path, "b.png", size=(256, 128), caption="skkmtn, red dress")
    save_image(tmp_path, "c.png", size=(128, 128))
    summary = ImageDataset.from_folder(config(tmp_path, resolution=256, class_token="girl")).summary()
    assert summary["num_images"] == 3 and summary["resolution"] == 256 and summary["repeats"] == 1
    assert summary["buckets"] == {"256x256": 2, "320x192": 1}
    assert summary["tag_frequency"] == {"skkmtn": 2, "red dress": 2, "smiling": 1, "skkmtn girl": 1}


# --- regularization --------------------------------------------------------------------------


def test_blank_regularization_images_are_white_and_captioned_with_the_class_prompt():
    reg = regularization_set(class_prompt="a photo of a girl", blank_count=3, resolution=64, prior_loss_weight=0.5)
    assert isinstance(reg, RegularizationSet) and reg.prior_loss_weight == 0.5
    assert len(reg.dataset) == 3
    for i in range(3):
        assert torch.allclose(reg.dataset.pixels(i, flip=False), torch.ones(3, 64, 64))
        assert reg.dataset.caption(i, random.Random(i)) == "a photo of a girl"
    assert all(image.mode == "RGBA" and image.getextrema()[3] == (0, 0) for image in blank_images(2, 64))


def test_regularization_folder_images_all_use_the_class_prompt(tmp_path):
    save_image(tmp_path, "a.png", size=(128, 64), caption="something else")
    reg = regularization_set(folder=str(tmp_path), images=[Image.new("RGB", (64, 64))],
                             class_prompt="a girl", blank_count=1, resolution=64)
    assert len(reg.dataset) == 3
    assert {reg.dataset.caption(i, random.Random(0)) for i in range(3)} == {"a girl"}
    assert reg.dataset.pixels(0, flip=False).shape == (3, 64, 64)
    assert any("use_caption_files" in warning for warning in reg.dataset.warnings)


def test_regularization_resolution_0_follows_the_dataset_and_a_size_given_stays(tmp_path):
    save_image(tmp_path, "a.png", size=(256, 256))
    dataset = ImageDataset.from_folder(DatasetConfig(folder=str(tmp_path), instance_token="skkmtn", resolution=128))
    following = regularization_set(folder=str(tmp_path), class_prompt="a girl", blank_count=1, resolution=0)
    resized = following.for_dataset(dataset)
    assert resized.dataset.config.resolution == 128 and resized.prior_loss_weight == following.prior_loss_weight
    assert [resized.dataset.pixels(i, flip=False).shape for i in range(2)] == [(3, 128, 128)] * 2
    fixed = regularization_set(folder=str(tmp_path), class_prompt="a girl", blank_count=1, resolution=64)
    assert fixed.for_dataset(dataset) is fixed


def test_regularization_caption_files_are_used_as_written_when_asked(tmp_path):
    save_image(tmp_path, "a.png", size=(64, 64), caption="a photo of a red car, parked")
    save_image(tmp_path, "b.png", size=(64, 64))
    reg = regularization_set(folder=str(tmp_path), class_prompt="a photo of a girl", blank_count=1, resolution=64,
                             use_caption_files=True)
    captions = [reg.dataset.caption(i, random.Random(0)) for i in range(3)]
    assert captions == ["a photo of a red car, parked", "a photo of a girl", "a photo of a girl"], \
        "the caption as written (no class prompt added); images without one get the class prompt"
    plain = regularization_set(folder=str(tmp_path), class_prompt="a photo of a girl", resolution=64)
    assert plain.dataset.fingerprint() != reg.dataset.fingerprint(), "a cached training is not reused"


@pytest.mark.parametrize("options, field", [
    (dict(blank_count=2), "class_prompt"),
    (dict(blank_count=2, class_prompt="a girl", prior_loss_weight=0), "prior_loss_weight"),
    (dict(blank_count=2, class_prompt="a girl", prior_loss_weight=float("inf")), "prior_loss_weight"),
    (dict(blank_count=-1, class_prompt="a girl"), "blank_count"),
    (dict(class_prompt="a girl"), "blank_count"),
    (dict(blank_count=1, class_prompt="a girl", resolution=100), "resolution"),
    (dict(blank_count=1, class_prompt="a girl", use_caption_files="yes"), "use_caption_files"),
])
def test_bad_regularization_options_name_the_field(options, field):
    with pytest.raises(TrainerInputError, match=field):
        regularization_set(**options)
