"""Where the reference manifests are: $CVG_MANIFESTS, else the shared/ folder beside the checkout (how
developers and CI lay it out), else a shared/ inside it."""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def manifest_dir():
    candidates = [Path(os.environ["CVG_MANIFESTS"])] if os.environ.get("CVG_MANIFESTS") else []
    candidates += [REPO.parent / "shared" / "reference" / "manifests", REPO / "shared" / "reference" / "manifests"]
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(
        "the reference manifests were not found (looked in " + ", ".join(map(str, candidates)) +
        "); set CVG_MANIFESTS to the folder holding wan2.1_vae.json and the others"
    )


def manifest(name):
    return manifest_dir() / name
