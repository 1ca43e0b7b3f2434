#!/usr/bin/env bash
# One-step, idempotent environment set-up for efficientvit_det.
#
# Creates .venv, installs the pinned stack, builds mmcv 2.1.0 WITH its compiled ops
# (PyPI has no wheel for torch 2.14) and caches that wheel outside the repo, keyed by
# torch version, CUDA flavour, Python tag and platform. A stamp file makes a re-run that
# finds everything in place finish in seconds.
#
# Environment:
#   PYTHON        interpreter to create the venv with (default: python3)
#   VENV          venv path (default: <repo>/.venv)
#   EVIT_CACHE    wheel cache (default: ${XDG_CACHE_HOME:-~/.cache}/efficientvit_det)
#   FORCE_CUDA=1  build mmcv's CUDA ops too (needs nvcc and CUDA_HOME; automatic when
#                 torch sees a GPU). The cache key and the ready stamp then say "cudaXY".
#   TORCH_CUDA_ARCH_LIST  GPU archs of that build (default: the visible GPU's, e.g. "9.0")
#   MAX_JOBS      parallel compile jobs (default: number of cores)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv}"
CACHE="${EVIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/efficientvit_det}"
MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export MAX_JOBS

TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
MMCV_VERSION=2.1.0

log()  { printf '[setup] %s\n' "$*"; }

# nvcc must compile for the CUDA release torch was built with (e.g. 13.0 for the cu130 wheel).
check_nvcc_matches_torch() {
  local torch_cuda nvcc_cuda nvcc="${CUDA_HOME:+$CUDA_HOME/bin/}nvcc"
  torch_cuda="$("$PY" -c 'import torch; print(torch.version.cuda or "")')"
  command -v "$nvcc" >/dev/null || fail "building mmcv's CUDA ops needs nvcc (CUDA $torch_cuda): install the CUDA toolkit $torch_cuda and set CUDA_HOME"
  nvcc_cuda="$("$nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')"
  if [[ "${nvcc_cuda%%.*}" != "${torch_cuda%%.*}" ]]; then
    fail "nvcc is CUDA $nvcc_cuda but torch $TORCH_VERSION is built for CUDA $torch_cuda: point CUDA_HOME at a CUDA $torch_cuda toolkit"
  elif [[ "$nvcc_cuda" != "$torch_cuda" ]]; then
    log "warning: nvcc is CUDA $nvcc_cuda, torch uses $torch_cuda (same major: usually works)"
  fi
}
fail() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }
trap 'fail "step failed at line $LINENO (see the output above); the venv is NOT marked ready"' ERR

STAMP="$VENV/.efficientvit_det_ready"
INPUTS="$(cat "$ROOT/scripts/setup_env.sh" "$ROOT/requirements.txt" "$ROOT/setup.py" | sha256sum | cut -c1-16)"

# cpu, or cudaXY when mmcv must be built with CUDA ops (torch sees a GPU, or FORCE_CUDA=1)
cuda_flavour() {
  "$1" - <<'PY'
import os, torch
use_cuda = os.environ.get('FORCE_CUDA') == '1' or torch.cuda.is_available()
print(f"cuda{(torch.version.cuda or 'none').replace('.', '')}" if use_cuda else 'cpu')
PY
}

# The stamp records the inputs of the set-up and the CUDA flavour mmcv was built for: a venv
# made on a CPU machine is redone on a GPU machine (mmdet's NMS / focal loss need CUDA ops).
if [[ -f "$STAMP" && -x "$VENV/bin/python" ]] \
   && [[ "$(cat "$STAMP")" == "$INPUTS-$(cuda_flavour "$VENV/bin/python" 2>/dev/null)" ]] \
   && "$VENV/bin/python" -c "import efficientvit_det, mmcv._ext" 2>/dev/null; then
  log "environment ready ($VENV)"
  exit 0
fi
rm -f "$STAMP"

[[ -x "$VENV/bin/python" ]] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check --progress-bar off)

