#!/usr/bin/env bash
# Creates (or reuses) the virtual environment the demo and the tests run in, with everything they need:
# torch (never a dependency of the pack itself), the pack's requirements, the test extra, and the
# ComfyUI test host with its own requirements. Safe to run again: it only installs what is missing.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CVG_VENV:-$HOME/.cache/comfyui-cvg/venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/bin/activate" ]; then
  "$python" -m venv --clear "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
pip_quiet() { python -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }

if ! python -c "import torch, torchvision" 2>/dev/null; then
  pip_quiet torch==2.14.1 torchvision==0.29.1
fi
pip_quiet -r "$repo/requirements.txt" pytest pytest-timeout diffusers==0.42.1 "transformers>=5" playwright
# The browser test drives the system's Chromium (Playwright's own browser download is not used).
if ! command -v chromium >/dev/null 2>&1 && [ ! -x "${CVG_CHROMIUM:-/usr/bin/chromium}" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  else
    echo "setup_env: install Chromium (e.g. 'apt-get install chromium') or set CVG_CHROMIUM for the browser test" >&2
  fi
fi
comfy_tree="$(python "$repo/tests/host/provision.py")"
# shellcheck disable=SC2046
pip_quiet $(python "$repo/tests/host/provision.py" --requirements)
python -c "import torch, torchvision, diffusers, av, kornia, einops, safetensors" \
  || { echo "setup_env: the environment in $venv is incomplete" >&2; exit 1; }
echo "environment: $venv"
echo "ComfyUI test host: $comfy_tree"
