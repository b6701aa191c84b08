"""Collects the node classes of every stage module in this folder.

Each stage module (vae.py, wan.py, ...) defines NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS.
A module that fails to import fails the whole pack on purpose: ComfyUI then logs IMPORT FAILED,
which the test suite looks for, instead of the pack loading with nodes silently missing.
"""
import importlib
import pkgutil

from . import comfy_bridge

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

comfy_bridge.register_model_folders()

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("_") or _info.name == "comfy_bridge":
        continue
    _module = importlib.import_module(f".{_info.name}", __name__)
    for _node_id, _cls in getattr(_module, "NODE_CLASS_MAPPINGS", {}).items():
        if not _node_id.startswith("CVG"):
            raise ValueError(f"node id {_node_id!r} in nodes/{_info.name}.py must start with 'CVG'")
        if _node_id in NODE_CLASS_MAPPINGS:
            raise ValueError(f"node id {_node_id!r} is defined twice (nodes/{_info.name}.py)")
        NODE_CLASS_MAPPINGS[_node_id] = _cls
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_module, "NODE_DISPLAY_NAME_MAPPINGS", {}))
