"""Run a UI-format workflow headless through a real ComfyUI server and copy what it saved.

    python scripts/run_workflow.py workflows/demo_t2v.json --out results/

The server is the test host (tests/host): $COMFYUI_PATH if set, else the pinned ComfyUI it provisions.
Model files the workflow names are looked up in --models (a folder laid out like ComfyUI's models/).
"""
import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from host import workflows  # noqa: E402
from host.provision import comfyui_path  # noqa: E402
from host.server import ComfyServer  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflow", type=Path)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--models", type=Path, help="a folder laid out like ComfyUI's models/ (optional)")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()

    started = time.time()
    with tempfile.TemporaryDirectory() as work:
        server = ComfyServer(comfyui_path(), REPO, work)
        server.start()
        try:
            if args.models:
                for src in args.models.rglob("*"):
                    if src.is_file():
                        dest = server.models_dir / src.relative_to(args.models)
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        dest.symlink_to(src.resolve())
            info = server.object_info()
            problems = workflows.validate(workflows.load(args.workflow), info)
            if problems:
                raise SystemExit("the workflow does not match this ComfyUI:\n" + "\n".join(problems))
            server.run(workflows.to_api(workflows.load(args.workflow), info), timeout=args.timeout)
            args.out.mkdir(parents=True, exist_ok=True)
            saved = []
            for f in server.output_files():
                dest = args.out / f.relative_to(server.output_dir)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dest)
                saved.append(dest)
        finally:
            server.stop()
    for f in saved:
        print(f)
    print(f"done in {time.time() - started:.1f}s")


if __name__ == "__main__":
    main()
