#!/usr/bin/env bash
# Download, HERE (where pip reaches a registry), the wheels that the lent GPU machine lacks for
# benchmarks/gpu_check.sh: optuna and those of its needs its image does not hold (its list is in
# /work/.library/device/KINDS.md; it has numpy, packaging, pyyaml, tqdm, markupsafe,
# typing-extensions, torch, timm, scikit-learn, scipy, pandas, joblib, rich, matplotlib already).
# SQLAlchemy 2.1 no longer needs greenlet. Versions are those of the project's venv.
# The wheels land in .whl/ at the repo root (ignored via .git/info/exclude: never commit them) and
# travel with `carry: [".whl"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(optuna==5.0.0 alembic==1.20.1 sqlalchemy==2.1.9 colorlog==6.12.0 mako==1.4.3)
grep -qxF '/.whl/' "$(git rev-parse --git-common-dir)/info/exclude" 2>/dev/null \
  || echo '/.whl/' >> "$(git rev-parse --git-common-dir)/info/exclude"
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
ls -l .whl
du -sh .whl
