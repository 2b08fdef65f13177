"""The shared trainer behind the pack's ComfyUI nodes and its command line.

It imports no ComfyUI module: backends hand it plain torch modules (see parts.py).
"""
