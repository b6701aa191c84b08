#!/usr/bin/env bash
# The main job: run the demo text-to-video workflow headless through a real ComfyUI server, on the CPU,
# with the pack's bundled demo weights (nothing is downloaded), and write the video to results/demo/.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh" >/dev/null
# shellcheck disable=SC1091
. "${CVG_VENV:-$HOME/.cache/comfyui-cvg/venv}/bin/activate"
cd "$repo"
exec python scripts/run_workflow.py "${1:-workflows/demo_t2v.json}" --out "${2:-results/demo}"
