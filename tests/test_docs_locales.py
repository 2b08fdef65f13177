"""Help pages, translations and the template-browser files stay in step with the node schemas.

What the ComfyUI frontend (comfyui-frontend-package 1.27.10, the one ComfyUI 0.3.64 pins) reads:
- help page: /extensions/<pack>/docs/<NodeId>/<locale>.md, falling back to docs/<NodeId>.md
  (src/services/nodeHelpService.ts), i.e. web/docs/<NodeId>.md and web/docs/<NodeId>/ja.md here;
- translations: locales/<lang>/nodeDefs.json, merged into GET /i18n (app/custom_node_manager.py),
  looked up as nodeDefs.<NodeId>.display_name / .description / .inputs.<input>.name|tooltip /
  .outputs.<output index>.name|tooltip (src/services/litegraphService.ts, NodeTooltip.vue),
  compiled as vue-i18n 9 messages, where { } @ | are syntax;
- templates: every example_workflows/*.json is a template named by its file name, with
  <name>.jpg as its thumbnail (app/custom_node_manager.py, workflowTemplatesStore.ts).

The schemas are read from the node modules' source with `ast` (no ComfyUI needed). With
COMFYUI_PATH set, a separate process also builds the real schemas and checks the source reading
agrees with them.
"""
import ast
import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODES_DIR = os.path.join(REPO, "nodes")
DOCS_DIR = os.path.join(REPO, "web", "docs")
WORKFLOWS_DIR = os.path.join(REPO, "example_workflows")
LANGUAGES = ("en", "ja")
# vue-i18n 9 message syntax: a literal one of these breaks or changes the message.
I18N_SYNTAX = re.compile(r"[{}@|]")
JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")


