"""Pieces both benchmarks use: the full-size fixture, the memory plan's estimate, a busy core.

Standard library only at import time, so ComfyUI worker processes can import it before ComfyUI.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTEGRATION = os.path.join(REPO, "tests", "integration")
SAMPLES = os.path.join(REPO, "sample_dataset")
# The trainer logs this line once, before the first step (trainer_core/train.py's memory plan).
MEMORY_PLAN = re.compile(r"memory plan: estimated peak (\d+(?:\.\d+)?) MiB")
# kohya sd-scripts on the same job, from issue 17 (same checkpoint, 512 px, rank 8, batch 1, fp32,
# gradient checkpointing, --sdpa, cached latents, UNet only; one run on a quiet 2-core CPU).
KOHYA_SECONDS_PER_STEP = 20.1
KOHYA_PEAK_GB = 7.3


def full_size_checkpoint() -> str:
    """The random full-size SD1.5 checkpoint (tests/integration/full_size_sd15.py), written on
    first use: at $SD15_FULL_SIZE_CHECKPOINT if set, else in the system's temp folder."""
    sys.path.insert(0, INTEGRATION)
    from full_size_sd15 import cached_full_size_sd15
    return cached_full_size_sd15()


def sample_subset(folder: str, count: int) -> str:
    """The first `count` sample pictures (by name) with their caption files, copied to `folder`."""
    os.makedirs(folder, exist_ok=True)
    pictures = sorted(name for name in os.listdir(SAMPLES) if name.lower().endswith(".png"))[:count]
    for picture in pictures:
        stem = os.path.splitext(picture)[0]
        for name in (picture, stem + ".txt"):
            if os.path.exists(os.path.join(SAMPLES, name)):
                shutil.copy(os.path.join(SAMPLES, name), os.path.join(folder, name))
    return folder


class MemoryPlanCatcher(logging.Handler):
    """Keeps the estimate of the trainer's `memory plan: estimated peak <N> MiB ...` log line.

    The trainer's loggers are named `trainer_core.*` (in ComfyUI: `<pack package>.trainer_core.*`);
    they are set to INFO so the line is emitted whatever the root logger's level."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.estimate_mb = None
        self.line = ""
        logging.getLogger().addHandler(self)

    def enable(self) -> dict:
        """Call after the trainer's modules are imported (their loggers exist then). Returns the
        levels it changed ({logger: previous level})."""
        names = {"trainer_core"} | {name[:name.index("trainer_core") + len("trainer_core")]
                                    for name in logging.root.manager.loggerDict if "trainer_core" in name}
        changed = {}
        for name in names:
            logger = logging.getLogger(name)
            if logger.getEffectiveLevel() > logging.INFO:
                changed[logger] = logger.level
                logger.setLevel(logging.INFO)
        return changed

    def emit(self, record) -> None:
        if "trainer_core" not in record.name:
            return
        message = record.getMessage()
        match = MEMORY_PLAN.search(message)
        if match and self.estimate_mb is None:
            self.estimate_mb, self.line = float(match.group(1)), message


def estimate_text(estimate_mb, measured_mb, measured_label) -> str:
    if estimate_mb is None:
        return "estimate n/a (no memory plan line logged)"
    if not measured_mb:
        return f"estimate {estimate_mb:.0f} MiB"
    return (f"estimate {estimate_mb:.0f} MiB vs {measured_label} {measured_mb:.0f} MiB "
            f"(estimate/measured {estimate_mb / measured_mb:.2f})")


@contextlib.contextmanager
def busy_core(enabled: bool = True):
    """One other busy process on the CPU while the block runs (`yes > /dev/null`)."""
    if not enabled:
        yield None
        return
    process = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)
    try:
        yield process
    finally:
        process.terminate()
        process.wait()


def status_mb(field) -> float:
    """A memory line of /proc/self/status (VmRSS: now, VmHWM: peak since start or last reset)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for row in f:
            if row.startswith(field + ":"):
                return int(row.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False
