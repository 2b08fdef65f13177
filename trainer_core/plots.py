"""Pictures for people: the loss chart and labelled image grids. Pure PIL, no matplotlib needed."""
from __future__ import annotations

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


def labelled_grid(rows: list, row_labels: list, column_labels: list, cell: int = 256) -> Image.Image:
    """rows[r][c] images in a grid, with a label above each column and left of each row."""
    font = ImageFont.load_default()
    label_width, label_height = 120, 20
    columns = max(len(r) for r in rows)
    out = Image.new("RGB", (label_width + columns * cell, label_height + len(rows) * cell), BACKGROUND)
    draw = ImageDraw.Draw(out)
    for c, text in enumerate(column_labels):
        draw.text((label_width + c * cell + 4, 4), text, fill=AXIS_COLOUR, font=font)
    for r, (row, text) in enumerate(zip(rows, row_labels)):
        draw.text((4, label_height + r * cell + cell // 2), text, fill=AXIS_COLOUR, font=font)
        for c, image in enumerate(row):
            out.paste(image.convert("RGB").resize((cell, cell)), (label_width + c * cell, label_height + r * cell))
    return out
