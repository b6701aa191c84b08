"""CVG · Controllable Video Generation — a ComfyUI custom node pack.

ComfyUI imports this folder as a package under a mangled name, so every import here is relative.
Outside ComfyUI (no `comfy` module, e.g. when pytest or a script imports models/ alone) the package
exposes no nodes instead of failing; inside ComfyUI any import error still fails the pack loudly.
"""
import importlib.util

WEB_DIRECTORY = "./js"

if importlib.util.find_spec("comfy") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
