#!/usr/bin/env bash
# Create the benchmark-only mergekit environment (never a dependency of medmerge).
# mergekit 0.1.5 needs transformers >= 5, so it lives in its own venv outside the repo.
# torch==2.13.0 is installed first so pip takes the CPU wheel (unpinned torch pulls CUDA builds).
# Usage: bash bench/setup_mergekit.sh [VENV_DIR]   (default $MEDMERGE_CACHE/venv-mergekit, ~/.cache/medmerge)
set -euo pipefail
VENV="${1:-${MEDMERGE_CACHE:-$HOME/.cache/medmerge}/venv-mergekit}"
PY="${PYTHON:-python3.11}"
if [ -x "$VENV/bin/mergekit-yaml" ]; then
  echo "mergekit already installed in $VENV"
  exit 0
fi
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet torch==2.13.0
"$VENV/bin/pip" install --quiet mergekit==0.1.5 psutil
"$VENV/bin/mergekit-yaml" --help >/dev/null
echo "mergekit ready: $VENV/bin/mergekit-yaml"
