# Sourced by scripts/up and scripts/test: a virtual environment with the project installed.
# Torch, torchvision and open_clip_torch come from the package registry (CPU here, CUDA on GPU workers).
set -euo pipefail
export HF_HUB_OFFLINE=1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${TVFORGE_VENV:-$ROOT/.venv}"
EXTRAS="${1:-}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
# The stamp skips a reinstall when nothing that pip reads has changed.
stamp="$VENV/.tvforge-installed$EXTRAS"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q -e ".$EXTRAS"
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
