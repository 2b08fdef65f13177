"""Pictures for people: the loss chart and labelled image grids. Pure PIL, no matplotlib needed."""
from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
RAW_COLOUR = (170, 190, 230)
SMOOTH_COLOUR = (200, 40, 40)
AXIS_COLOUR = (60, 60, 60)


def smoothed(values: list, weight: float = 0.9) -> list:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** i))
    return out


def loss_chart(losses: list, width: int = 512, height: int = 256) -> Image.Image:
    """Raw loss (light) and its moving average (red) against the step."""
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, right, top, bottom = 48, width - 10, 20, height - 24
    draw.rectangle([left, top, right, bottom], outline=AXIS_COLOUR)
    if not losses:
        draw.text((left + 8, top + 8), "no steps yet", fill=AXIS_COLOUR, font=font)
        return image
    steps = [s for s, _ in losses]
    values = [v for _, v in losses]
    low, high = min(values), max(values)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    first, last = steps[0], max(steps[-1], steps[0] + 1)

    def point(step, value):
        x = left + (right - left) * (step - first) / (last - first)
        y = bottom - (bottom - top) * (value - low) / (high - low)
        return x, y

    if len(losses) > 1:
        draw.line([point(s, v) for s, v in losses], fill=RAW_COLOUR, width=1)
        draw.line([point(s, v) for s, v in zip(steps, smoothed(values))], fill=SMOOTH_COLOUR, width=2)
    else:
        x, y = point(steps[0], values[0])
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=SMOOTH_COLOUR)
    draw.text((4, top - 4), f"{high:.3f}", fill=AXIS_COLOUR, font=font)
    draw.text((4, bottom - 8), f"{low:.3f}", fill=AXIS_COLOUR, font=font)
    draw.text((left, bottom + 6), f"step {first}", fill=AXIS_COLOUR, font=font)
    draw.text((right - 70, bottom + 6), f"step {steps[-1]}", fill=AXIS_COLOUR, font=font)
    draw.text((left + 4, 4), f"loss {values[-1]:.4f}  (smoothed {smoothed(values)[-1]:.4f})",
              fill=SMOOTH_COLOUR, font=font)
    return image


def side_by_side(images: list) -> Image.Image:
    height = max(i.height for i in images)
    out = Image.new("RGB", (sum(i.width for i in images), height), BACKGROUND)
    x = 0
    for image in images:
        out.paste(image.convert("RGB"), (x, 0))
        x += image.width
    return out


LABEL_PAD = 4


@dataclass
class GridLayout:
    """Where labelled_grid puts things: row labels on the left, column labels above, then one
    cell of cell_size per picture."""
    label_width: int
    label_height: int
    cell_size: tuple  # (width, height)
    rows: int
    columns: int

    @property
    def size(self) -> tuple:
        width, height = self.cell_size
        return self.label_width + self.columns * width, self.label_height + self.rows * height

    def cell_box(self, row: int, column: int) -> tuple:
        """(left, top, right, bottom) of one picture."""
        width, height = self.cell_size
        left, top = self.label_width + column * width, self.label_height + row * height
        return left, top, left + width, top + height


def _text_width(text: str, font) -> int:
    return math.ceil(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font))


def wrapped(text: str, width: int, font) -> list:
    """The text in lines no wider than width: broken at spaces, inside a word only when the word
    alone is too wide."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if _text_width(candidate, font) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for character in word:
            if line and _text_width(line + character, font) > width:
                lines.append(line)
                line = ""
            line += character
    return lines + [line] if line else lines


def grid_layout(row_labels: list, column_labels: list, cell_size: tuple, columns: int) -> GridLayout:
    font = ImageFont.load_default()
    line_height = _line_height(font)
    column_lines = max((len(wrapped(t, cell_size[0] - 2 * LABEL_PAD, font)) for t in column_labels), default=0)
    label_width = max((_text_width(t, font) for t in row_labels), default=0) + 2 * LABEL_PAD
    label_height = max(1, column_lines) * line_height + 2 * LABEL_PAD
    return GridLayout(label_width, label_height, tuple(cell_size), len(row_labels), columns)


def _line_height(font) -> int:
    left, top, right, bottom = font.getbbox("Ay")
    return bottom + 2


def labelled_grid(rows: list, row_labels: list, column_labels: list, min_cell: int = 0) -> Image.Image:
    """rows[r][c] pictures in a grid, with a label above each column (wrapped to the column's
    width) and left of each row. Pictures keep their own size and shape; pictures smaller than
    min_cell on their longer side are enlarged (same shape) so that small samples stay legible."""
    font = ImageFont.load_default()
    width = max(image.width for row in rows for image in row)
    height = max(image.height for row in rows for image in row)
    scale = max(1, math.ceil(min_cell / max(width, height)))
    cell = (width * scale, height * scale)
    layout = grid_layout(row_labels, column_labels, cell, max(len(r) for r in rows))
    out = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(out)
    line_height = _line_height(font)
    for c, text in enumerate(column_labels):
        left, _, _, _ = layout.cell_box(0, c)
        for i, line in enumerate(wrapped(text, cell[0] - 2 * LABEL_PAD, font)):
            draw.text((left + LABEL_PAD, LABEL_PAD + i * line_height), line, fill=AXIS_COLOUR, font=font)
    for r, (row, text) in enumerate(zip(rows, row_labels)):
        _, top, _, bottom = layout.cell_box(r, 0)
        draw.text((LABEL_PAD, (top + bottom - line_height) // 2), text, fill=AXIS_COLOUR, font=font)
        for c, image in enumerate(row):
            image = image.convert("RGB")
            if scale > 1:
                image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
            out.paste(image, layout.cell_box(r, c)[:2])
    return out
