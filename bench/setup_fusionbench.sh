#!/usr/bin/env bash
# Create the benchmark-only FusionBench environment (never a dependency of medmerge).
# fusion-bench 0.2.33 pulls transformers >= 5 (medmerge pins < 5), lightning, hydra, datasets…, so it
# lives in its own venv outside the repo; bench/fusionbench_reference.py hands tensors to it through
# safetensors files and never imports medmerge there.
# torch==2.13.0 is installed first so pip takes the CPU wheel (unpinned torch pulls CUDA builds).
# Usage: bash bench/setup_fusionbench.sh [VENV_DIR]   (default $MEDMERGE_CACHE/venv-fusionbench, ~/.cache/medmerge)
set -euo pipefail
VENV="${1:-${MEDMERGE_CACHE:-$HOME/.cache/medmerge}/venv-fusionbench}"
PY="${PYTHON:-python3.11}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import fusion_bench" 2>/dev/null; then
  echo "fusion-bench already installed in $VENV"
  exit 0
fi
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet torch==2.13.0
"$VENV/bin/pip" install --quiet fusion-bench==0.2.33
"$VENV/bin/python" -c "import fusion_bench.method, transformers; print('fusion-bench', __import__('importlib.metadata').metadata.version('fusion-bench'))"
echo "fusion-bench ready: $VENV/bin/python"
