"""Turn a workflow saved by ComfyUI's editor (UI format) into the API prompt the server runs.

The UI format stores widget values as a list per node, in the order of the node's widget
inputs; the node definitions say which inputs are widgets. Integer and combo widgets that
carry a "control after generate" value (KSampler's seed: "fixed", "randomize"...) store that
extra value right after theirs.
"""
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Editor-only nodes: they exist in the UI and never reach the server.
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
# Node modes the editor does not run: 2 = muted ("never"), 4 = bypassed.
NOT_RUN_MODES = {2, 4}
LEGACY_SEED_NAMES = {"seed", "noise_seed"}


def api_prompt(workflow: dict, node_classes: dict) -> dict:
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in NOT_RUN_MODES:
            continue
        if node["type"] not in node_classes:
            raise KeyError(f"workflow node {node['id']} has unknown type {node['type']!r}")
        inputs = _widget_values(node, node_classes[node["type"]])
        for slot in node.get("inputs", []):
            link_id = slot.get("link")
            if link_id is not None:
                _, from_node, from_slot, *_ = links[link_id]
                inputs[slot["name"]] = [str(from_node), from_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def _widget_values(node: dict, node_class) -> dict:
    values = list(node.get("widgets_values") or [])
    definitions = node_class.INPUT_TYPES()
    inputs = {}
    for section in ("required", "optional"):
        for name, spec in definitions.get(section, {}).items():
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            if not _is_widget(kind, options):
                continue
            if not values:
                break
            inputs[name] = values.pop(0)
            if _has_control_value(name, kind, options):
                values.pop(0)
    return inputs


def widget_value_count(node_class) -> int:
    """How many widget values the editor saves for a node of this class."""
    count = 0
    for section in ("required", "optional"):
        for name, spec in node_class.INPUT_TYPES().get(section, {}).items():
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            if _is_widget(kind, options):
                count += 2 if _has_control_value(name, kind, options) else 1
    return count


def _is_widget(kind, options) -> bool:
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _has_control_value(name, kind, options) -> bool:
    control = options.get("control_after_generate")
    if control is None:
        # The editor's legacy rule: an INT named seed/noise_seed always gets the control widget.
        return kind == "INT" and name in LEGACY_SEED_NAMES
    return bool(control)
