"""The per-version runner's reading of COMFYUI_PATHS and of pytest's JUnit results (no ComfyUI needed)."""
import os
import sys

import run_versions


def test_comfyui_paths_name_each_checkout_with_its_python_or_this_one():
    environ = {"COMFYUI_PATHS": os.pathsep.join(["/opt/old=/opt/venv-old/bin/python", "/opt/new", ""]),
               "COMFYUI_PATH": "/ignored"}
    assert run_versions.checkouts(environ) == [(os.path.abspath("/opt/old"), "/opt/venv-old/bin/python"),
                                               (os.path.abspath("/opt/new"), sys.executable)]
    assert run_versions.checkouts({"COMFYUI_PATH": "/opt/one"}) == [(os.path.abspath("/opt/one"), sys.executable)]
    assert run_versions.checkouts({}) == []


def test_outcomes_name_every_test_with_its_result(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.integration.test_a" name="test_ok"/>'
        '<testcase classname="tests.integration.test_a" name="test_bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.integration.test_b" name="test_broken"><error message="y"/></testcase>'
        '<testcase classname="tests.integration.test_b" name="test_off"><skipped message="z"/></testcase>'
        '</testsuite></testsuites>', encoding="utf-8")
    assert run_versions.outcomes(str(junit)) == {
        "tests.integration.test_a::test_ok": "passed", "tests.integration.test_a::test_bad": "failed",
        "tests.integration.test_b::test_broken": "error", "tests.integration.test_b::test_off": "skipped"}


def test_the_version_is_read_from_the_checkout(tmp_path):
    (tmp_path / "comfyui_version.py").write_text('__version__ = "0.8.0"\n', encoding="utf-8")
    assert run_versions.comfyui_version(str(tmp_path)) == "0.8.0"
    assert run_versions.comfyui_version(str(tmp_path / "ComfyUI-old")) == "ComfyUI-old"
