"""The example workflows' thumbnails in ComfyUI's template browser.

For a custom node's template the frontend shows the picture at
/api/workflow_templates/<pack folder>/<workflow name>.jpg (it assumes .jpg for every custom-node
template). ComfyUI up to 0.8 serves the whole example_workflows folder there; newer ComfyUI
answers that path from a route that serves the .json files only, so the thumbnails would 404.
The pack therefore serves its own .jpg files at that path. Its route is registered while the
pack loads, before ComfyUI adds its own routes (server.PromptServer.add_routes runs after the
custom nodes are loaded), so it is the one that answers; older ComfyUI's static folder answers
first there and serves the same files.
"""
from __future__ import annotations

import os
import sys

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS_DIR = os.path.join(PACK_DIR, "example_workflows")
THUMBNAIL_SUFFIX = ".jpg"
_registered_on = []  # the route tables served so far: aiohttp refuses a route registered twice


def thumbnail_path(name: str) -> str | None:
    """The thumbnail of the example workflow `name`, or None when there is none."""
    if not name or name != os.path.basename(name) or name.startswith("."):
        return None
    path = os.path.join(WORKFLOWS_DIR, name + THUMBNAIL_SUFFIX)
    return path if os.path.isfile(path) else None


def register_thumbnail_route(routes=None) -> None:
    """Adds GET /workflow_templates/<pack folder>/{name}.jpg to ComfyUI's server routes (the
    server copies every route under /api too). Without a running ComfyUI server, nothing to do."""
    if routes is None:
        server = sys.modules.get("server")  # ComfyUI's server.py, imported before custom nodes load
        instance = getattr(getattr(server, "PromptServer", None), "instance", None)
        if instance is None:
            return
        routes = instance.routes
    if any(table is routes for table in _registered_on):
        return
    _registered_on.append(routes)
    # The folder name as ComfyUI lists the pack's templates (a link's name, not its target's).
    module = os.path.basename(PACK_DIR)
    routes.get(f"/workflow_templates/{module}/{{name}}{THUMBNAIL_SUFFIX}")(_thumbnail)


async def _thumbnail(request):
    from aiohttp import web
    path = thumbnail_path(request.match_info["name"])
    if path is None:
        raise web.HTTPNotFound()
    return web.FileResponse(path)
