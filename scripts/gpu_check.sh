#!/usr/bin/env bash
# The GPU validation run (scripts/gpu_check.py says what it checks and measures), within 8 minutes.
#   bash scripts/gpu_check.sh OUT [--wheels DIR] [gpu_check.py options]    # on a CUDA machine
#   bash scripts/gpu_check.sh OUT --dry-run                                # anywhere: list and parse every command
# --wheels DIR: install the wheels in DIR (scripts/gpu_wheels.sh makes them: the packages the GPU machine lacks, at
# this checkout's tested versions) into a private folder first, for a machine with no package index.
# PYTHON picks the interpreter (default: python3).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "error: usage: bash scripts/gpu_check.sh OUT [--dry-run] [--wheels DIR] [options]" >&2
  exit 2
fi
OUT=$1; shift
PY=${PYTHON:-python3}
WHEELS=""
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
if [ -n "$WHEELS" ]; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then echo "error: no wheels in $WHEELS" >&2; exit 2; fi
  SITE=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || { echo "error: installing the wheels of $WHEELS failed" >&2; exit 2; }
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
# the script keeps to its own budget (480 s); this is the backstop
timeout -k 10 560 "$PY" scripts/gpu_check.py "$OUT" "${ARGS[@]}" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
