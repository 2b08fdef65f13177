"""The benchmarks' reading of the trainer's memory plan line (benchmarks/bench_common.py)."""
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_common  # noqa: E402


def test_memory_plan_estimate_is_the_first_line_of_a_trainer_core_logger_even_below_the_root_level(monkeypatch):
    monkeypatch.setattr(logging.getLogger(), "level", logging.WARNING)
    # As ComfyUI names the pack's loggers: the pack's package path, then trainer_core.
    logger = logging.getLogger("custom_nodes.sd1_trainer.trainer_core.train")
    catcher = bench_common.MemoryPlanCatcher()
    changed = {}
    try:
        changed = catcher.enable()
        logging.getLogger("elsewhere").warning("memory plan: estimated peak 1 MiB, not the trainer's")
        logger.info("memory plan: estimated peak 4321.5 MiB (weights 3300, activations 900) on cpu")
        logger.info("memory plan: estimated peak 99 MiB, a later line")
    finally:
        logging.getLogger().removeHandler(catcher)
        for changed_logger, level in changed.items():
            changed_logger.setLevel(level)
    assert catcher.estimate_mb == 4321.5
    assert catcher.line.startswith("memory plan: estimated peak 4321.5 MiB")


def test_estimate_text_says_n_a_without_a_memory_plan_line():
    assert bench_common.estimate_text(None, 5000, "peak RSS") == "estimate n/a (no memory plan line logged)"
    assert "estimate/measured 0.80" in bench_common.estimate_text(4000, 5000, "peak RSS")
