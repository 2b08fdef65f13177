"""The loss chart and the labelled grids people read their results from."""
import numpy as np
from PIL import Image

from trainer_core.plots import BACKGROUND, labelled_grid, loss_chart, smoothed, wrapped


def flat(colour, size):
    return Image.new("RGB", size, colour)


def ink(image, box) -> int:
    """How many pixels in the box are not background."""
    pixels = np.asarray(image.crop(box))
    return int((pixels != np.array(BACKGROUND)).any(axis=-1).sum())


def test_grid_keeps_each_pictures_shape_and_puts_labels_outside_the_pictures():
    red, blue = (200, 0, 0), (0, 0, 200)
    rows = [[flat(red, (96, 64)), flat(blue, (96, 64))]]
    grid = labelled_grid(rows, ["seed 0"], ["trained, with token", "trained, no token"])
    pixels = np.asarray(grid)
    width, height = grid.size
    top, left = height - 64, width - 2 * 96
    assert (pixels[top:, left:left + 96] == red).all(), "the first picture, not stretched to a square"
    assert (pixels[top:, left + 96:] == blue).all()
    assert ink(grid, (0, 0, width, top)) > 0, "column labels drawn above"
    assert ink(grid, (0, top, left, height)) > 0, "row label drawn left"


def test_long_column_labels_wrap_inside_their_column_on_small_pictures():
    label = "skkmtn, orange round creature sitting on a wooden table"
    black = flat((0, 0, 0), (64, 64))
    grid = labelled_grid([[black, black]], ["trained"], [label, ""])
    width, height = grid.size
    band_bottom, first_column = height - 64, width - 2 * 64
    assert band_bottom > 30, "the label took several lines"
    assert ink(grid, (first_column, 0, first_column + 64, band_bottom)) > 0
    assert ink(grid, (first_column + 64, 0, width, band_bottom)) == 0, "nothing spills into the next column"
    assert ink(grid, (0, 0, first_column, band_bottom)) == 0, "nor left over the row labels"


def test_wrapping_breaks_at_spaces_and_inside_a_word_only_when_it_must():
    from PIL import ImageFont
    font = ImageFont.load_default()
    assert wrapped("a b", 500, font) == ["a b"]
    lines = wrapped("orange round creature", 60, font)
    assert len(lines) > 1 and " ".join(lines) == "orange round creature"
    lines = wrapped("x" * 40, 60, font)
    assert len(lines) > 1 and "".join(lines) == "x" * 40


def test_small_pictures_are_enlarged_to_min_cell_keeping_their_shape():
    grid = labelled_grid([[flat((0, 200, 0), (64, 32))]], ["base"], ["prompt"], min_cell=128)
    pixels = np.asarray(grid)
    assert (pixels[-64:, -128:] == (0, 200, 0)).all()
    assert not (pixels[-65, -128:] == (0, 200, 0)).all(), "64 x 32 becomes 128 x 64, not 128 x 128"


def test_loss_chart_draws_the_smoothed_line_and_handles_no_steps():
    chart = np.asarray(loss_chart([(step, 1.0 / step) for step in range(1, 50)]))
    red = (chart[..., 0] > 150) & (chart[..., 1] < 80) & (chart[..., 2] < 80)
    assert red.sum() > 100
    assert loss_chart([]).size == (512, 256)
    assert smoothed([2.0]) == [2.0], "bias-corrected: the first value is itself"
