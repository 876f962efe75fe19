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
    """Inference, the bundle exporter, the runtime and data never import training; the runtime
    (what a bundle carries), nets and transforms never import the rest of the app."""
    app_dir = REPO / "app"
    users = [app_dir / "infer.py", app_dir / "export.py", app_dir / "evaluate.py"]
    for package in ("inference", "bundle", "runtime", "data", "evaluation"):
        users += sorted((app_dir / package).rglob("*.py"))
    for path in users:
        wrong = sorted(i for i in _imports(path) if i.startswith(TRAINING))
        assert not wrong, f"{path.relative_to(REPO)} imports {wrong}"
    standalone = [*(app_dir / "runtime").glob("*.py")]
    standalone += [*(REPO / "nets").glob("*.py"), *(REPO / "transforms").glob("*.py")]
    for path in standalone:
        wrong = sorted(i for i in _imports(path) if i == "app" or i.startswith("app."))
        assert not wrong, f"{path.relative_to(REPO)} imports {wrong}"


def _app_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((REPO / "app").rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def _app_imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The app modules ``name`` imports anywhere in it (module level or in a function)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, *([node.module] if node.module else [])])
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def test_no_import_cycle_in_the_app():
    """No two app modules import each other, directly or around a loop, even inside a
    function: the layers read from the bottom up (report.py and workflow.py did)."""
    modules = _app_modules()
    graph = {name: _app_imports(name, path, modules) for name, path in modules.items()}
    assert graph["app.evaluation.report"], "the walk finds imports at all"
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for other in sorted(graph[name]):
            assert state.get(other) != 1, " -> ".join([*trail, name, other])
            if other not in state:
                visit(other, [*trail, name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


#: the app's layers from the bottom up (docs/architecture.md's table): a module imports only
#: from its own layer and those below it
LAYERS = (
    ("app.runtime",),
    ("app", "app.errors", "app.config", "app.cli", "app.run_folder", "app.model_settings",
     "app.readback", "app.plots"),
    ("app.data",),
    ("app.inference",),
    ("app.evaluation",),
    ("app.training",),
    ("app.bundle",),
)  # fmt: skip
COMMAND_LINES = ("app.train", "app.infer", "app.evaluate", "app.export", "app.pretrain",
                 "app.serve", "app.data.cli", "app.data.__main__")  # fmt: skip


def _layer(name: str) -> int:
    if name in COMMAND_LINES:
        return len(LAYERS)
    for i, members in enumerate(LAYERS):
        if name in members or any(name.startswith(m + ".") for m in members if m != "app"):
            return i
    raise AssertionError(f"{name} is in no layer of docs/architecture.md")


def test_every_import_goes_down_the_layers():
    """The layers of docs/architecture.md, held: no module imports from a layer above its own
    (the exporter beside the runtime made app/bundle both the bottom and the top)."""
    modules = _app_modules()
    upward = [
        f"{name} -> {other}"
        for name, path in modules.items()
        for other in sorted(_app_imports(name, path, modules))
        if _layer(other) > _layer(name)
    ]
    assert upward == []


def test_the_exporter_is_imported_by_the_export_command_alone():
    """``app/bundle/`` holds the exporter; the runtime a bundle carries is ``app.runtime``."""
    modules = _app_modules()
    users = sorted(
        name
        for name, path in modules.items()
        if not name.startswith("app.bundle")
        and any(i.startswith("app.bundle") for i in _app_imports(name, path, modules))
    )
    assert users == ["app.export"]
    assert sorted(p.name for p in (REPO / "app" / "bundle").iterdir() if p.suffix == ".py") == [
        "__init__.py",
        "export.py",
    ]


def test_the_app_is_laid_out_by_role():
    top = sorted(p.name for p in (REPO / "app").iterdir() if not p.name.startswith("__"))
    packages = {"bundle", "data", "evaluation", "inference", "runtime", "training"}
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


def _functions_longer_than(limit):
    import ast

    out = []
    for root in ("app", "nets", "transforms"):
        for path in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > limit:
                        out.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines})")
    return out


def test_no_function_is_longer_than_80_lines():
    """A reader holds a function in mind: the long ones are split into named steps."""
    assert _functions_longer_than(80) == []
    assert _functions_longer_than(70)  # the walk finds functions at all


def test_the_architecture_page_names_every_module():
    """The other way round: every module of the app, nets and transforms is on the page."""
    text = (REPO / "docs" / "architecture.md").read_text()
    modules = [
        p.relative_to(REPO).as_posix()
        for root in ("app", "nets", "transforms")
        for p in sorted((REPO / root).rglob("*.py"))
        if p.name not in ("__init__.py", "__main__.py")
    ]
    assert len(modules) > 50
    assert [m for m in modules if f"`{m}`" not in text] == []


