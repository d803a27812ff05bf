#!/usr/bin/env bash
# A separate environment for the merge-cost benchmark's mergekit rows (bench/merge_cost.py --mergekit-python):
# mergekit brings transformers 5, peft, accelerate and datasets, which the service does not use, so they stay
# out of the project's own environment. It reuses the project's torch and safetensors (a .pth file pointing
# at .venv's site-packages) and installs mergekit's remaining requirements from PyPI.
#   bash scripts/mergekit_env.sh   ->   .venv-mergekit/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
project_venv="${TVFORGE_VENV:-.venv}"
[ -x "$project_venv/bin/python" ] || { echo "run scripts/bootstrap.sh first" >&2; exit 1; }
project_site=$("$project_venv/bin/python" -c "import site; print(site.getsitepackages()[0])")
"$project_venv/bin/python" -m venv .venv-mergekit
own_site=$(.venv-mergekit/bin/python -c "import site; print(site.getsitepackages()[0])")
echo "$project_site" > "$own_site/project-venv.pth"
.venv-mergekit/bin/python -m pip install -q "mergekit==0.1.5"
.venv-mergekit/bin/python -c "import mergekit.merge_methods.generalized_task_arithmetic, torch; print('mergekit ready, torch', torch.__version__)"
