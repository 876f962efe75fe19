from __future__ import annotations

from pathlib import Path

import pytest

import app
import nets
import transforms

REPO = Path(__file__).resolve().parent.parent


def test_imported_packages_are_this_projects():
    # `app`, `nets` and `transforms` are generic names that other installs could shadow
    for package in (app, nets, transforms):
        assert Path(package.__file__).resolve().parent.parent == REPO, package.__file__


#: what training alone uses; inference, export and the bundle code never import it
TRAINING = ("app.training", "app.train")


def _imports(path):
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_packages_keep_to_their_roles():
    """Inference, the bundle and data never import training; the portable bundle code, nets and
    transforms never import the app (a bundle carries them alone)."""
    app_dir = REPO / "app"
    users = [app_dir / "infer.py", app_dir / "export.py", app_dir / "evaluate.py"]
    for package in ("inference", "bundle", "data", "evaluation"):
        users += sorted((app_dir / package).rglob("*.py"))
    for path in users:
        wrong = sorted(i for i in _imports(path) if i.startswith(TRAINING))
        assert not wrong, f"{path.relative_to(REPO)} imports {wrong}"
    standalone = [*(app_dir / "bundle" / "portable").glob("*.py")]
    standalone += [*(REPO / "nets").glob("*.py"), *(REPO / "transforms").glob("*.py")]
    for path in standalone:
        wrong = sorted(i for i in _imports(path) if i == "app" or i.startswith("app."))
        assert not wrong, f"{path.relative_to(REPO)} imports {wrong}"


def test_the_app_is_laid_out_by_role():
    top = sorted(p.name for p in (REPO / "app").iterdir() if not p.name.startswith("__"))
    packages = {"bundle", "data", "evaluation", "inference", "training"}
    assert packages <= set(top)
    # the command lines keep their names: python -m app.train | app.infer | app.export | app.data
    assert {"train.py", "infer.py", "export.py", "evaluate.py"} <= set(top)
    assert (REPO / "app" / "data" / "__main__.py").is_file()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        pytest.param([], "pip install --quiet  torch==2.13.0", id="default-index"),
        pytest.param(
            ["TORCH_INDEX=cpu"],
            "pip install --quiet --index-url https://download.pytorch.org/whl/cpu torch==2.13.0",
            id="cpu-only",
        ),
    ],
)
def test_make_setup_installs_the_pinned_torch_from_the_chosen_index(tmp_path, extra, expected):
    """README, set-up: `make setup` takes torch==2.13.0 from the default index (CI: the build it
    has; on Linux x86_64 PyPI's is the CUDA one); `TORCH_INDEX=cpu` the CPU-only build."""
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"  # absent: make plans the whole set-up
    proc = subprocess.run(
        ["make", "-n", "setup", f"VENV={venv}", *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert expected in proc.stdout, proc.stdout
