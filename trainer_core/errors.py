"""Errors the user can act on: each names the field or file and says what to change."""


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
