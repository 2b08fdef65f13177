"""ComfyUI entry point of the pack (V3 API). Importing this module loads nothing heavy."""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import TrainerExtension
    return TrainerExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
