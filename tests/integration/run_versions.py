"""Runs the integration tier once per ComfyUI checkout and says which tests ran on which version.

Each checkout needs its own Python (its own requirements, frontend included), and a ComfyUI
cannot be imported twice in one process, so every checkout gets a pytest process of its own:

    COMFYUI_PATHS="/opt/ComfyUI-0.3.64=/opt/venv-0.3.64/bin/python:/opt/ComfyUI=/opt/venv/bin/python" \
        python tests/integration/run_versions.py [pytest arguments]

Entries are separated by the platform's path separator (":"; ";" on Windows); each is a
checkout, optionally followed by "=" and the Python to run it with (default: this Python).
Without COMFYUI_PATHS, COMFYUI_PATH is the one checkout. The pytest arguments default to the
integration tier (tests/integration); pass e.g. `tests/integration/test_browser.py` or `-k merge`.

Per checkout it writes $TEST_ARTIFACTS/integration-<version>.xml (JUnit: every test and its
outcome) and prints the counts; the exit status is non-zero when any checkout failed.
"""
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_ARGS = ["tests/integration"]


def checkouts(environ=os.environ) -> list:
    """[(checkout, python)] from COMFYUI_PATHS, else COMFYUI_PATH."""
    entries = environ.get("COMFYUI_PATHS") or environ.get("COMFYUI_PATH", "")
    found = []
    for entry in filter(None, (e.strip() for e in entries.split(os.pathsep))):
        checkout, _, python = entry.partition("=")
        found.append((os.path.abspath(checkout), python or sys.executable))
    return found


def comfyui_version(checkout: str) -> str:
    """The version comfyui_version.py states, or the folder's name."""
    try:
        with open(os.path.join(checkout, "comfyui_version.py"), encoding="utf-8") as f:
            return re.search(r'__version__\s*=\s*"([^"]+)"', f.read()).group(1)
    except (OSError, AttributeError):
        return os.path.basename(checkout)


def outcomes(junit_path: str) -> dict:
    """{test id: passed / failed / error / skipped} from a JUnit file."""
    results = {}
    for case in ElementTree.parse(junit_path).iter("testcase"):
        outcome = "passed"
        for child, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            if case.find(child) is not None:
                outcome = name
        results[f"{case.get('classname')}::{case.get('name')}"] = outcome
    return results


def run(checkout: str, python: str, pytest_args: list, artifacts: str) -> tuple:
    version = comfyui_version(checkout)
    junit = os.path.join(artifacts, f"integration-{version}.xml")
    print(f"== ComfyUI {version} at {checkout} with {python}", flush=True)
    env = {**os.environ, "COMFYUI_PATH": checkout, "TEST_ARTIFACTS": artifacts}
    env.pop("COMFYUI_PATHS", None)
    status = subprocess.run([python, "-m", "pytest", "-q", f"--junitxml={junit}", *pytest_args],
                            cwd=REPO, env=env).returncode
    results = outcomes(junit) if os.path.exists(junit) else {}
    return version, status, results


def main(argv=None) -> int:
    pytest_args = list(sys.argv[1:] if argv is None else argv) or DEFAULT_ARGS
    targets = checkouts()
    if not targets:
        print("set COMFYUI_PATHS (or COMFYUI_PATH) to the ComfyUI checkouts to test; see this file's docstring",
              file=sys.stderr)
        return 2
    artifacts = os.environ.get("TEST_ARTIFACTS") or os.path.join(REPO, "test-artifacts")
    os.makedirs(artifacts, exist_ok=True)
    summary = [run(checkout, python, pytest_args, artifacts) for checkout, python in targets]
    print("\nComfyUI version: passed / failed / error / skipped (every test's outcome: "
          f"{artifacts}/integration-<version>.xml)")
    for version, status, results in summary:
        counts = {name: sum(1 for o in results.values() if o == name)
                  for name in ("passed", "failed", "error", "skipped")}
        print(f"  {version}: {counts['passed']} / {counts['failed']} / {counts['error']} / {counts['skipped']}"
              f"  (pytest exit status {status})")
    return 0 if all(status == 0 for _, status, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
