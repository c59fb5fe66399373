#!/usr/bin/env bash
# The GPU check, one command on the lent device machine (repo root; carry .whl, see device_wheels.sh):
#   bash scripts/device_check.sh            # writes $OUT/device_check.json and $OUT/device_check.log
# Checks, each a PASS/FAIL line: the device is seen; the bundled brain model segments the same synthetic
# head on the GPU as on the CPU (same gate decision, label agreement); `bench segment` on the GPU; a tiny
# `uharmony train` with AMP on the GPU whose package then segments there. DEVICE=cpu runs the same steps
# on the CPU (how the script itself is tested where there is no GPU). Needs about 3 minutes.
set -uo pipefail
OUT=${OUT:-/tmp/uharmony-device-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "FAIL could not install the carried wheels"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
"$PY" scripts/device_check.py --out "$OUT" --device "${DEVICE:-auto}" 2>&1 | tee "$OUT/device_check.log"
