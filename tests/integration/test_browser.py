"""What a ComfyUI user sees: the real server and its web frontend, in headless Chromium.

Starts ComfyUI (COMFYUI_PATH) as a subprocess on 127.0.0.1 with this pack in its custom_nodes
and the tiny SD1 checkpoint in its models, opens the page, loads every example workflow the way
the frontend does, and queues the LoRA workflow (shrunk for a CPU) with the Run button.
Screenshots go to $TEST_ARTIFACTS (default: test-artifacts/ in the repository).

Skipped, with the reason printed, without COMFYUI_PATH, the `playwright` package or Chromium.
"""
import glob
import json
import math
import os
import time

import pytest

import browser_support as support

WORKFLOWS = sorted(glob.glob(os.path.join(support.REPO, "example_workflows", "*.json")))
LORA_WORKFLOW = os.path.join(support.REPO, "example_workflows", "lora_train_then_generate.json")
RUN_SECONDS = 300
TRAINING_NODES = ("LoRATrain", "HypernetTrain")
# Small settings for a CPU, by widget name, whatever nodes the workflow holds. Enough training
# steps that the run lasts several seconds, so the live loss chart can be caught mid-training
# (the trainer sends one every 2 s), and one intermediate save for the step comparison.
TRAIN_STEPS = 8
SMALL_RUN = {"ckpt_name": support.CHECKPOINT_NAME, "resolution": 64, "width": 64, "height": 64,
             "blank_count": 2, "steps": 2, "save_every_steps": TRAIN_STEPS // 2}
SMALL_TRAINING = {"steps": TRAIN_STEPS}
PICTURE_NODES = ("PreviewImage", "SaveImage")


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, pytestconfig):
    """(server, page): ComfyUI serving this pack, and its page open in headless Chromium."""
    reason = support.why_not_runnable()
    if reason:
        support.say(pytestconfig, f"browser test skipped: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    base = str(tmp_path_factory.mktemp("comfyui_server"))
    server = support.ComfyServer(base, os.path.join(support.artifacts_folder(), "comfyui_server.log"))
    support.write_tiny_checkpoint(os.path.join(server.checkpoints, support.CHECKPOINT_NAME))
    server.start()
    try:
        with sync_playwright() as playwright:
            page = support.Page(playwright, server)
            try:
                page.open()
                yield server, page
            finally:
                page.close()
                support.say(pytestconfig, f"browser test: requests refused (not the local server): "
                                          f"{page.refused or 'none'}")
                firsts = sorted({f"{kind}: {text.splitlines()[0]}" for kind, text in page.console})
                support.say(pytestconfig, "browser console errors and warnings, all sources:\n  "
                            + "\n  ".join(firsts or ["none"]))
    finally:
        server.stop()


@pytest.fixture(scope="module")
def our_nodes(comfy):
    """/object_info of the pack's nodes, by node id."""
    server, _ = comfy
    info = server.get("/object_info")
    return {name: node for name, node in info.items()
            if node["python_module"].split(".")[-1] == support.PACK_NAME}


def load(page, workflow: dict) -> list:
    """Loads a workflow as the frontend does; returns the node types it reported missing."""
    page.evaluate("() => { window.__missingNodeTypes = null; }")
    # The example's checkpoint is a model the user picks; its download dialog is not ours to test.
    page.evaluate("w => app.loadGraphData(w, true, true, null, {showMissingModelsDialog: false})", workflow)
    page.page.wait_for_function("window.__missingNodeTypes !== null")
    return page.evaluate("window.__missingNodeTypes")


def fit_view(page):
    page.evaluate("app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    page.page.wait_for_timeout(500)


def pack_console_errors(page, start: int, our_nodes) -> list:
    """Console errors and warnings since `start` that come from the pack or name its nodes."""
    marks = [support.PACK_NAME, *our_nodes]
    return [entry for entry in page.console[start:] if any(mark in entry[1] for mark in marks)]


def rendered_widgets(page, node_types) -> dict:
    return {str(node_id): (node_type, names, values) for node_id, node_type, names, values in page.evaluate(
        """types => app.graph.nodes.filter(n => types.includes(n.type)).map(n =>
            [n.id, n.type, (n.widgets || []).map(w => w.name), (n.widgets || []).map(w => w.value)])""",
        list(node_types))}


def same_value(shown, saved) -> bool:
    if isinstance(saved, float) or isinstance(shown, float):
        return isinstance(shown, (int, float)) and math.isclose(shown, saved, rel_tol=1e-9, abs_tol=1e-12)
    return shown == saved


def widget_problems(workflow: dict, rendered: dict, our_nodes: dict) -> list:
    problems = []
    for node in workflow["nodes"]:
        if node["type"] not in our_nodes:
            continue
        node_type, names, values = rendered[str(node["id"])]
        expected = support.widget_names(our_nodes[node_type])
        if names != expected:
            problems.append(f"{node_type} #{node['id']}: widgets {names}, schema says {expected}")
        saved = node.get("widgets_values", [])
        if len(saved) != len(values) or not all(map(same_value, values, saved)):
            problems.append(f"{node_type} #{node['id']}: widget values {values}, JSON has {saved}")
    return problems


# The cards of this pack in the template browser: the frontend makes one per .json the server
# lists, titled with the file name (it reads no titles or descriptions for custom nodes).
CARDS = ["embedding_train_then_generate", "hypernet_train_then_generate", "lora_train_merge",
         "lora_train_then_generate"]


def test_template_browser_lists_the_example_workflows_and_opens_one(comfy):
    server, page = comfy
    assert sorted(server.get("/api/workflow_templates")[support.PACK_NAME]) == CARDS
    page.evaluate("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.page.get_by_text(support.PACK_NAME, exact=True).click()
    for name in CARDS:
        page.page.get_by_text(name, exact=True).first.wait_for(timeout=10_000)
    assert page.page.get_by_text("index", exact=True).count() == 0, "no stray index card"
    page.page.wait_for_timeout(1000)  # the thumbnails
    page.screenshot("template_browser.png")

    page.evaluate("() => { window.__missingNodeTypes = null; }")
    page.page.get_by_text("lora_train_then_generate", exact=True).first.click()
    page.page.wait_for_function("window.__missingNodeTypes !== null")
    assert page.evaluate("window.__missingNodeTypes") == []
    assert "LoRATrain" in page.evaluate("app.graph.nodes.map(n => n.type)")
    page.page.wait_for_timeout(500)
    page.screenshot("template_opened_lora_train_then_generate.png")
    # Only the checkpoint is reported: the example names SD1.5, which this server does not have.
    dialogs = page.visible_dialogs()
    assert all("Missing Models" in text and "v1-5-pruned-emaonly" in text for text in dialogs), dialogs
    page.close_dialogs()


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: os.path.splitext(os.path.basename(p))[0])
def test_example_workflow_loads_with_every_node_known_and_our_widgets_as_saved(comfy, our_nodes, path):
    _, page = comfy
    with open(path, encoding="utf-8") as f:
        workflow = json.load(f)
    console_start = len(page.console)
    types = {node["type"] for node in workflow["nodes"]}
    registered = page.evaluate("Object.keys(LiteGraph.registered_node_types)")
    assert types <= set(registered), f"unknown node types: {sorted(types - set(registered))}"

    missing = load(page, workflow)
    page.page.wait_for_timeout(500)  # drawn at the workflow's saved view, as a user opens it
    page.screenshot(f"{os.path.splitext(os.path.basename(path))[0]}_loaded.png")

    assert missing == [], f"the frontend reported missing node types {missing}"
    dialogs = page.visible_dialogs()
    assert dialogs == [], f"dialogs or toasts after loading: {dialogs}"
    rendered = rendered_widgets(page, our_nodes)
    assert {str(n["id"]) for n in workflow["nodes"] if n["type"] in our_nodes} == set(rendered)
    assert widget_problems(workflow, rendered, our_nodes) == []
    assert pack_console_errors(page, console_start, our_nodes) == []


def shrink_for_cpu(page):
    """Sets every widget named in SMALL_RUN (SMALL_TRAINING on training nodes), as a user would."""
    page.evaluate("""([small, training, trainers]) => {
        for (const node of app.graph.nodes) {
            for (const widget of node.widgets || []) {
                const values = trainers.includes(node.type) ? {...small, ...training} : small;
                if (widget.name in values) widget.value = values[widget.name];
            }
        }
        app.graph.setDirtyCanvas(true, true);
    }""", [SMALL_RUN, SMALL_TRAINING, list(TRAINING_NODES)])


def watch_run(page, train_id: str):
    """Records when each node starts, the training node's progress and the step at which each
    of its previews arrived."""
    page.evaluate("""id => {
        window.__training = {progress: null, previews: 0, previewStep: -1, timeline: [], steps: [], ended: false};
        for (const end of ['execution_error', 'execution_interrupted', 'execution_success'])
            app.api.addEventListener(end, () => { window.__training.ended = true; });
        const started = performance.now();
        app.api.addEventListener('executing', e => window.__training.timeline.push(
            [e.detail === null ? null : String(e.detail), Math.round(performance.now() - started) / 1000]));
        app.api.addEventListener('progress', e => {
            if (String(e.detail.node) !== id) return;
            window.__training.progress = e.detail;
            window.__training.steps.push([e.detail.value, Math.round(performance.now() - started) / 1000]); });
        app.api.addEventListener('b_preview_with_metadata', e => {
            if (String(e.detail.displayNodeId) !== id) return;
            window.__training.previews += 1;
            window.__training.previewStep = window.__training.progress ? window.__training.progress.value : 0;
        });
    }""", train_id)


def show_nodes(page, node_ids, zoom=0.9):
    """Pans and zooms the canvas so these nodes (titles included) fill the view."""
    page.evaluate("""([ids, zoom]) => {
        const nodes = ids.map(id => app.graph.getNodeById(Number(id)));
        const title = LiteGraph.NODE_TITLE_HEIGHT;
        const left = Math.min(...nodes.map(n => n.pos[0])), top = Math.min(...nodes.map(n => n.pos[1] - title));
        const right = Math.max(...nodes.map(n => n.pos[0] + n.size[0]));
        const bottom = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
        app.canvas.ds.fitToBounds([left, top, right - left, bottom - top], {zoom});
        app.canvas.setDirty(true, true);
    }""", [list(node_ids), zoom])
    page.page.wait_for_timeout(300)


def show_picture(page, node_id: str):
    """Zooms in on the picture a preview node shows: the canvas never draws it larger than its
    pixels, so on the tiny run's 64 px pictures a whole-node view shows a dot."""
    page.evaluate("""id => {
        const node = app.graph.getNodeById(Number(id));
        const width = Math.max(...node.imgs.map(i => i.naturalWidth));
        const height = Math.max(...node.imgs.map(i => i.naturalHeight));
        const x = node.pos[0] + node.size[0] / 2, y = node.pos[1] + node.size[1] / 2;
        const side = Math.max(width, height, 96) * 1.4;
        app.canvas.ds.fitToBounds([x - side / 2, y - side / 2, side, side], {zoom: 0.9});
        app.canvas.setDirty(true, true);
    }""", node_id)
    page.page.wait_for_timeout(300)


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")[:40]


def wait_for_history(server, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for prompt_id, entry in server.get("/history").items():
            if entry.get("status", {}).get("completed") or entry.get("status", {}).get("status_str") == "error":
                return prompt_id, entry
        time.sleep(0.5)
    raise AssertionError(f"no finished prompt after {seconds} s; server log:\n{server.log_tail()}")


def test_lora_workflow_queued_from_the_page_shows_the_live_loss_chart_and_every_picture(comfy, our_nodes):
    server, page = comfy
    with open(LORA_WORKFLOW, encoding="utf-8") as f:
        workflow = json.load(f)
    console_start = len(page.console)
    assert load(page, workflow) == []
    shrink_for_cpu(page)
    train_id = str(next(n["id"] for n in workflow["nodes"] if n["type"] == "LoRATrain"))
    previews = [str(n["id"]) for n in workflow["nodes"] if n["type"] in PICTURE_NODES]
    watch_run(page, train_id)
    show_nodes(page, [train_id])

    started = time.monotonic()
    # The Run button: aria-label "Run" in frontend 1.2x, the first button of the queue-button
    # split button in 1.3x.
    page.page.locator('button[aria-label="Run"], [data-testid="queue-button"] button').first.click()
    mid_training = None  # the last capture; a later preview (a longer loss curve) replaces it
    while time.monotonic() - started < RUN_SECONDS:
        state = page.evaluate("window.__training")
        progress = state["progress"]
        if state["ended"]:
            break
        if progress is None or state["previews"] == 0:
            page.page.wait_for_timeout(150)
            continue
        if progress["value"] >= progress["max"] or (mid_training and mid_training["previewStep"] >= 3):
            break
        if mid_training is None or state["previews"] > mid_training["previews"]:
            show_nodes(page, [train_id])  # the node grew to hold the preview
            page.screenshot("lora_training_live_loss_chart.png")
            mid_training = dict(progress, previews=state["previews"], previewStep=state["previewStep"],
                                shown=page.evaluate(f"(app.nodePreviewImages || {{}})['{train_id}'] || null"))
        page.page.wait_for_timeout(150)

    _, entry = wait_for_history(server, RUN_SECONDS - (time.monotonic() - started))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:3000]
    run_seconds = time.monotonic() - started
    fit_view(page)  # the canvas loads a node's pictures when it draws the node
    page.page.wait_for_function(
        """ids => ids.every(id => { const n = app.graph.getNodeById(Number(id));
            return n.imgs && n.imgs.length && n.imgs.every(i => i.complete && i.naturalWidth > 0); })""",
        arg=previews, timeout=30_000)
    page.screenshot("lora_finished_whole_workflow.png")
    timeline, steps = page.evaluate("[window.__training.timeline, window.__training.steps]")
    names = {str(n["id"]): n.get("title") or n["type"] for n in workflow["nodes"]}
    for node_id in previews:
        show_picture(page, node_id)
        page.screenshot(f"lora_finished_picture_{node_id}_{slug(names[node_id])}.png")
    show_nodes(page, [train_id])
    page.screenshot("lora_finished_training_node.png")
    print(f"\nLoRA workflow ran in {run_seconds:.1f} s; mid-training capture: {mid_training}\n"
          f"nodes started at (s): {[(names.get(node, node), t) for node, t in timeline]}\n"
          f"training progress (step, s): {steps}")

    assert mid_training is not None, "the training finished before its progress and loss chart could be seen"
    assert mid_training["previews"] >= 1 and mid_training["shown"], "no live preview reached the training node"
    for node_id in previews:
        images = entry["outputs"][node_id]["images"]
        assert images and all(image["type"] in ("temp", "output") for image in images)
    assert entry["outputs"][train_id]["images"], "the training node shows its final loss chart"
    assert os.path.exists(os.path.join(server.folder("models/loras"), "skkmtn_lora.safetensors"))
    assert pack_console_errors(page, console_start, our_nodes) == []


def test_every_example_workflow_thumbnail_is_served_where_the_template_browser_asks(comfy):
    """The frontend shows a custom node's template picture from
    /api/workflow_templates/<pack>/<name>.jpg; newer ComfyUI serves only .json files there, so
    the pack serves its thumbnails itself (nodes/templates.py)."""
    import urllib.request
    server, _ = comfy
    thumbnails = [path[:-len(".json")] + ".jpg" for path in WORKFLOWS if os.path.exists(path[:-len(".json")] + ".jpg")]
    assert thumbnails
    for path in thumbnails:
        name = os.path.splitext(os.path.basename(path))[0]
        url = f"{server.url}/api/workflow_templates/{support.PACK_NAME}/{name}.jpg"
        with urllib.request.urlopen(url, timeout=10) as response, open(path, "rb") as f:
            assert (response.status, response.headers.get_content_type(), response.read()) == \
                (200, "image/jpeg", f.read()), url
