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
TRAINING_MODULES = ("app.train", "app.handlers", "app.engine", "app.datasets", "app.distributed")
INFERENCE_MODULES = (
    "infer",
    "classifier",
    "model_card",
    "scanqc",
    "predictions",
    "report",
    "plots",
    "export",
)


def _imports(path):
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_inference_never_imports_training_and_nets_transforms_never_import_app():
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    for name in INFERENCE_MODULES:
        imported = _imports(repo / "app" / f"{name}.py")
        wrong = sorted(i for i in imported if i.startswith(TRAINING_MODULES))
        assert not wrong, f"app/{name}.py imports {wrong}"
    for package in ("nets", "transforms"):
        for path in (repo / package).glob("*.py"):
            wrong = sorted(i for i in _imports(path) if i == "app" or i.startswith("app."))
            assert not wrong, f"{package}/{path.name} imports {wrong}"
    for path in (repo / "app" / "portable").glob("*.py"):  # travels in bundles: stands alone
        wrong = sorted(i for i in _imports(path) if i == "app" or i.startswith("app."))
        assert not wrong, f"app/portable/{path.name} imports {wrong}"