def _text(node):
    """The value of a string literal (implicitly joined pieces included), else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _keyword(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _schema_call(function):
    for node in ast.walk(function):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Schema":
            return node
    return None


def _input_builders():
    """{function name: its returned list of sockets} for module-level functions in nodes/ that
    return a list literal (shared inputs such as `batch_inputs()`), so `*batch_inputs()` expands."""
    builders = {}
    for filename in sorted(os.listdir(NODES_DIR)):
        if filename.endswith(".py"):
            with open(os.path.join(NODES_DIR, filename), encoding="utf-8") as f:
                tree = ast.parse(f.read(), filename)
            for function in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
                returned = [n.value for n in ast.walk(function) if isinstance(n, ast.Return)]
                if len(returned) == 1 and isinstance(returned[0], ast.List):
                    builders[function.name] = returned[0].elts
    return builders


def _expanded(elements, builders):
    for element in elements:
        if isinstance(element, ast.Starred) and isinstance(element.value, ast.Call) \
                and isinstance(element.value.func, ast.Name) and element.value.func.id in builders:
            yield from _expanded(builders[element.value.func.id], builders)
        else:
            yield element


def _socket(call):
    """(name, tooltip) of an `X.Input("name", ...)` or `X.Output(display_name="name", ...)` call."""
    assert isinstance(call, ast.Call), f"line {call.lineno}: write each socket as an X.Input(...)/X.Output(...) call"
    name = _text(call.args[0]) if call.args else None
    if name is None:
        name = _text(_keyword(call, "display_name")) or _text(_keyword(call, "id"))
    tooltip = _keyword(call, "tooltip")
    return name, None if tooltip is None else _text(tooltip)


def schemas_from_source():
    """{node_id: {display_name, description, inputs: [(name, tooltip)], outputs: [(name, tooltip)]}}
    for every class in nodes/ with a define_schema."""
    found = {}
    builders = _input_builders()
    for filename in sorted(os.listdir(NODES_DIR)):
        if not filename.endswith(".py"):
            continue
        with open(os.path.join(NODES_DIR, filename), encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename)
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            define = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "define_schema"),
                          None)
            schema = define and _schema_call(define)
            if schema is None:
                continue
            node_id = _text(_keyword(schema, "node_id"))
            assert node_id, f"{filename}:{cls.name}: node_id is not a string literal"
            sockets = {}
            for kind in ("inputs", "outputs"):
                listed = _keyword(schema, kind)
                assert listed is None or isinstance(listed, ast.List), \
                    f"{filename}:{cls.name}: write {kind}=[...] as a list literal so the docs can be checked"
                elements = listed.elts if listed is not None else []
                sockets[kind] = [_socket(c) for c in _expanded(elements, builders)]
            found[node_id] = {
                "display_name": _text(_keyword(schema, "display_name")),
                "description": _text(_keyword(schema, "description")),
                "inputs": sockets["inputs"],
                "outputs": sockets["outputs"],
                "file": filename,
            }
    return found


SCHEMAS = schemas_from_source()
NODE_IDS = sorted(SCHEMAS)


def load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def node_defs(language):
    return load_json(os.path.join(REPO, "locales", language, "nodeDefs.json"))


def workflow_names():
    return sorted(os.path.splitext(n)[0] for n in os.listdir(WORKFLOWS_DIR) if n.endswith(".json"))


def all_strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from all_strings(item)


def test_source_reading_finds_the_pack_nodes_with_inputs_and_outputs():
    for node_id in ("LoadDataset", "RegImages", "LoRATrain", "HypernetTrain", "ApplyHypernetwork",
                    "MergeLoRAToCkpt"):
        assert node_id in SCHEMAS
    for node_id, schema in SCHEMAS.items():
        assert schema["inputs"] and schema["outputs"], node_id
        assert all(name for name, _ in schema["inputs"] + schema["outputs"]), node_id


@pytest.mark.parametrize("language", LANGUAGES)
def test_node_defs_cover_every_node_input_and_output_and_nothing_else(language):
    defs = node_defs(language)
    assert sorted(defs) == NODE_IDS, f"locales/{language}/nodeDefs.json: node ids differ from nodes/"
    for node_id, schema in SCHEMAS.items():
        entry = defs[node_id]
        where = f"locales/{language}/nodeDefs.json {node_id}"
        assert set(entry) == {"display_name", "description", "inputs", "outputs"}, where
        assert entry["display_name"].strip() and entry["description"].strip(), where
        assert list(entry["inputs"]) == [name for name, _ in schema["inputs"]], f"{where}: inputs"
        assert list(entry["outputs"]) == [str(i) for i in range(len(schema["outputs"]))], f"{where}: outputs"
        for socket in list(entry["inputs"].values()) + list(entry["outputs"].values()):
            assert set(socket) == {"name", "tooltip"}, where
            assert socket["name"].strip() and socket["tooltip"].strip(), where


@pytest.mark.parametrize("language", LANGUAGES)
def test_node_defs_strings_are_plain_text_for_vue_i18n(language):
    bad = [s for s in all_strings(node_defs(language)) if I18N_SYNTAX.search(s)]
    assert not bad, f"{{ }} @ | are vue-i18n syntax; reword: {bad[:3]}"


def test_english_node_defs_repeat_the_schema_text():
    # The English entry replaces the schema's text in the editor, so it must not drift from it.
    # Descriptions may add the guides' recipe after the schema's own text.
    defs = node_defs("en")
    for node_id, schema in SCHEMAS.items():
        entry = defs[node_id]
        assert entry["display_name"] == schema["display_name"], node_id
        if schema["description"] is not None:
            assert entry["description"].startswith(schema["description"]), node_id
        for name, tooltip in schema["inputs"]:
            assert entry["inputs"][name]["name"] == name, f"{node_id}.{name}"
            if tooltip is not None:
                assert entry["inputs"][name]["tooltip"] == tooltip, f"{node_id}.{name}"
        for index, (name, tooltip) in enumerate(schema["outputs"]):
            assert entry["outputs"][str(index)]["name"] == name, f"{node_id} output {index}"
            if tooltip is not None:
                assert entry["outputs"][str(index)]["tooltip"] == tooltip, f"{node_id} output {index}"


def test_japanese_node_defs_are_in_japanese():
    defs = node_defs("ja")
    for node_id in NODE_IDS:
        entry = defs[node_id]
        assert JAPANESE.search(entry["description"]), node_id
        for name, socket in entry["inputs"].items():
            assert JAPANESE.search(socket["tooltip"]), f"{node_id}.{name}"


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_every_node_has_english_and_japanese_help_pages_naming_each_input_and_output(node_id):
    pages = {"en": os.path.join(DOCS_DIR, f"{node_id}.md"), "ja": os.path.join(DOCS_DIR, node_id, "ja.md")}
    schema = SCHEMAS[node_id]
    for language, path in pages.items():
        assert os.path.isfile(path), f"missing help page {os.path.relpath(path, REPO)}"
        with open(path, encoding="utf-8") as f:
            page = f.read()
        where = os.path.relpath(path, REPO)
        assert page.startswith("# "), f"{where}: starts with a title"
        for name, _ in schema["inputs"] + schema["outputs"]:
            assert f"`{name}`" in page, f"{where} does not mention `{name}`"
        if language == "ja":
            assert len(JAPANESE.findall(page)) > 200, f"{where} is not in Japanese"


def test_help_pages_exist_only_for_existing_nodes():
    stale = []
    for entry in os.listdir(DOCS_DIR):
        node_id = entry[:-3] if entry.endswith(".md") else entry
        if node_id not in SCHEMAS:
            stale.append(entry)
        elif os.path.isdir(os.path.join(DOCS_DIR, entry)):
            stale += [f"{entry}/{n}" for n in os.listdir(os.path.join(DOCS_DIR, entry)) if n != "ja.md"]
    assert not stale, f"help pages for no node: {stale}"


def test_every_json_in_example_workflows_is_a_workflow():
    # ComfyUI lists every *.json in example_workflows/ as a template card titled with its file name
    # (the frontend reads no index of titles for custom nodes), so each must be a workflow: an
    # index or notes file would show as a stray card.
    for name in workflow_names():
        workflow = load_json(os.path.join(WORKFLOWS_DIR, f"{name}.json"))
        assert workflow["nodes"] and "links" in workflow, name


@pytest.mark.parametrize("name", workflow_names())
def test_every_template_parses_and_has_a_jpeg_thumbnail(name):
    load_json(os.path.join(WORKFLOWS_DIR, f"{name}.json"))
    path = os.path.join(WORKFLOWS_DIR, f"{name}.jpg")
    assert os.path.isfile(path), f"missing thumbnail example_workflows/{name}.jpg"
    with Image.open(path) as image:
        assert image.format == "JPEG"
        assert min(image.size) >= 256, image.size  # the browser shows it in a 256 x 256 box


def test_source_reading_matches_the_real_schemas():
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        print("COMFYUI_PATH is not set: the schemas were read from source only")
        pytest.skip("COMFYUI_PATH is not set")
    # A separate process: importing ComfyUI modules here would change how later tests start it.
    script = (
        "import importlib, importlib.util, json, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "spec = importlib.util.spec_from_file_location('docs_check_pack', sys.argv[2] + '/__init__.py',\n"
        "    submodule_search_locations=[sys.argv[2]])\n"
        "pack = importlib.util.module_from_spec(spec); sys.modules['docs_check_pack'] = pack\n"
        "spec.loader.exec_module(pack)\n"
        "nodes = importlib.import_module('docs_check_pack.nodes')\n"
        "out = {}\n"
        "for cls in nodes.NODES:\n"
        "    s = cls.define_schema()\n"
        "    out[s.node_id] = {'display_name': s.display_name, 'description': s.description,\n"
        "        'inputs': [[i.id, i.tooltip] for i in s.inputs],\n"
        "        'outputs': [[o.display_name, o.tooltip] for o in s.outputs]}\n"
        "print(json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-c", script, comfy_path, REPO], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    real = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(real) == NODE_IDS, "nodes/__init__.py registers other nodes than nodes/ defines"
    for node_id, schema in real.items():
        source = SCHEMAS[node_id]
        for key in ("display_name", "description"):
            assert source[key] in (None, schema[key]), f"{node_id} {key}"
        for kind in ("inputs", "outputs"):
            assert [name for name, _ in schema[kind]] == [name for name, _ in source[kind]], f"{node_id} {kind}"
            for (name, tooltip), (_, read) in zip(schema[kind], source[kind]):
                assert read in (None, tooltip), f"{node_id}.{name} tooltip"
