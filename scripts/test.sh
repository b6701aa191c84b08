#!/usr/bin/env bash
# The whole test suite, from a fresh clone: sets up the environment, then runs pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
# shellcheck disable=SC1091
. "${CVG_VENV:-$HOME/.cache/comfyui-cvg/venv}/bin/activate"
cd "$repo"
exec python -m pytest "$@"
