#!/usr/bin/env bash
# Download the wheels that scripts/gpu_check.sh --wheels DIR installs on the GPU machine (Python 3.12, x86-64, no
# package index there): every package the recipes and tests need that the machine's image lacks
# (scripts/gpu_machine_packages.txt), at the versions of this environment (the ones the test suite passes with),
# plus fla-core.  `python scripts/gpu_check.py wheels` prints the list.
#   bash scripts/gpu_wheels.sh [DIR]      # default .whl (git-ignored through .git/info/exclude); about 40 MB
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PYTHON:-.venv/bin/python}
mapfile -t REQS < <("$PY" scripts/gpu_check.py wheels)
mkdir -p "$DIR"
grep -qx "/$DIR/" .git/info/exclude 2>/dev/null || echo "/$DIR/" >> .git/info/exclude
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DIR" "${REQS[@]}"
echo "$(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1), in $DIR"
