"""UI-format workflows (what users drag onto the canvas): checking them against a live server's
/object_info, and turning them into API-format prompts that the server can run."""
import json
from pathlib import Path

# Frontend-only nodes: they never reach the server.
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
FILE_EXTENSIONS = (
    ".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".png", ".jpg", ".jpeg", ".webp",
    ".mp4", ".webm", ".mkv", ".mov", ".gif", ".avi", ".json",
)


def load(path):
    return json.loads(Path(path).read_text())


def input_specs(info):
    """[(name, type, options, required)] of a node class in declaration order."""
    specs = []
    for section in ("required", "optional"):
        for name, spec in (info.get("input", {}).get(section) or {}).items():
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            specs.append((name, kind, options, section == "required"))
    return specs


def is_widget(kind):
    return isinstance(kind, list) or kind in WIDGET_TYPES


def widget_slots(name, kind, options):
    """The widgets_values entries one input occupies: its own value plus frontend companions."""
    slots = [("value", name)]
    if kind == "INT" and (name in ("seed", "noise_seed") or options.get("control_after_generate")):
        slots.append(("seed_control", name))
    if options.get("image_upload") or options.get("video_upload") or options.get("upload"):
        slots.append(("upload", name))
    return slots


def widget_layout(info):
    layout = []
    for name, kind, options, _ in input_specs(info):
        if is_widget(kind):
            layout.extend(widget_slots(name, kind, options))
    return layout


def widget_values(node, info):
    """{input name: value} from a UI node's positional widgets_values."""
    values = node.get("widgets_values") or []
    if isinstance(values, dict):  # some nodes (e.g. VideoHelperSuite) store a dict
        return dict(values)
    layout = widget_layout(info)
    if len(values) != len(layout):
        raise ValueError(
            f"node {node['id']} ({node['type']}): {len(values)} widget values for {len(layout)} widget "
            f"slots {[n for _, n in layout]}"
        )
    return {name: v for (slot, name), v in zip(layout, values) if slot == "value"}


def types_match(a, b):
    if a == "*" or b == "*":
        return True
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) or "COMBO" in (a, b)
    return bool(set(str(a).split(",")) & set(str(b).split(",")))


def _check_value(node, name, kind, options, value):
    where = f"node {node['id']} ({node['type']}) widget {name!r}"
    if isinstance(kind, list):
        if value in kind:
            return []
        if isinstance(value, str) and value.lower().endswith(FILE_EXTENSIONS):
            return []  # a model/input file the user downloads; the test server lacks it
        return [f"{where}: {value!r} is not one of {kind[:8]}"]
    if kind in ("INT", "FLOAT"):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or (kind == "INT" and value != int(value)):
            return [f"{where}: {value!r} is not a {kind}"]
        lo, hi = options.get("min"), options.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            return [f"{where}: {value} outside [{lo}, {hi}]"]
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return [f"{where}: {value!r} is not a boolean"]
    if kind == "STRING" and not isinstance(value, str):
        return [f"{where}: {value!r} is not a string"]
    return []


def is_pack_node(kind):
    return kind.startswith("CVG")


def validate(ui, object_info, older_native=False):
    """Every problem a user would meet on loading this workflow: unknown node types, links between
    mismatched types, widget values out of range or of the wrong count.

    `older_native`: the server is older than the ComfyUI the workflow was made for (the March-2024 test
    host), so native nodes may be missing or have fewer widgets there; the pack's own nodes and every
    link into them are still checked strictly. Run against a current ComfyUI for the full check."""
    problems = []
    nodes = {n["id"]: n for n in ui.get("nodes", [])}
    for node in nodes.values():
        kind = node["type"]
        if kind in VIRTUAL_NODES:
            continue
        lenient = older_native and not is_pack_node(kind)
        if kind not in object_info:
            if not lenient:
                problems.append(f"node {node['id']}: unknown node type {kind!r}")
            continue
        info = object_info[kind]
        try:
            values = widget_values(node, info)
        except ValueError as e:
            if not lenient:
                problems.append(str(e))
            continue
        layout = widget_layout(info)
        raw = node.get("widgets_values") or []
        if isinstance(raw, list):
            for (slot, name), v in zip(layout, raw):
                if slot == "seed_control" and v not in SEED_CONTROL_VALUES:
                    problems.append(f"node {node['id']} ({kind}): seed control {v!r} is not one of {sorted(SEED_CONTROL_VALUES)}")
        specs = {name: (k, o) for name, k, o, _ in input_specs(info)}
        for name, v in values.items():
            if name in specs and not lenient:
                problems += _check_value(node, name, specs[name][0], specs[name][1], v)
        for inp in node.get("inputs", []):
            if inp["name"] not in specs and not lenient:
                problems.append(f"node {node['id']} ({kind}): input {inp['name']!r} does not exist on the server")
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for name, k, _, required in input_specs(info):
            if required and not is_widget(k) and name not in linked:
                problems.append(f"node {node['id']} ({kind}): required input {name!r} is not connected")
    for link in ui.get("links", []):
        link_id, src_id, src_slot, dst_id, dst_slot, link_type = link[:6]
        src, dst = nodes.get(src_id), nodes.get(dst_id)
        if src is None or dst is None:
            problems.append(f"link {link_id}: connects a missing node")
            continue
        if src["type"] not in VIRTUAL_NODES and src["type"] in object_info:
            outputs = object_info[src["type"]]["output"]
            if src_slot >= len(outputs):
                problems.append(f"link {link_id}: {src['type']} has no output slot {src_slot}")
            elif not types_match(outputs[src_slot], link_type):
                problems.append(f"link {link_id}: {src['type']} output {src_slot} is {outputs[src_slot]}, link says {link_type}")
        if dst["type"] not in VIRTUAL_NODES and dst["type"] in object_info:
            inputs = dst.get("inputs", [])
            if dst_slot >= len(inputs):
                problems.append(f"link {link_id}: {dst['type']} has no input slot {dst_slot}")
                continue
            name = inputs[dst_slot]["name"]
            specs = {n: k for n, k, _, _ in input_specs(object_info[dst["type"]])}
            if name in specs and not types_match(specs[name], link_type):
                problems.append(f"link {link_id}: {dst['type']}.{name} takes {specs[name]}, link brings {link_type}")
    return problems


