from __future__ import annotations

from pathlib import Path

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
