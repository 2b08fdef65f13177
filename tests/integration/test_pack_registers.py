"""The pack loads in a real ComfyUI through its V3 entry point, with every node and tooltip."""
import glob
import json
import os

from comfy_harness import OUR_NODES, REPO
from workflow_to_prompt import FRONTEND_ONLY, widget_value_count


def test_pack_loads_without_import_errors_and_registers_every_node(comfyui):
    assert comfyui.pack_loaded, "\n".join(comfyui.pack_load_log)
    assert not [m for m in comfyui.pack_load_log if "Traceback" in m or "Cannot import" in m]
    for node_id in OUR_NODES:
        assert node_id in comfyui.node_classes, node_id


def test_node_definitions_reach_the_editor_with_tooltips_on_every_input_and_output(comfyui):
    for node_id in OUR_NODES:
        info = comfyui.node_classes[node_id].GET_NODE_INFO_V1()
        assert info["category"] == "training" and info["description"]
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert all(info["output_tooltips"]), node_id


def test_example_workflows_hold_one_value_per_widget_of_each_node(comfyui):
    # A node that gains or loses an input shifts every later widget value of saved workflows.
    for path in glob.glob(os.path.join(REPO, "example_workflows", "*.json")):
        with open(path, encoding="utf-8") as f:
            workflow = json.load(f)
        for node in workflow["nodes"]:
            if node["type"] in FRONTEND_ONLY:
                continue
            expected = widget_value_count(comfyui.node_classes[node["type"]])
            assert len(node.get("widgets_values") or []) == expected, \
                f"{os.path.basename(path)} node {node['id']} ({node['type']})"