def _resolve_source(nodes, links, link_id):
    """Follow Reroute nodes back to the real node output a link starts from."""
    while True:
        _, src_id, src_slot, *_ = links[link_id]
        src = nodes[src_id]
        if src["type"] != "Reroute":
            if src["type"] in VIRTUAL_NODES:
                raise ValueError(f"node {src_id} ({src['type']}) feeds a link; API conversion supports only Reroute")
            return str(src_id), src_slot
        link_id = src["inputs"][0]["link"]


def to_api(ui, object_info):
    """The API-format prompt the frontend would queue for this UI-format workflow."""
    nodes = {n["id"]: n for n in ui.get("nodes", [])}
    links = {l[0]: l for l in ui.get("links", [])}
    prompt = {}
    for node in nodes.values():
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) == 2:
            continue
        if node.get("mode", 0) == 4:
            raise ValueError(f"node {node['id']} is bypassed; API conversion does not support bypass")
        info = object_info[node["type"]]
        inputs = dict(widget_values(node, info))
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                inputs[inp["name"]] = list(_resolve_source(nodes, links, inp["link"]))
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def from_api(prompt, object_info, notes=(), positions=None):
    """A UI-format workflow from an API-format prompt (the inverse of `to_api`), laid out left to right,
    with Note nodes carrying `notes`. Used to write the workflows in workflows/ from tested graphs."""
    ids = {key: i + 1 for i, key in enumerate(prompt)}
    nodes, links = [], []
    for key, node in prompt.items():
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
        for name, kind, options, _ in input_specs(info):
            value = node["inputs"].get(name)
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] in ids:
                link_id = len(links) + 1
                src = prompt[value[0]]["class_type"]
                link_type = object_info[src]["output"][value[1]]
                links.append([link_id, ids[value[0]], value[1], ids[key], len(inputs), link_type])
                inputs.append({"name": name, "type": kind if isinstance(kind, str) else "COMBO", "link": link_id})
            elif is_widget(kind):
                default = options.get("default", kind[0] if isinstance(kind, list) and kind else None)
                for slot, _ in widget_slots(name, kind, options):
                    widgets.append({"value": node["inputs"].get(name, default), "seed_control": "fixed",
                                    "upload": "image"}[slot])
        outputs = [{"name": n, "type": t, "links": [], "slot_index": i}
                   for i, (t, n) in enumerate(zip(info["output"], info.get("output_name", info["output"])))]
        pos = (positions or {}).get(key) or [40 + 300 * (len(nodes) % 5), 80 + 260 * (len(nodes) // 5)]
        nodes.append({"id": ids[key], "type": node["class_type"], "pos": pos, "size": [280, 120], "flags": {},
                      "order": len(nodes), "mode": 0, "inputs": inputs, "outputs": outputs,
                      "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets})
    for link in links:
        src = next(n for n in nodes if n["id"] == link[1])
        src["outputs"][link[2]]["links"].append(link[0])
    for i, text in enumerate(notes):
        nodes.append({"id": len(nodes) + 1, "type": "Note", "pos": [40 + 420 * i, -220], "size": [400, 180],
                      "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                      "properties": {}, "widgets_values": [text]})
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}
