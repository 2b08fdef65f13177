"""A1111 prompt-template files: lines with [name] and [filewords] placeholders."""
from __future__ import annotations

import os

from .errors import TrainerInputError

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")


def available_templates() -> list:
    """Names of the templates shipped with the pack (file names without .txt)."""
    return sorted(os.path.splitext(n)[0] for n in os.listdir(TEMPLATE_DIR) if n.endswith(".txt"))


def read_template(name_or_path: str) -> list:
    """The non-empty lines of a shipped template (by name) or of any template file (by path)."""
    path = name_or_path
    if not os.path.isfile(path):
        path = os.path.join(TEMPLATE_DIR, f"{name_or_path}.txt")
    if not os.path.isfile(path):
        raise TrainerInputError(
            f"prompt template {name_or_path!r} not found: give a file path or one of "
            f"{', '.join(available_templates())}.")
    with open(path, encoding="utf-8-sig") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise TrainerInputError(f"prompt template {path} is empty: write one prompt per line, e.g. "
                                f"'a photo of [name], [filewords]'.")
    return lines
