#!/usr/bin/env bash
# The GPU checks in one command, for a lent GPU machine (Python 3.12 with CUDA torch, scipy,
# matplotlib, pyyaml; no MONAI, Ignite, nibabel, isal, no network). Here, first:
#   bash benchmarks/device_wheels.sh            # the missing wheels into .whl/ (git-ignored)
# then, there, with `.whl` carried and $OUT the folder that comes back:
#   bash benchmarks/gpu.sh "$OUT"
# Writes OUT/versions.txt, OUT/results.json (benchmarks/run.py --only e: epochs of 140 scans with
# validation of 60, at batch 2 and 32, samples/s, peak GPU memory, synchronisations per step)
# and OUT/log.txt; then the wall time of a 5-fold cross-validation (the reference recipe at
# 128x128x64, 10 epochs a fold, 200 generated scans) in OUT/cv5_seconds.txt with its summary.
set -euo pipefail
out="${1:?usage: bash benchmarks/gpu.sh OUT_FOLDER}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
python3 - <<'PY' | tee "$out/versions.txt"
import ignite, monai, nibabel, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "monai", monai.__version__,
      "ignite", ignite.__version__, "nibabel", nibabel.__version__)
assert torch.cuda.is_available(), "no CUDA device visible"
print(torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB",
      "bf16", torch.cuda.is_bf16_supported())
PY
python3 -m benchmarks.run --only e --out "$out" 2>&1 | tee "$out/log.txt"
python3 -m app.data synth /tmp/cv200 --per-class 100 --shape 128 128 40 --seed 0 >>"$out/log.txt"
python3 - "$out" <<'PY'
import shutil, subprocess, sys, time
out = sys.argv[1]
start = time.perf_counter()
subprocess.run([sys.executable, "-m", "app.train", "--data", "/tmp/cv200", "--folds", "5",
                "--output", "/tmp/cv5", "--epochs", "10", "--no-progress"], check=True,
               stdout=open(f"{out}/cv5.log", "w"), stderr=subprocess.STDOUT)
seconds = time.perf_counter() - start
open(f"{out}/cv5_seconds.txt", "w").write(f"{seconds:.1f}\n")
print(f"5-fold cross-validation, 10 epochs a fold: {seconds:.1f} s")
for name in ("cv_summary.csv", "cv_calibration.json"):
    shutil.copy(f"/tmp/cv5/{name}", out)
PY
