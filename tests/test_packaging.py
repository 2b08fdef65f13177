"""pyproject.toml as the Comfy Registry reads it: the rules its backend applies to the node id and
the publisher id, a semantic version, and no placeholder URLs."""
import os
import re

import pytest

tomllib = pytest.importorskip("tomllib")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pyproject():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_node_and_publisher_ids_follow_the_registry_rules(pyproject):
    name, comfy = pyproject["project"]["name"], pyproject["tool"]["comfy"]
    assert len(name) <= 50 and re.fullmatch(r"[a-z][a-z0-9-_]+(\.[a-z0-9-_]+)*", name)
    assert "comfyui" not in name, "the Registry asks node ids not to say ComfyUI"
    assert re.fullmatch(r"[a-z][a-z0-9-]*", comfy["PublisherId"])
    assert comfy["DisplayName"].strip()
    assert len(pyproject["project"]["description"]) <= 1000
    assert re.fullmatch(r"\d+\.\d+\.\d+", pyproject["project"]["version"])


def test_urls_are_real_or_absent(pyproject):
    urls = list(pyproject["project"].get("urls", {}).values())
    icon = pyproject["tool"]["comfy"].get("Icon")
    for url in urls + ([icon] if icon is not None else []):
        assert url.startswith("https://") and "example." not in url, url
