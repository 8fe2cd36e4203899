#!/usr/bin/env bash
# One-shot check of the toolkit on a lent CUDA machine (an H200 with CUDA PyTorch, timm and
# transformers, no package registry). Run from the repo root, with the wheels of
# benchmarks/fetch_gpu_wheels.sh carried in .whl/ (run tool: carry [".whl"]). Everything goes into
# one log, $OUT/gpu_check.log (./gpu_check.log when OUT is unset). Exit status: non-zero if the
# wheels did not install or any step of benchmarks/gpu_check.py failed (each step still runs).
#
#   bash benchmarks/gpu_check.sh                  # the GPU check (~2-4 min on one H200; capped at 7.5 min)
#   bash benchmarks/gpu_check.sh --cpu --tiny     # its CPU parts, anywhere (arguments go to gpu_check.py)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
echo "=== gpu_check $(date -u +%FT%TZ)  commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
nproc; "$PY" -V

if ls .whl/*.whl >/dev/null 2>&1; then
  echo "=== installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "FAIL: wheel install"; exit 3; }
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "=== no .whl/ here: using what $PY has"
  export PYTHONPATH=$PWD
fi
"$PY" - <<'PYEOF' || { echo "FAIL: imports"; exit 4; }
import importlib
for name in ("torch", "timm", "optuna", "sqlalchemy", "alembic", "sklearn", "scipy", "pandas", "numpy", "rich", "yaml",
             "matplotlib", "joblib", "pytest", "abaw", "abaw.models", "abaw.tune"):
    m = importlib.import_module(name)
    print(f"  {name:12s} {getattr(m, '__version__', '')}")
PYEOF

timeout -k 10 450 "$PY" -u benchmarks/gpu_check.py --work /tmp/gpu_check "$@"
rc=$?
[ $rc -eq 124 ] && echo "FAIL: gpu_check.py ran past 450 s and was stopped"
echo "=== gpu_check.sh exit $rc"
exit $rc