def test_the_architecture_page_names_what_exists():
    """Every file, test, class, constant and attribute docs/architecture.md cites exists."""
    import importlib
    import re

    text = (REPO / "docs" / "architecture.md").read_text()
    names = set(re.findall(r"`([^`\s]+)`", text))
    sources = [p for root in ("app", "nets", "transforms") for p in (REPO / root).rglob("*.py")]
    code = "\n".join(p.read_text() for p in sources)
    file_names = {p.name for p in sources} | {p.name for p in (REPO / "tests").glob("*.py")}
    missing, checked = [], 0
    for name in sorted(names):
        if name.startswith("scripts/"):  # a folder of an exported bundle
            ok = (
                name.rstrip("/").replace("/", ".") + "."
                in (REPO / "app/bundle/export.py").read_text()
            )
        elif "::" in name:  # a test
            path, test = name.split("::")
            ok = (REPO / path).is_file() and f"def {test}(" in (REPO / path).read_text()
        elif name.endswith((".py", "/")) and "/" in name.rstrip("/"):
            ok = (REPO / name).exists()
        elif name.endswith(".py"):
            ok = name in file_names
        elif re.fullmatch(r"[A-Z][A-Za-z0-9_]*", name):  # a class or a constant
            ok = bool(re.search(rf"^(class {name}\b|{name}\s*[:=])", code, re.M))
            ok = ok or any(hasattr(importlib.import_module(m), name) for m in THIRD_PARTY)
        elif re.fullmatch(r"[A-Z]\w*\.\w+", name):  # Class.attribute
            cls, attr = name.split(".")
            body = re.search(rf"^class {cls}\b.*?(?=^\S)", code + "\nEND", re.M | re.S)
            ok = body is not None and bool(re.search(rf"(def {attr}\b|\b{attr}\s*[:=])", body[0]))
        elif re.fullmatch(r"app(\.\w+)+", name):  # a module, or a module's attribute
            module, _, attr = name.rpartition(".")
            try:
                ok = hasattr(importlib.import_module(module), attr)
            except ImportError:
                ok = False
            ok = ok or importlib.util.find_spec(name) is not None
        else:
            continue
        checked += 1
        if not ok:
            missing.append(name)
    assert missing == []
    assert checked >= 40


#: where the page's library names (``LoadImaged``, ``Engine``) come from
THIRD_PARTY = ("monai.transforms", "ignite.engine")


def _pages() -> list[Path]:
    """The README, docs/, and the studies' and benchmarks' READMEs and log."""
    folders = ("docs", "studies", "benchmarks")
    return [REPO / "README.md", *(p for f in folders for p in sorted((REPO / f).glob("*.md")))]


def test_the_docs_cite_commands_and_scripts_that_exist():
    """Every ``python -m benchmarks.NAME`` / ``studies.NAME`` / ``testdata.NAME`` and every
    ``benchmarks/``, ``studies/``, ``testdata/`` file the pages name exists (they moved apart
    in issue 32), and no page runs a script by its path any more."""
    import re

    missing, cited = [], 0
    for page in _pages():
        text = page.read_text()
        for package, name in re.findall(r"python -m (benchmarks|studies|testdata)\.(\w+)", text):
            cited += 1
            if name != "NAME" and not (REPO / package / f"{name}.py").is_file():
                missing.append(f"{page.name}: python -m {package}.{name}")
        for path in re.findall(r"\b((?:benchmarks|studies|testdata)/\w+\.(?:py|sh|md))", text):
            cited += 1
            if not (REPO / path).is_file():
                missing.append(f"{page.name}: {path}")
        assert not re.search(r"python3? (benchmarks|studies|testdata)/\w+\.py", text), page.name
    assert missing == []
    assert cited >= 30


def test_the_docs_cite_tests_that_exist():
    """Every ``tests/FILE.py::test`` (and each ``::test`` after it on the same line) the README
    and docs/ cite is a test of that file."""
    import re

    missing, cited = [], 0
    for page in _pages():
        for line in page.read_text().splitlines():
            current = None
            for path, name in re.findall(r"`(tests/\w+\.py)?::(\w+)", line):
                current = path or current
                if current is None:
                    continue
                cited += 1
                file = REPO / current
                if not file.is_file() or not re.search(rf"^def {name}\(", file.read_text(), re.M):
                    missing.append(f"{page.name}: {current}::{name}")
    assert missing == []
    assert cited >= 30


def test_each_file_name_is_spelled_once_in_the_app():
    """A file the app writes or reads (``metrics.json``, ``predictions.csv``, ``report.html``...)
    is named by one string in the code (``app.run_folder`` and its peers), so a rename cannot
    miss a spelling; help texts and messages may mention it."""
    import collections
    import io
    import re
    import tokenize

    places = collections.defaultdict(list)
    for path in sorted((REPO / "app").rglob("*.py")):
        tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
        for tok in tokens:
            found = re.fullmatch(r"[rbu]*(['\"])([\w.-]+\.(?:json|csv|png|html|pt))\1", tok.string)
            if tok.type == tokenize.STRING and found:
                places[found.group(2)].append(f"{path.relative_to(REPO)}:{tok.start[0]}")
    assert {"metrics.json", "predictions.csv", "report.html", "best_model.pt"} <= set(places)
    assert {name: where for name, where in places.items() if len(where) > 1} == {}
