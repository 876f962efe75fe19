"""Cohort-scale inference (issue 33): ``torchrun --nproc_per_node 2 -m app.infer`` splits the
inputs across two CPU processes (gloo-free: no collective at all, each rank writes its own part
of the output folder) and rank 0 joins the parts into the predictions.csv one process writes.
A part cut short (a killed rank) is completed by running the same command again."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

from conftest import REPO, ct_volume, nifti, torchrun

from app.infer import main as infer_main


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "predictions.csv").open() as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def test_two_processes_write_the_file_one_process_writes_and_resume(tmp_path, checkpoint):
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(5):
        nifti(scans / f"s{i}.nii.gz", ct_volume((40, 40, 20), seed=i))
    (scans / "broken.nii.gz").write_bytes(b"\x1f\x8b not gzip")
    single = tmp_path / "single"
    common = ["--checkpoint", str(checkpoint), "--device", "cpu", "--no-progress"]
    assert infer_main([str(scans), "--output", str(single), *common]) == 1  # one failed input
    ranked = tmp_path / "ranked"
    command = [*torchrun(), "-m", "app.infer", str(scans), "--output", str(ranked), *common]

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)

    proc = run()
    assert proc.returncode != 0 and "summary: 5 classified" in proc.stdout, proc.stderr[-2000:]
    assert _rows(ranked) == _rows(single) and len(_rows(single)) == 6
    parts = sorted(p.name for p in (ranked / "ranks").iterdir())
    assert parts == ["rank-0", "rank-1"]
    # rank 1 killed after its first row: no done mark, its part cut short; the same command
    # completes it, and the joined file is again the single process's
    part = ranked / "ranks" / "rank-1"
    (part / ".done").unlink()
    lines = (part / "predictions.csv").read_text().splitlines(keepends=True)
    (part / "predictions.csv").write_text("".join(lines[:2]))
    (ranked / "predictions.csv").unlink()
    proc = run()
    assert "summary: 5 classified" in proc.stdout, proc.stderr[-2000:]
    assert _rows(ranked) == _rows(single)
