"""The canvas in a real browser: every workflow in workflows/ loads with no missing node types and no
console errors from the pack's extension; a queued Load Video -> Save Video graph ends with the preview
<video> inside the node reaching a playable state; the frame-count hints react to widget values.

Run against the `comfy` test host (old frontend of the March-2024 tree). Needs Debian's `chromium` and
`pip install playwright` (no Playwright browser download).
"""
import json
from pathlib import Path

import pytest
import torch

from models import video_files as vf

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
ROUND_TRIP = REPO / "workflows" / "cvg_video_load_save.json"


def source_clip(t=9, h=48, w=64):
    y = torch.linspace(0, 1, h)[:, None]
    x = torch.linspace(0, 1, w)[None]
    return torch.stack([torch.stack([0.5 + 0.4 * torch.sin(3 * x + 2 * y + 0.4 * i + c) for c in range(3)], -1)
                        for i in range(t)])


@pytest.fixture(scope="module")
def source_video(comfy):
    path = vf.write_video(str(comfy.input_dir / "cvg_browser_src.webm"), source_clip(), format="webm", fps=8)
    return Path(path).name


def load_graph(page, graph):
    page.evaluate("async (g) => { await window.app.loadGraphData(g); }", graph)
    return page.evaluate("""(g) => {
        const missing = (g.nodes || []).map(n => n.type).filter(t => !window.LiteGraph.registered_node_types[t]);
        const loaded = window.app.graph._nodes.map(n => n.type);
        return {missing, loaded, cvgMissing: window.__cvgMissing || []};
    }""", graph)


