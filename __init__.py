"""CVG · Controllable Video Generation — a ComfyUI custom node pack.

ComfyUI imports this folder as a package under a mangled name, so every import here is relative.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
