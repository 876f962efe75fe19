#!/usr/bin/env bash
# Wheels that the lent GPU machines (Python 3.12 with CUDA torch, scipy, matplotlib, pyyaml)
# lack for `python -m benchmarks.run`. Run here, in the repository root; then, on the device,
# `bash benchmarks/gpu.sh "$OUT"` (the install, a version check and section e), or by hand:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && \
#     PYTHONUNBUFFERED=1 python3 -m benchmarks.run --scans 10 --steps 5
# with `.whl` named in the run's carry (it is git-ignored through .git/info/exclude).
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 any; do
    platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl \
    monai==1.6.1 pytorch-ignite==0.5.5 nibabel==5.4.2 isal==1.9.1 tqdm fire termcolor \
    tensorboard tensorboard-data-server protobuf grpcio markdown werkzeug absl-py packaging \
    markupsafe scikit-learn==1.9.1 joblib threadpoolctl
du -sh .whl
