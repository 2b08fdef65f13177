"""A real ComfyUI server in a subprocess and a headless Chromium on its page, for test_browser.py.

The server runs from COMFYUI_PATH with `--cpu` on 127.0.0.1 and a free port; every folder it
reads or writes (models, custom_nodes with this pack linked in, input, output, temp, user and
its database) lies in a temporary base directory. The browser is the system's Chromium driven
by Playwright; every request that is not for that server is aborted, so nothing leaves the
loopback address.
"""
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PACK_NAME = "sd1_trainer"
CHECKPOINT_NAME = "tiny_sd1.safetensors"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic"]
# A user who has seen the first-run template dialog once (the page opens on an empty canvas)
# and closed the minimap, which would cover part of the screenshots.
USER_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}
SERVER_START_SECONDS = 180


def why_not_runnable() -> str:
    """Why the browser test cannot run here, or "" when it can."""
    if not os.environ.get("COMFYUI_PATH"):
        return ("COMFYUI_PATH is not set: the browser test starts a real ComfyUI server. Point "
                "COMFYUI_PATH at a ComfyUI checkout whose requirements are installed in this Python.")
    if importlib.util.find_spec("playwright") is None:
        return "the Python package 'playwright' is not installed (pip install playwright)."
    if not chromium_path():
        return ("Chromium was not found (set CHROMIUM_PATH, or install Debian's 'chromium' package). "
                "The test uses the system browser, not one downloaded by 'playwright install'.")
    return ""


def say(config, text: str) -> None:
    """A line on pytest's terminal, shown even when output is captured."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(text)


def chromium_path() -> str:
    candidates = [os.environ.get("CHROMIUM_PATH", "")] + list(CHROMIUM_CANDIDATES)
    candidates.append(shutil.which("chromium") or "")
    return next((path for path in candidates if path and os.access(path, os.X_OK)), "")


def artifacts_folder() -> str:
    folder = os.environ.get("TEST_ARTIFACTS") or os.path.join(REPO, "test-artifacts")
    os.makedirs(folder, exist_ok=True)
    return folder


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tiny_checkpoint(path: str) -> None:
    """The tiny SD1 checkpoint, written in a child process: importing ComfyUI's model code
    here would fix its device choice for the in-process integration tests that run later."""
    code = ("import sys; sys.path[:0] = sys.argv[1:3]\n"
            "from comfy.cli_args import args; args.cpu = True\n"
            "from tiny_sd1_checkpoint import write_tiny_sd1_checkpoint\n"
            "write_tiny_sd1_checkpoint(sys.argv[3], seed=0)\n")
    subprocess.run([sys.executable, "-c", code, os.environ["COMFYUI_PATH"], HERE, path],
                   check=True, env=_child_env(), timeout=300)


def no_partner_nodes_option() -> str:
    """The option that keeps ComfyUI's paid API ("partner") nodes unloaded: --disable-partner-nodes
    in newer ComfyUI, where --disable-api-nodes became an alias of --offline; --disable-api-nodes
    before."""
    with open(os.path.join(os.environ["COMFYUI_PATH"], "comfy", "cli_args.py"), encoding="utf-8") as f:
        options = f.read()
    return "--disable-partner-nodes" if '"--disable-partner-nodes"' in options else "--disable-api-nodes"


def _child_env() -> dict:
    # No __pycache__ folders written into the ComfyUI checkout.
    return {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


class ComfyServer:
    """`python main.py` of the ComfyUI at COMFYUI_PATH, in a base directory of its own."""

    def __init__(self, base: str, log_path: str):
        self.base = base
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None
        self._log = None
        for name in ("models/checkpoints", "models/loras", "models/hypernetworks", "input", "output",
                     "temp", "user/default/workflows", "custom_nodes"):
            os.makedirs(os.path.join(base, name), exist_ok=True)
        os.symlink(REPO, os.path.join(base, "custom_nodes", PACK_NAME))
        with open(os.path.join(base, "user", "default", "comfy.settings.json"), "w", encoding="utf-8") as f:
            json.dump(USER_SETTINGS, f)

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.base, "models", "checkpoints")

    def folder(self, name: str) -> str:
        return os.path.join(self.base, name)

    def start(self) -> None:
        main = os.path.join(os.environ["COMFYUI_PATH"], "main.py")
        database = "sqlite:///" + os.path.join(self.base, "user", "comfyui.db")
        command = [sys.executable, main, "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--base-directory", self.base, "--database-url", database,
                   "--disable-auto-launch", no_partner_nodes_option()]
        self._log = open(self.log_path, "w", encoding="utf-8")
        self.process = subprocess.Popen(command, cwd=self.base, env=_child_env(), stdout=self._log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + SERVER_START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer within {SERVER_START_SECONDS} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        if self._log is not None:
            self._log.close()

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read().decode("utf-8"))

    def log_tail(self, lines: int = 60) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])


def widget_names(node_info: dict) -> list:
    """The widgets the frontend builds for a node, in order, from its /object_info entry:
    every input of a widget type (combos are lists of options, or "COMBO"), required first."""
    names = []
    for group in ("required", "optional"):
        specs = node_info["input"].get(group, {})
        for name in node_info.get("input_order", {}).get(group, list(specs)):
            kind = specs[name][0]
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                names.append(name)
                if (specs[name][1:] or [{}])[0].get("control_after_generate"):
                    names.append("control_after_generate")
    return names


class Page:
    """The ComfyUI page in headless Chromium, with its console and refused requests recorded."""

    def __init__(self, playwright, server: ComfyServer):
        self.server = server
        self.browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        self.page = self.browser.new_page(viewport={"width": 1600, "height": 1000})
        self.console = []           # (kind, text) for console errors/warnings and page errors
        self.refused = []           # URLs not on the server, aborted
        self.page.route("**/*", self._only_the_server)
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda error: self.console.append(("pageerror", f"{error}\n{error.stack}")))

    def _only_the_server(self, route):
        url = route.request.url
        if url.startswith(self.server.url + "/") or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            self.refused.append(url)
            route.abort()

    def _on_console(self, message):
        if message.type in ("error", "warning"):
            location = message.location.get("url", "") if message.location else ""
            self.console.append((message.type, f"{message.text} [{location}]"))

    def open(self) -> None:
        self.page.goto(self.server.url + "/")
        self.page.wait_for_function("window.app && window.app.graph && window.LiteGraph && app.canvas",
                                    timeout=120_000)
        # Record the frontend's own list of missing node types after each graph load.
        self.page.evaluate("""() => { window.__missingNodeTypes = null;
            app.registerExtension({name: 'sd1_trainer.browser_test',
                afterConfigureGraph(missing) { window.__missingNodeTypes = missing.map(
                    m => typeof m === 'string' ? m : m.type); }}); }""")

    def evaluate(self, script, arg=None):
        return self.page.evaluate(script, arg)

    def screenshot(self, name: str) -> str:
        path = os.path.join(artifacts_folder(), name)
        self.page.screenshot(path=path)
        return path

    def visible_dialogs(self) -> list:
        return self.page.evaluate("""() => [...document.querySelectorAll('.p-dialog, .p-toast-message')]
            .filter(e => e.offsetParent !== null || getComputedStyle(e).position === 'fixed')
            .map(e => e.innerText.trim()).filter(Boolean)""")

    def close_dialogs(self) -> None:
        self.page.keyboard.press("Escape")

    def close(self) -> None:
        self.browser.close()
