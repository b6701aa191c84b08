"""The pack as ComfyUI sees it: it imports, every node is listed, the layering rule holds,
and a broken import is caught (ComfyUI itself only logs it and keeps running)."""
import ast
import re
import shutil
import tomllib
from pathlib import Path


from host.provision import comfyui_path
from host.server import PACK_NAME, ComfyServer

REPO = Path(__file__).resolve().parent.parent
COMFY_MODULES = re.compile(r"^\s*(import|from)\s+(comfy|comfy_extras|comfy_api|folder_paths|server|latent_preview|node_helpers)\b", re.M)


def declared_node_ids():
    """Node ids from the NODE_CLASS_MAPPINGS literals of nodes/*.py, read without importing ComfyUI."""
    ids = {}
    for path in sorted((REPO / "nodes").glob("*.py")):
        tree = ast.parse(path.read_text())
        for stmt in tree.body:
            targets = [t.id for t in getattr(stmt, "targets", []) if isinstance(t, ast.Name)]
            if "NODE_CLASS_MAPPINGS" in targets and path.name != "__init__.py":
                assert isinstance(stmt.value, ast.Dict), f"{path.name}: NODE_CLASS_MAPPINGS must be a dict literal"
                for key in stmt.value.keys:
                    ids[ast.literal_eval(key)] = path.name
    return ids


def pack_import_failed(server):
    return any(PACK_NAME in line for line in server.import_failures())


def test_pack_imports_and_lists_every_node(comfy):
    assert not pack_import_failed(comfy), comfy.log()[-4000:]
    info = comfy.object_info()
    missing = sorted(set(declared_node_ids()) - set(info))
    assert not missing, f"nodes missing from /object_info: {missing}\n{comfy.log()[-4000:]}"
    for node_id in declared_node_ids():
        assert node_id.startswith("CVG")
        assert info[node_id]["category"].startswith("CVG")


def test_models_layer_has_no_comfyui_import():
    offenders = [
        f"{p.relative_to(REPO)}: {m.group(0).strip()}"
        for p in (REPO / "models").rglob("*.py")
        for m in COMFY_MODULES.finditer(p.read_text())
    ]
    assert not offenders, offenders


def test_project_metadata():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["name"] == "comfyui-cvg"
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    deps = {re.split(r"[<>=!~ ]", d)[0].lower() for d in project["dependencies"]}
    assert {"einops", "safetensors", "kornia", "av"} <= deps and "torch" not in deps
    assert "diffusers==0.42.1" in project["optional-dependencies"]["test"]
    assert {"PublisherId", "DisplayName", "Icon"} <= set(meta["tool"]["comfy"])
    requirements = {l.strip().lower() for l in (REPO / "requirements.txt").read_text().splitlines() if l.strip()}
    assert requirements == deps, "requirements.txt must list the runtime dependencies, unpinned, no torch"


def test_broken_import_is_detected(tmp_path):
    """Break an import in a copy of the pack: the check the suite relies on must see it."""
    copy = tmp_path / "pack"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", "__pycache__", "tests", "*.safetensors"))
    bridge = copy / "nodes" / "comfy_bridge.py"
    bridge.write_text("import cvg_module_that_does_not_exist\n" + bridge.read_text())
    server = ComfyServer(comfyui_path(), copy, tmp_path / "work")
    server.start()
    try:
        assert pack_import_failed(server), server.log()[-3000:]
        assert "cvg_module_that_does_not_exist" in server.log()
        assert not [k for k in server.object_info() if k.startswith("CVG")]
    finally:
        server.stop()
