#!/usr/bin/env bash
# lm-evaluation-harness in its own venv (same torch / transformers as medmerge's), for
# bench/pubmedqa_vs_lmeval.py. Usage: bash bench/setup_lmeval.sh [VENV]   (default /tmp/lmeval)
set -euo pipefail
venv="${1:-/tmp/lmeval}"
if [ ! -x "$venv/bin/lm_eval" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "lm-eval[hf]==0.4.13" torch==2.13.0 transformers==4.57.6
fi
"$venv/bin/python" -c "import lm_eval, torch, transformers; print('lm-eval', lm_eval.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
