"""``pip install .`` as a user does it (issue 32): the wheel, not an editable install, into a
fresh environment, then the commands from another folder. ``python -m app.infer --help`` once
failed with ``FileNotFoundError: .../site-packages/configs/common.yaml``: the configs were not
package data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, in_ci

#: the pinned PyTorch the README installs first (its CPU build: see the README's set-up)
TORCH = "torch==2.13.0"


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 900):
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment with the project's wheel and its dependencies."""
    tmp = tmp_path_factory.mktemp("install")
    # built from a copy of the sources: a build/ folder an earlier build left in the checkout
    # would put its stale files into the wheel
    source = tmp / "src"
    top = {".git", "build", "dist", "runs", "outputs", "data", ".cache"}

    def skipped(folder: str, names: list[str]) -> set[str]:
        at_top = Path(folder) == REPO
        return {n for n in names if (at_top and (n in top or n.startswith(".venv")))
                or n.endswith(".egg-info") or n == "__pycache__"}  # fmt: skip

    shutil.copytree(REPO, source, ignore=skipped)
    wheel = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp), str(source)], tmp
    )
    assert wheel.returncode == 0, wheel.stderr[-2000:]
    env = tmp / "env"
    assert _run([sys.executable, "-m", "venv", str(env)], tmp).returncode == 0
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    wheels = sorted(tmp.glob("ctclassify-*.whl"))
    for step in ([TORCH], [str(wheels[-1])]):
        proc = _run([*pip, *step], tmp)
        if proc.returncode != 0:
            if in_ci():
                pytest.fail(f"pip install {step} failed in CI:\n{proc.stderr[-2000:]}")
            pytest.skip(f"the package registry cannot be reached to install {step}")
    return env


@pytest.mark.slow
def test_the_installed_wheel_runs_from_another_folder(installed, tmp_path):
    """From a folder that is not the repository: --help of every command; the demo (its data
    made small in this throwaway environment's own demo.yaml); app.infer on the demo's scans;
    app.export. The installed code and configs are used, not the checkout's."""
    python = str(installed / "bin" / "python")
    where = _run([python, "-c", "import app.config as c; print(c.CONFIG_DIR)"], tmp_path)
    configs = Path(where.stdout.strip())
    assert configs.is_relative_to(installed) and (configs / "common.yaml").is_file(), where
    for command in ("app.train", "app.infer", "app.evaluate", "app.export", "app.data"):
        proc = _run([python, "-m", command, "--help"], tmp_path)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (command, proc.stderr[-2000:])
    demo = (configs / "demo.yaml").read_text()
    demo = demo.replace("per_class: 200", "per_class: 4").replace("[128, 128, 40]", "[48, 48, 16]")
    (configs / "demo.yaml").write_text(demo.replace("\nepochs: 10", "\nepochs: 1"))
    env = {**os.environ, "CTCLASSIFY_CACHE": str(tmp_path / "cache")}
    small = ["--no-progress", "--spatial-size", "48", "48", "48", "--device", "cpu"]
    proc = _run([python, "-m", "app.train", "--demo", "--output", "R", *small], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "R" / "best_model.pt").is_file()
    proc = _run(
        [python, "-m", "app.infer", "cache", "--checkpoint", "R", "--output", "O", "--no-progress"],
        tmp_path,
    )
    assert proc.returncode == 0 and "8 classified" in proc.stdout, proc.stderr[-3000:]
    proc = _run(
        [python, "-m", "app.export", "--checkpoint", "R", "--output", "B", "--no-onnx"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "B" / "LICENSE").read_text() == (REPO / "LICENSE").read_text()
    assert (tmp_path / "B" / "docs" / "data_license.md").is_file()
