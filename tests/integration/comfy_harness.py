"""A real ComfyUI inside the test process, with this pack loaded the way ComfyUI loads it.

ComfyUI runs on the CPU, with its model, input, output and temp folders in a temporary
folder, and executes API prompts through its own PromptExecutor (the object the server's
queue worker uses). A stand-in server object records what the server would send.
"""
import asyncio
import json
import logging
import os
import sys
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKFLOW = os.path.join(REPO, "example_workflows", "lora_train_then_generate.json")
COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
PACK_NAME = "sd1_trainer"
CHECKPOINT_NAME = "tiny_sd1.safetensors"
OUR_NODES = ("LoadDataset", "RegImages", "LoRATrain")
# The core nodes the tests compare against (LoraModelLoader, HypernetworkLoader, CheckpointSave),
# besides those in ComfyUI's nodes.py. Loading all of comfy_extras would take much longer.
CORE_EXTRAS = ("nodes_train.py", "nodes_hypernetwork.py", "nodes_model_merging.py")


class FakeServer:
    """What PromptExecutor needs from ComfyUI's server: messages are kept, not sent."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


class Run:
    """One executed prompt: its messages and each node's outputs (kept: the executor's cache
    forgets nodes that are not in its next prompt)."""

    def __init__(self, executor, prompt, messages, seconds):
        self.executor = executor
        self.messages = messages
        self.seconds = seconds
        self.outputs = {node_id: _node_outputs(executor.caches.outputs.get(node_id)) for node_id in prompt}

    @property
    def events(self):
        return [event for event, _ in self.messages]

    def message(self, event):
        return next((data for name, data in self.messages if name == event), None)

    def assert_succeeded(self):
        """The prompt ran to the end; a node's error is shown with its traceback."""
        error = self.message("execution_error")
        assert error is None, f"{error['exception_message']}\n{''.join(error['traceback'])}"
        assert "execution_success" in self.events

    def output(self, node_id, index=0):
        return self.outputs[str(node_id)][index][0]

    def cached_nodes(self):
        return set(self.message("execution_cached")["nodes"])


