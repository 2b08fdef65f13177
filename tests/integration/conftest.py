"""Fixtures for the integration tests: a real ComfyUI (see comfy_harness.py) and a tiny checkpoint.

Set COMFYUI_PATH to a ComfyUI checkout whose requirements are installed in this Python.
Without it every integration test is skipped and the reason is printed.
"""
import os
import time

import pytest

from comfy_harness import CHECKPOINT_NAME, COMFYUI_PATH, ComfyUI

SKIP_REASON = (
    "COMFYUI_PATH is not set: the integration tests run the nodes inside a real ComfyUI. Point "
    "COMFYUI_PATH at a ComfyUI checkout whose requirements are installed in this Python to run them.")

_reason_printed = False


def _say(config, text):
    """A line on pytest's terminal, shown even when output is captured."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(text)


def _skip_without_comfyui(config):
    global _reason_printed
    if not _reason_printed:
        _say(config, f"integration tests skipped: {SKIP_REASON}")
        _reason_printed = True
    pytest.skip(SKIP_REASON)


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory, pytestconfig):
    if not COMFYUI_PATH:
        _skip_without_comfyui(pytestconfig)
    import torch
    torch.set_num_threads(1)
    return ComfyUI(str(tmp_path_factory.mktemp("comfyui")))


@pytest.fixture(scope="session")
def tiny_checkpoint(comfyui, pytestconfig):
    """The tiny SD1 checkpoint in ComfyUI's checkpoints folder, written once per session."""
    from tiny_sd1_checkpoint import write_tiny_sd1_checkpoint
    path = os.path.join(comfyui.folders["checkpoints"], CHECKPOINT_NAME)
    started = time.perf_counter()
    write_tiny_sd1_checkpoint(path, seed=0)
    _say(pytestconfig, f"tiny SD1 checkpoint: {os.path.getsize(path) / 2**20:.0f} MiB, written in "
                       f"{time.perf_counter() - started:.1f} s")
    return CHECKPOINT_NAME


@pytest.fixture(scope="session")
def full_size_checkpoint(comfyui, tmp_path_factory, pytestconfig):
    """The random full-size SD1.5 checkpoint (full_size_sd15.py) in ComfyUI's checkpoints folder.

    Written once per session into a temp folder, or taken from $SD15_FULL_SIZE_CHECKPOINT (written
    there on first use), so that repeated sessions and the benchmarks share one copy."""
    from full_size_sd15 import FILE_NAME, cached_full_size_sd15
    started = time.perf_counter()
    path = cached_full_size_sd15(str(tmp_path_factory.mktemp("full_size_sd15")))
    _say(pytestconfig, f"full-size SD1.5 checkpoint: {path}, {os.path.getsize(path) / 2**30:.2f} GiB, ready in "
                       f"{time.perf_counter() - started:.1f} s")
    os.symlink(path, os.path.join(comfyui.folders["checkpoints"], FILE_NAME))
    return FILE_NAME
