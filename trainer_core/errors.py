"""Errors the user can act on: each names the field or file and says what to change.

A message names an option with `name_of(name)`: the name the user sees on the surface they use.
The nodes show their input names (the default); the command line renders its flags by running
the trainer inside `names_as({...})`, so there is one message for both.
"""
from __future__ import annotations

import contextlib
import contextvars

_FIELD_NAMES: contextvars.ContextVar[dict] = contextvars.ContextVar("field_names", default={})


def name_of(name: str, node_name: str | None = None) -> str:
    """How the current surface names the option `name` (`node_name` where the node's input is
    called otherwise, e.g. RegImages' `folder` for the regularization folder)."""
    return _FIELD_NAMES.get().get(name, node_name or name)


@contextlib.contextmanager
def names_as(names: dict):
    """Inside the block, messages name each option in `names` by its value (e.g. a CLI flag)."""
    token = _FIELD_NAMES.set(dict(names))
    try:
        yield
    finally:
        _FIELD_NAMES.reset(token)


class TrainerInputError(ValueError):
    """Bad input from the user (an option, a file, a folder). The message says how to fix it."""


class TrainingStopped(RuntimeError):
    """Training stopped early; the last good save (if any) is on disk."""

    def __init__(self, message, last_save=None, step=0):
        super().__init__(message)
        self.last_save = last_save
        self.step = step


class TrainingCancelled(TrainingStopped):
    """The user cancelled (ComfyUI's Cancel button, Ctrl-C in the CLI)."""