def test_round_trip_workflow_exists():
    assert ROUND_TRIP in WORKFLOWS
    ui = json.loads(ROUND_TRIP.read_text())
    assert {n["type"] for n in ui["nodes"]} >= {"CVGLoadVideo", "CVGSaveVideo", "Note"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_loads_in_canvas(page, path):
    graph = json.loads(path.read_text())
    state = load_graph(page, graph)
    assert state["missing"] == [], f"{path.name}: node types missing on the canvas: {state['missing']}"
    assert state["cvgMissing"] == []
    assert sorted(state["loaded"]) == sorted(n["type"] for n in graph["nodes"])
    # The frontend put every saved value of the pack's nodes into the widget of the same name (no
    # positional shift). Native nodes are skipped: their widgets differ between ComfyUI versions (e.g.
    # CLIPLoader gained type "wan" and a device widget after the March-2024 test host).
    shown = page.evaluate("""() => Object.fromEntries(window.app.graph._nodes.map(n =>
        [n.id, (n.widgets || []).map(w => [w.name, w.type, w.value])]))""")
    for node in graph["nodes"]:
        if not node["type"].startswith("CVG"):
            continue
        values = node.get("widgets_values") or []
        widgets = shown[str(node["id"])]
        assert len(widgets) >= len(values), (node["type"], widgets, values)
        for (name, kind, value), want in zip(widgets, values):
            if kind in ("button",) or name in ("control_after_generate",):
                continue
            assert value == want, f"{path.name} node {node['id']} ({node['type']}) widget {name}: {value!r} != {want!r}"
    page.wait_for_timeout(300)
    assert page.console.pack_errors() == [], page.console.pack_errors()


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_queued_graph_shows_playable_video(page, comfy, source_video, fmt):
    graph = json.loads(ROUND_TRIP.read_text())
    for node in graph["nodes"]:
        if node["type"] == "CVGLoadVideo":
            node["widgets_values"][7] = source_video
        if node["type"] == "CVGSaveVideo":
            node["widgets_values"][0] = f"browser/{fmt}"
            node["widgets_values"][1] = fmt
    state = load_graph(page, graph)
    assert state["missing"] == []
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    saver = page.locator("video.cvg-video-preview[src*='subfolder=browser']")
    saver.wait_for(state="attached", timeout=180000)
    page.wait_for_function(
        """() => [...document.querySelectorAll('video.cvg-video-preview')]
                 .some(v => (v.getAttribute('src') || '').includes('subfolder=browser') && v.readyState >= 2)""",
        timeout=60000)
    info = page.evaluate("""() => {
        const v = [...document.querySelectorAll('video.cvg-video-preview')]
                  .find(v => (v.getAttribute('src') || '').includes('subfolder=browser'));
        return {src: v.getAttribute('src'), w: v.videoWidth, h: v.videoHeight, ready: v.readyState,
                display: getComputedStyle(v).display, error: v.error && v.error.code};
    }""")
    assert info["ready"] >= 2 and info["error"] is None
    assert (info["w"], info["h"]) == (64, 48)
    assert info["display"] != "none"
    assert f"filename=" in info["src"] and f".{fmt}" in info["src"]
    saved = [p for p in comfy.output_files() if p.parent.name == "browser" and p.suffix == f".{fmt}"]
    assert saved, "the server wrote no file"
    # The graph saved from the canvas now (previews and upload button present) passes the same hygiene
    # check as the workflows in workflows/.
    from host import workflows

    ui = page.evaluate("() => window.app.graph.serialize()")
    problems = workflows.validate(ui, comfy.object_info())
    # The current frontend lists every widget as an input socket, its upload button too (as it does for
    # LoadImage); that is the frontend's own bookkeeping, not a widget-layout problem.
    problems = [p for p in problems if "input 'upload' does not exist" not in p]
    assert problems == []
    assert page.console.pack_errors() == [], page.console.pack_errors()


def test_loader_preview_plays_selected_input(page, source_video):
    """The selected input video plays in CVG Load Video: js/cvg.js's preview on the old frontend, the
    frontend's own (built from `video_upload`) on the current one; either way exactly one upload button."""
    graph = json.loads(ROUND_TRIP.read_text())
    for node in graph["nodes"]:
        if node["type"] == "CVGLoadVideo":
            node["widgets_values"][7] = source_video
    load_graph(page, graph)
    page.wait_for_function(
        """(name) => [...document.querySelectorAll('video')]
                 .some(v => (v.currentSrc || v.getAttribute('src') || '').includes(encodeURIComponent(name))
                            && v.readyState >= 2)""",
        arg=source_video, timeout=60000)
    upload = page.evaluate("""() => {
        const n = window.app.graph._nodes.find(n => n.type === 'CVGLoadVideo');
        return n.widgets.filter(w => w.name === 'upload' || w.type === 'button').map(w => w.name);
    }""")
    assert upload == ["upload"]


def test_frame_count_hints(page):
    page.evaluate("async () => { await window.app.loadGraphData({nodes: [], links: [], groups: [], config: {}, extra: {}, version: 0.4}); }")
    labels = page.evaluate("""() => {
        const node = window.LiteGraph.createNode('CVGLoadVideo');
        window.app.graph.add(node);
        const w = node.widgets.find(w => w.name === 'frame_cap');
        const out = {};
        for (const v of [8, 9, 81, 80]) { w.value = v; w.callback && w.callback(v); out[v] = w.label; }
        const other = node.widgets.find(w => w.name === 'skip_first');
        out.other = other.label || other.name;
        return out;
    }""")
    assert "3 latent" in labels["9"] and "21 latent" in labels["81"]
    assert "not 4k+1" in labels["8"] and "5 or 9" in labels["8"]
    assert "not 4k+1" in labels["80"] and "77 or 81" in labels["80"]
    assert labels["other"] == "skip_first"
    # every other CVG node with a Wan frame-count widget gets the same hint
    others = page.evaluate("""() => {
        const names = ['length', 'num_frames', 'frames', 'frame_count', 'video_length', 'segment_length'];
        const out = [];
        for (const type of Object.keys(window.LiteGraph.registered_node_types)) {
            if (!type.startsWith('CVG') || type === 'CVGLoadVideo') continue;
            const node = window.LiteGraph.createNode(type);
            if (String(node.constructor.category || '').toLowerCase().includes('animatediff')) continue;
            for (const w of node.widgets || []) {
                if (!names.includes(w.name)) continue;
                // what the old frontend does on an edit: set, then its callback rounds to the step
                w.value = 81; w.callback && w.callback(81);
                const v81 = [w.value, w.label];
                w.value = 79; w.callback && w.callback(79);
                out.push([type, w.name, v81, [w.value, w.label]]);
            }
        }
        return out;
    }""")
    assert others, "no CVG node with a frame-count widget was found"
    for node_type, name, v81, v79 in others:
        assert v81[0] == 81 and "21 latent" in v81[1], (node_type, name, v81)
        # 79 is either snapped onto the 4k+1 grid (step-4 widgets) or flagged
        assert (v79[0] in (77, 81) and "latent" in v79[1]) or "not 4k+1" in v79[1], (node_type, name, v79)
    assert page.console.pack_errors() == []


@pytest.mark.parametrize("fmt,mime,name", [("webp", "image/webp", "restore.webp"),
                                           ("png-sequence", "image/png", "frame_000001.png"),
                                           ("mp4", "video/mp4", "restore.mp4"),
                                           ("webm", "video/webm", "restore.webm"),
                                           ("mkv-ffv1", "video/x-matroska", "restore.mkv"),
                                           ("gif", "image/gif", "restore.gif")])
def test_dropped_output_restores_workflow(page, comfy, source_video, fmt, mime, name):
    """A file saved from a browser-queued graph carries the workflow (EXTRA_PNGINFO); handing it to the
    frontend's file loader (what a drop on the canvas does) restores that graph. webp and png are read by
    the frontend itself; mp4 / webm / mkv / gif by js/cvg.js (the old frontend reads none of them)."""
    graph = json.loads(ROUND_TRIP.read_text())
    for node in graph["nodes"]:
        if node["type"] == "CVGLoadVideo":
            node["widgets_values"][7] = source_video
            node["widgets_values"][0] = 5
        if node["type"] == "CVGSaveVideo":
            node["widgets_values"][0] = f"restore/{fmt}"
            node["widgets_values"][1] = fmt
    load_graph(page, graph)
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    page.wait_for_function("""() => { const n = window.app.graph._nodes.find(n => n.type === 'CVGSaveVideo');
                                      return n && n.cvgLastUrl && n.cvgLastUrl.includes('restore'); }""",
                           timeout=180000)
    restored = page.evaluate("""async ([mime, name]) => {
        const n = window.app.graph._nodes.find(n => n.type === 'CVGSaveVideo');
        const url = mime === 'image/png'
            ? n.cvgLastUrl.replace(/filename=[^&]*/, 'filename=frame_000001.png')
                          .replace(/subfolder=([^&]*)/, (m, s) => 'subfolder=' + s + '%2F' +
                               encodeURIComponent(decodeURIComponent(n.cvgLastUrl.match(/filename=([^&]*)/)[1])))
            : n.cvgLastUrl;
        const blob = await (await fetch(url)).blob();
        await window.app.loadGraphData({nodes: [], links: [], groups: [], config: {}, extra: {}, version: 0.4});
        const before = window.app.graph._nodes.length;
        await window.app.handleFile(new File([blob], name, {type: mime}));
        for (let i = 0; i < 50 && window.app.graph._nodes.length === before; i++)
            await new Promise(r => setTimeout(r, 100));
        return window.app.graph._nodes.map(n => [n.type, n.widgets_values || (n.widgets || []).map(w => w.value)]);
    }""", [mime, name])
    types = sorted(t for t, _ in restored)
    assert types == sorted(n["type"] for n in graph["nodes"]), restored
    saver = next(v for t, v in restored if t == "CVGSaveVideo")
    assert saver[0] == f"restore/{fmt}" and saver[1] == fmt
    assert page.console.pack_errors() == []
