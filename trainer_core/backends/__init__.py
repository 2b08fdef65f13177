"""Backends build `ModelParts` from a model library's objects (diffusers here; ComfyUI in nodes/)."""
