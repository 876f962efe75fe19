"""The README's examples run as written (issue 35): its Python blocks, executed in a fresh
folder, and what it shows of a training run's last lines, against what training prints."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import REAL_CT, require_shared

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(kind: str) -> list[str]:
    """The README's fenced blocks of language ``kind`` ("" for a bare fence), in order."""
    blocks: list[str] = []
    current: list[str] | None = None
    language = ""
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            if current is None:
                current, language = [], line[3:].strip()
            else:
                if language == kind:
                    blocks.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def _pattern(shown: str) -> re.Pattern[str]:
    """A line the README shows, its ``...`` standing for any figures."""
    return re.compile(".*?".join(re.escape(part) for part in shown.split("...")) + "$")


@pytest.mark.slow
def test_the_python_examples_run_as_written_and_mean_something(tmp_path, monkeypatch):
    """The training example (generate, train the small-data recipe, evaluate on new scans) in an
    empty folder: it ends with a ROC-AUC on the 40 new scans well above chance, and prints no
    progress bar into a log. Then the Classifier example, with its model (runs/demo: the model
    just trained) and its scans (copies of the shared real chest CT) where it names them."""
    real = require_shared(REAL_CT)
    python = _blocks("python")
    assert len(python) == 2, "the README's Python examples changed: update this test"
    classify, training = python
    monkeypatch.chdir(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    scope: dict[str, object] = {}
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        exec(compile(training, "README.md", "exec"), scope)  # noqa: S102 (our own README)
    report = scope["report"]
    assert report.metrics.n == 40  # type: ignore[attr-defined]
    metrics = report.metrics  # type: ignore[attr-defined]
    assert metrics.roc_auc.value >= 0.8, out.getvalue()[-2000:]
    # its labels too, at the threshold chosen on its validation split
    assert metrics.accuracy.value >= 0.75, (metrics.accuracy, metrics.threshold)
    assert "\r" not in err.getvalue() and "it/s" not in err.getvalue()  # no tqdm bar in a log
    # the last lines of a training run, as the README shows them for the demo
    shown = next(b for b in _blocks("") if b.startswith("kept model:")).splitlines()
    printed = out.getvalue().splitlines()
    for line in shown:
        pattern = _pattern(
            line.replace("runs/demo", "runs/try").replace(", 120 scans", ", ... scans")
        )
        assert any(pattern.match(p) for p in printed), (line, printed[-6:])
    (tmp_path / "runs" / "demo").symlink_to(tmp_path / "runs" / "try")
    for name in ("scan.nii.gz", "a.nii.gz", "b.nii.gz"):
        shutil.copy(real / "cip_ct-64_chest.nii.gz", tmp_path / name)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(classify, "README.md", "exec"), {})  # noqa: S102
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "percent confident that CT scan is normal" in lines[1], lines
    assert os.path.exists(tmp_path / "outputs" / "eval" / "metrics.json")