class ComfyUI:
    def __init__(self, root):
        self.root = root
        self.folders = {name: os.path.join(root, name) for name in
                        ("checkpoints", "loras", "hypernetworks", "embeddings", "input", "output", "temp",
                         "custom_nodes")}
        for path in self.folders.values():
            os.makedirs(path, exist_ok=True)
        self.progress = []          # (node_id, value, total, has_preview) per progress-bar update
        self.on_progress = None     # a test's hook, called on every update before the interrupt check
        self.pack_loaded = False
        self.pack_load_log = []
        self._start()
        self.executor = self.new_executor()

    def _start(self):
        if COMFYUI_PATH not in sys.path:
            sys.path.insert(0, COMFYUI_PATH)
        loaded = sys.modules.get("nodes")
        if loaded is not None and not os.path.abspath(getattr(loaded, "__file__", "")).startswith(
                os.path.abspath(COMFYUI_PATH)):
            raise RuntimeError(f"a module named 'nodes' was imported from {loaded.__file__} before ComfyUI's")
        from comfy.cli_args import args
        args.cpu = True  # read when comfy.model_management is first imported
        import folder_paths
        for name in ("checkpoints", "loras", "hypernetworks", "embeddings"):
            folder_paths.folder_names_and_paths[name] = ([self.folders[name]], folder_paths.supported_pt_extensions)
        folder_paths.set_input_directory(self.folders["input"])
        folder_paths.set_output_directory(self.folders["output"])
        folder_paths.set_temp_directory(self.folders["temp"])
        import comfy.utils
        import nodes
        comfy.utils.set_progress_bar_global_hook(self._progress_hook)
        for name in CORE_EXTRAS:
            extras = os.path.join(COMFYUI_PATH, "comfy_extras", name)
            assert asyncio.run(nodes.load_custom_node(extras, module_parent="comfy_extras")), name
        self._load_pack()

    def _load_pack(self):
        import nodes
        link = os.path.join(self.folders["custom_nodes"], PACK_NAME)
        os.symlink(REPO, link)
        records = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = records.append
        root = logging.getLogger()
        root.addHandler(handler)
        try:
            self.pack_loaded = asyncio.run(nodes.load_custom_node(link, module_parent="custom_nodes"))
        finally:
            root.removeHandler(handler)
        self.pack_load_log = [record.getMessage() for record in records]

    def _progress_hook(self, value, total, preview, prompt_id=None, node_id=None):
        # Mirrors the hook ComfyUI's server installs (main.hijack_progress): it raises on Cancel.
        import comfy.model_management
        from comfy_execution.progress import get_progress_state
        from comfy_execution.utils import get_executing_context
        context = get_executing_context()
        if node_id is None and context is not None:
            node_id = context.node_id
        self.progress.append((node_id, value, total, preview is not None))
        if self.on_progress is not None:
            self.on_progress(node_id, value, total)
        comfy.model_management.throw_exception_if_processing_interrupted()
        get_progress_state().update_progress(node_id, value, total, preview)

    def new_executor(self):
        """A fresh executor: an empty in-memory cache, as after restarting ComfyUI."""
        import inspect

        import execution
        options = {"cache_type": execution.CacheType.CLASSIC}
        if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
            # Newer ComfyUI reads its cache limits from cache_args even for the classic cache
            # (main.py passes lru, ram and ram_inactive); 0 leaves them off, as --cache-classic does.
            options["cache_args"] = {"lru": 0, "ram": 0, "ram_inactive": 0}
        return execution.PromptExecutor(FakeServer(), **options)

    def widget_defaults(self, class_type) -> dict:
        """Every input of a node that has a default, at that default."""
        definitions = self.node_classes[class_type].INPUT_TYPES()
        return {name: spec[1]["default"] for section in ("required", "optional")
                for name, spec in definitions.get(section, {}).items() if len(spec) > 1 and "default" in spec[1]}

    @property
    def node_classes(self):
        import nodes
        return nodes.NODE_CLASS_MAPPINGS

    def validate(self, prompt):
        """ComfyUI's check before queueing: (valid, error, output node ids, errors per node)."""
        return self._validate(_as_sent(prompt))

    def _validate(self, prompt):
        import execution
        return asyncio.run(execution.validate_prompt(uuid.uuid4().hex, prompt, None))

    def fingerprint(self, prompt, node_id):
        """What ComfyUI's cache compares to decide whether a node must run again."""
        import execution
        from comfy_execution.graph import DynamicPrompt
        dynamic_prompt = DynamicPrompt(_as_sent(prompt))
        cache = execution.IsChangedCache(uuid.uuid4().hex, dynamic_prompt, self.executor.caches.outputs)
        return asyncio.run(cache.get(str(node_id)))

    def run(self, prompt, executor=None) -> Run:
        executor = executor or self.executor
        prompt = _as_sent(prompt)
        prompt_id = uuid.uuid4().hex
        # The server runs the prompt object it validated (validation normalises input values).
        valid, error, outputs, node_errors = self._validate(prompt)
        assert valid, f"prompt failed validation: {error} {json.dumps(node_errors, default=str)[:2000]}"
        executor.server.messages.clear()
        started = time.perf_counter()
        executor.execute(prompt, prompt_id, {"client_id": "tests"}, outputs)
        return Run(executor, prompt, list(executor.server.messages), time.perf_counter() - started)

    def example_prompt(self):
        from workflow_to_prompt import api_prompt
        with open(WORKFLOW, encoding="utf-8") as f:
            return api_prompt(json.load(f), self.node_classes)

    def pack_module(self, name):
        """A module of the pack as ComfyUI loaded it (its package name is the folder's path)."""
        import importlib
        package = os.path.join(self.folders["custom_nodes"], PACK_NAME).replace(".", "_x_")
        return importlib.import_module(f"{package}.{name}")

    def load_checkpoint(self, name):
        """(MODEL, CLIP, VAE) as Load Checkpoint makes them inside a prompt."""
        import nodes
        import torch
        with torch.inference_mode():
            return nodes.CheckpointLoaderSimple().load_checkpoint(name)[:3]

    def lora_files(self):
        return sorted(os.listdir(self.folders["loras"]))


def _node_outputs(entry):
    """A node's output lists from the output cache: newer ComfyUI caches a CacheEntry(ui, outputs)
    where older ComfyUI caches the outputs alone."""
    return getattr(entry, "outputs", entry)


def _as_sent(prompt):
    """A fresh copy, as the server parses each queued prompt from JSON: ComfyUI writes into
    the prompt it runs (e.g. the nodes' fingerprints), which must not carry over to the next."""
    return json.loads(json.dumps(prompt))
