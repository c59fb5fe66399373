#!/usr/bin/env bash
# Run HERE (a machine with PyPI), in the repo's root, before a device check: downloads into .whl/ the
# wheels that the lent GPU machine's image lacks (it has python 3.12 with torch, scipy, matplotlib,
# safetensors, tqdm, pytest; nothing can be fetched there). SimpleITK (50 MB, only for NRRD/DICOM) and
# flwr are left out: the check reads and writes NIfTI and trains no federation.
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
PY=${PYTHON:-python3}
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for spec in monai==1.6.1 nibabel==5.4.2 jsonschema==4.26.0 jsonschema-specifications referencing rpds-py \
            platformdirs==4.14.7; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d .whl "$spec"
done
ls -la .whl && du -sh .whl