log "installing torch $TORCH_VERSION / torchvision $TORCHVISION_VERSION and build tools"
"${PIP[@]}" -q --upgrade "pip>=24" "setuptools==80.9.0" wheel ninja
"${PIP[@]}" -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"

# --- mmcv 2.1.0 with compiled ops -------------------------------------------------------
CUDA_TAG="$(cuda_flavour "$PY")"
if [[ "$CUDA_TAG" != cpu ]]; then
  export FORCE_CUDA=1
  check_nvcc_matches_torch
  if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    # only the visible GPU's arch: an all-arch build takes hours
    TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || true)"
    [[ -n "$TORCH_CUDA_ARCH_LIST" ]] || fail "FORCE_CUDA=1 without a visible GPU: set TORCH_CUDA_ARCH_LIST, e.g. \"8.0;9.0\""
    export TORCH_CUDA_ARCH_LIST
  fi
  log "building mmcv's CUDA ops for arch ${TORCH_CUDA_ARCH_LIST} ($CUDA_TAG)"
fi
KEY="$("$PY" -c 'import sys,sysconfig; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-" + sysconfig.get_platform().replace("-", "_"))')"
ARCH_TAG=""
[[ "$CUDA_TAG" == cpu ]] || ARCH_TAG="-sm$(echo "$TORCH_CUDA_ARCH_LIST" | tr -d '. ' | tr ';' '_')"
WHEEL_DIR="$CACHE/mmcv-$MMCV_VERSION-torch$TORCH_VERSION-$CUDA_TAG$ARCH_TAG-$KEY"
mkdir -p "$WHEEL_DIR"

if ! ls "$WHEEL_DIR"/mmcv-*.whl >/dev/null 2>&1; then
  log "no cached mmcv wheel in $WHEEL_DIR: building mmcv $MMCV_VERSION from source ($MAX_JOBS jobs, several minutes)"
  BUILD="$(mktemp -d)"
  "$PY" -m pip download -q --no-deps --no-build-isolation --no-binary :all: "mmcv==$MMCV_VERSION" -d "$BUILD"
  tar -xzf "$BUILD"/mmcv-*.tar.gz -C "$BUILD"
  SRC="$(ls -d "$BUILD"/mmcv-$MMCV_VERSION)"
  # torch >= 2.13 headers need C++20; mmcv 2.1.0 hard-codes c++14/17.
  sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"
  # mmcv's runtime deps are installed below from PyPI; only build the wheel here.
  (cd "$SRC" && MMCV_WITH_OPS=1 "$PY" -m pip wheel --no-build-isolation --no-deps -w "$WHEEL_DIR" . ) \
    || { rm -f "$WHEEL_DIR"/*.whl; fail "mmcv build failed; see README 'Troubleshooting the mmcv build'"; }
  rm -rf "$BUILD"
else
  log "using cached mmcv wheel: $(ls "$WHEEL_DIR"/mmcv-*.whl)"
fi
"${PIP[@]}" -q --force-reinstall --no-deps "$WHEEL_DIR"/mmcv-*.whl

log "installing mmengine, mmdet, timm, ruff and the test tools"
"${PIP[@]}" -q -r "$ROOT/requirements.txt" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
"${PIP[@]}" -q --no-deps --no-build-isolation -e "$ROOT"

log "checking the installation"
"$PY" - <<'PYCHECK' || fail "installation check failed"
import torch, mmcv, mmengine, mmdet, timm
from mmcv.ops import batched_nms  # needs mmcv._ext
import mmcv._ext  # noqa: F401
import efficientvit_det  # noqa: F401
print(f"[setup] torch {torch.__version__}, mmcv {mmcv.__version__} (ops ok), "
      f"mmengine {mmengine.__version__}, mmdet {mmdet.__version__}, timm {timm.__version__}")
PYCHECK
echo "$INPUTS-$CUDA_TAG" > "$STAMP"
log "environment ready ($VENV)"
