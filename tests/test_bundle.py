"""The bundle: configs as the single source of truth, and the exported bundle running with MONAI alone."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import bundle_run_args, require_module, synth_dataset
from monai.bundle import ConfigWorkflow

from app.bundle.export import monai_bundle
from app.config import CONFIG_DIR, config_files
from app.export import main as export_main
from app.infer import main as infer_main
from app.train import main as train_main

REQUIRED_METADATA = (
    "version",
    "changelog",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "task",
    "description",
    "authors",
    "copyright",
    "data_source",
    "data_type",
    "image_classes",
    "label_classes",
    "pred_classes",
    "intended_use",
    "references",
    "network_data_format",
)


def config_workflow(files: list[str], kind: str, **overrides) -> ConfigWorkflow:
    """MONAI's ConfigWorkflow over common.yaml + ``files``, initialised (as monai.bundle run)."""
    flow = ConfigWorkflow(
        config_file=config_files(*files),
        meta_file=str(CONFIG_DIR / "metadata.json"),
        workflow_type=kind,
        logging_file=str(CONFIG_DIR / "logging.conf"),
        **overrides,
    )
    flow.initialize()
    return flow


@pytest.mark.parametrize(
    ("files", "kind"),
    [
        pytest.param(["train.yaml"], "train", id="train"),
        pytest.param(["inference.yaml"], "infer", id="inference"),
    ],
)
def test_workflow_properties(files, kind, tmp_path):
    synth_dataset(tmp_path / "d", 2, (48, 48, 8))
    workflow = ConfigWorkflow(
        config_file=config_files(*files),
        meta_file=str(CONFIG_DIR / "metadata.json"),
        workflow_type=kind,
        logging_file=str(CONFIG_DIR / "logging.conf"),
        dataset_dir=str(tmp_path / "d"),
        output_dir=str(tmp_path / "out"),
    )
    workflow.initialize()
    assert not workflow.check_properties()


def test_metadata_has_the_bundle_specification_fields():
    meta = json.loads((CONFIG_DIR / "metadata.json").read_text())
    assert all(key in meta for key in REQUIRED_METADATA)
    assert meta["version"] in meta["changelog"]
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["spatial_shape"] == [128, 128, 64] and image["num_channels"] == 1
    assert image["value_range"] == [0, 1] and image["is_patch_data"] is False
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {"0": "abnormal"} and pred["spatial_shape"] == [1]


#: files a workflow reads together (common.yaml with one of the others); overlays on top of them
#: (demo.yaml, evaluate.yaml, multi_gpu_train.yaml, recipes/) exist to redefine ids and are
#: checked apart
BASE_CONFIGS = ("common.yaml", "train.yaml", "inference.yaml")
OVERLAYS = ("demo.yaml", "evaluate.yaml", "multi_gpu_train.yaml", "recipes/small-data.yaml")
#: each workflow's own entry points, as MONAI bundles name them
ENTRY_IDS = {"imports", "run", "initialize", "finalize"}


def test_no_id_is_defined_in_two_config_files():
    """Every setting once: no two base files define the same id (runtime ids shared by training
    and inference live in common.yaml), and an overlay redefines only ids that exist."""
    import itertools

    import yaml

    files = {name: yaml.safe_load((CONFIG_DIR / name).read_text()) for name in BASE_CONFIGS}
    for (a, first), (b, second) in itertools.combinations(files.items(), 2):
        twice = set(first) & set(second) - ENTRY_IDS
        assert not twice, f"{a} and {b} both define {sorted(twice)}"
    known = set().union(*files.values())
    for name in OVERLAYS:
        overlay = yaml.safe_load((CONFIG_DIR / name).read_text())
        for key in overlay:
            root = key.lstrip("+").split("#")[0]
            assert (
                root in known or key in ("demo_data", "backend", "evaluation") or root in ENTRY_IDS
            ), f"{name} redefines {key!r}, which no base config defines"
    text = "".join((CONFIG_DIR / n).read_text() for n in (*BASE_CONFIGS, *OVERLAYS))
    assert "#0" not in text and "#1" not in text  # ids by name, never by list position
    assert "SPEC.md" not in text  # a user's clone has no SPEC.md: cite the Keras example


BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = set({blocked!r})

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked: the bundle must run with its requirements alone")
            return None

    sys.meta_path.insert(0, Block())
    """
)


def _outside_requirements(meta: dict) -> set[str]:
    """Top-level modules of every installed distribution that neither the bundle's metadata
    requires (monai, torch, numpy and ``required_packages_version``) nor one of those needs,
    plus this app's own packages: what an environment holding only the requirements lacks."""
    import re
    from importlib.metadata import PackageNotFoundError, packages_distributions, requires

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    todo = ["monai", "torch", "numpy", *meta["required_packages_version"]]
    allowed: set[str] = set()
    while todo:
        name = norm(todo.pop())
        if name in allowed:
            continue
        allowed.add(name)
        try:
            needs = requires(name) or []
        except PackageNotFoundError:
            continue
        for req in needs:
            if "extra ==" in req:
                continue  # optional extras are not installed by the requirement
            todo.append(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
    blocked = {"app", "nets", "transforms"}
    for module, dists in packages_distributions().items():
        if module.startswith("_") or not module.isidentifier():
            continue
        if not any(norm(d) in allowed for d in dists):
            blocked.add(module)
    return blocked


@pytest.mark.slow
def test_exported_bundle_runs_with_monai_alone(tmp_path, real_ct):
    data, run, bundle = tmp_path / "d", tmp_path / "run", tmp_path / "bundle"
    synth_dataset(data, 4, (64, 64, 16))
    assert (
        train_main(
            [
                "--data",
                str(data),
                "--output",
                str(run),
                "--epochs",
                "1",
                "--spatial-size",
                "48",
                "48",
                "48",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert export_main(["--checkpoint", str(run), "--output", str(bundle), "--zip"]) == 0
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    assert (
        export_main(["--checkpoint", str(run), "--output", str(bundle)]) == 2
    )  # never overwritten silently
    assert export_main(["--checkpoint", str(run), "--output", str(bundle), "--overwrite"]) == 0
    for name in (
        "configs/metadata.json",
        "configs/inference.yaml",
        "models/model.pt",
        "models/model.ts",
        "models/model.onnx",
        "scripts/nets/cnn3d.py",
        "docs/README.md",
        "LICENSE",
    ):
        assert (bundle / name).is_file(), name
    assert (tmp_path / "bundle.zip").is_file()
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [48, 48, 48]

    # built from the checkpoint's own record: a model trained on generated data says so
    assert "generated by ctclassify" in meta["data_source"] and "MosMed" not in meta["data_source"]
    assert f"Dense {512}" in meta["description"] and "dense 512)" not in meta["description"]
    readme = (bundle / "docs/README.md").read_text()
    assert "Trained on generated scans, not on real CT" in readme
    required = {"monai", "torch", "numpy", *meta["required_packages_version"]}
    assert {"pytorch-ignite", "nibabel", "scipy", "pydicom"} <= required
    for name in required:  # the README's pip line is the metadata's list, exactly
        assert f" {name}==" in readme, name

    scans = tmp_path / "scans"
    scans.mkdir()
    for name in (
        "cip_ct-64_chest.nii.gz",
        "totalsegmentator_example_ct_sm.nii.gz",
        "mosmeddata_CT-1_study_0255_mask.nii.gz",  # a mask, not CT in HU: a failed row
    ):
        (scans / name).write_bytes((real_ct / name).read_bytes())
    shutil.copytree(real_ct / "cip_ct-64_dicom", scans / "series")  # the bundle reads DICOM too
    mixed = scans / "two_series"  # one folder, two one-slice series: two failed rows
    mixed.mkdir()
    for name in ("cip_ct-64_dicom/IMG0001.dcm", "dcmqi_ct-3slice_dicom/01.dcm"):
        shutil.copy(real_ct / name, mixed / Path(name).name)
    two = scans / "two_slices"  # a 2-slice series once killed the whole run: now classified, warned
    two.mkdir()
    for name in ("IMG0001.dcm", "IMG0002.dcm"):
        shutil.copy(real_ct / "cip_ct-64_dicom" / name, two / name)
    (scans / "broken.nii.gz").write_bytes(b"\x1f\x8b" + b"not really gzip" * 10)
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    blocked = _outside_requirements(meta)
    assert {"sklearn", "matplotlib", "app"} <= blocked and not {"monai", "ignite"} & blocked
    (blocker / "sitecustomize.py").write_text(BLOCKER.format(blocked=sorted(blocked)))
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{bundle}"}
    meta_args = ["--meta_file", "configs/metadata.json", "--config_file", "configs/inference.yaml"]
    commands = [
        ["verify_net_in_out", "network_def", *meta_args],
        [
            "ckpt_export",
            "network_def",
            "--filepath",
            "model.ts",
            "--ckpt_file",
            "models/model.pt",
            *meta_args,
        ],
        bundle_run_args(scans, tmp_path / "bundle_out"),
    ]
    for args in commands:
        proc = monai_bundle(args, cwd=bundle, env=env, timeout=300)
        # run: status 1, some inputs failed (README of the bundle); the good ones classified
        assert proc.returncode == (1 if args[0] == "run" else 0), (args[0], proc.stderr[-3000:])
        if args[0] == "run":
            assert "summary: 4 classified, 4 failed" in proc.stdout, proc.stdout[-2000:]
    for module in ("app", "sklearn", "matplotlib"):
        probe = subprocess.run(
            [sys.executable, "-c", f"import {module}"], cwd=bundle, env=env, capture_output=True
        )
        assert probe.returncode != 0, module  # the blocker works: the commands ran without it

    assert (
        infer_main(
            [
                str(scans),
                "--checkpoint",
                str(run),
                "--output",
                str(tmp_path / "app_out"),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 1  # the mask, the broken file, the 2-slice and the two one-slice series fail
    )
    with (tmp_path / "bundle_out" / "predictions.csv").open() as f:
        bundle_rows = list(csv.DictReader(f))
    from_bundle = {
        Path(r["path"]).name: float(r["prob_abnormal"]) for r in bundle_rows if r["prob_abnormal"]
    }
    with (tmp_path / "app_out" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    from_app = {Path(r["path"]).name: float(r["prob_abnormal"]) for r in rows if r["prob_abnormal"]}
    assert sum(1 for r in rows if "two_series#" in r["path"] and r["error"]) == 2
    # the same rows, errors and warnings from the bundle as from app.infer: one set of checks
    by_path = {r["path"]: r for r in rows}
    assert sorted(by_path) == sorted(r["path"] for r in bundle_rows)
    for row in bundle_rows:
        mine = by_path[row["path"]]
        assert row["error"] == mine["error"] and row["warnings"] == mine["warnings"], row
    assert (
        "label map or mask"
        in by_path[str(scans / "mosmeddata_CT-1_study_0255_mask.nii.gz")]["error"]
    )
    assert from_bundle.keys() == from_app.keys() and len(from_app) == 4, (from_bundle, from_app)
    for name, prob in from_app.items():
        assert abs(from_bundle[name] - prob) < 1e-5, name
    # app.infer also takes the bundle folder itself, reading its settings without evaluating it
    assert (
        infer_main(
            [
                str(scans),
                "--checkpoint",
                str(bundle),
                "--output",
                str(tmp_path / "b2"),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 1  # the same two one-slice series
    )
    with (tmp_path / "b2" / "predictions.csv").open() as f:
        via_bundle = {
            Path(r["path"]).name: float(r["prob_abnormal"])
            for r in csv.DictReader(f)
            if r["prob_abnormal"]
        }
    assert via_bundle == from_app  # the bundle's weights and settings: the same probabilities

    # TorchScript and ONNX equal PyTorch
    from app.inference.classifier import Classifier

    net = Classifier.load(run, device="cpu").network
    x = torch.rand(2, 1, 48, 48, 48)
    with torch.no_grad():
        expected = net(x).numpy()
        scripted = torch.jit.load(str(bundle / "models/model.ts"))(x).numpy()
    np.testing.assert_allclose(scripted, expected, atol=1e-4)
    ort = require_module("onnxruntime")
    session = ort.InferenceSession(str(bundle / "models/model.onnx"))
    np.testing.assert_allclose(
        session.run(None, {"image": x.numpy()})[0], expected, atol=1e-4, rtol=1e-5
    )


@pytest.mark.parametrize(
    "content",
    [
        pytest.param({"report.docx": "x"}, id="foreign-folder"),
        pytest.param(
            {"configs/metadata.json": "{}", "mine.txt": "x"}, id="bundle-plus-foreign-file"
        ),
    ],
)
def test_export_overwrite_refuses_a_folder_that_is_not_a_bundle(
    tmp_path, checkpoint, content, capsys
):
    target = tmp_path / "target"
    for name, text in content.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_text(text)
    code = export_main(["--checkpoint", str(checkpoint), "--output", str(target), "--overwrite"])
    assert code == 2 and "does not look like a bundle folder" in capsys.readouterr().err
    assert {str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()} == set(content)


def test_train_evaluate_infer_through_the_configs(tmp_path):
    """As model-zoo bundles test themselves: the real workflows, from the configs alone (no
    app.train / app.infer), on tiny generated data with overrides."""
    import torch

    data = synth_dataset(tmp_path / "d", 3, (48, 48, 12))
    run, out = tmp_path / "run", tmp_path / "pred"
    model = {
        "spatial_size": [48, 48, 48],
        "filters": [4, 4, 8, 8],
        "dense_units": 8,
        "device": "$torch.device('cpu')",
        "progress": False,
    }

    def workflow(files: list[str], kind: str, **overrides) -> ConfigWorkflow:
        flow = config_workflow(files, kind, **model, **overrides)
        flow.run()
        flow.finalize()
        return flow

    workflow(["train.yaml"], "train", dataset_dir=str(data), output_dir=str(run), epochs=1)
    best = run / "best_model.pt"
    assert best.is_file() and (run / "metrics.csv").is_file()
    # resume is config-native: the same workflow with resume=true continues the run
    workflow(
        ["train.yaml"], "train", dataset_dir=str(data), output_dir=str(run), epochs=2, resume=True
    )
    with (run / "metrics.csv").open() as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]
    assert sorted(p.name for p in run.glob("last_checkpoint_epoch=*.pt")) == [
        "last_checkpoint_epoch=2.pt"
    ]
    assert torch.load(best, weights_only=True)["run_info"]["spatial_size"] == [48, 48, 48]

    evaluation = workflow(
        ["train.yaml", "evaluate.yaml"],
        "eval",
        dataset_dir=str(data),
        output_dir=str(tmp_path / "e"),
        ckpt_path=str(best),
    )
    metrics = evaluation.parser.get_parsed_content("validate#evaluator").state.metrics
    assert {"val_acc", "val_auc", "val_loss"} <= set(metrics)
    assert (
        evaluation.parser.get_parsed_content("validate#evaluator").state.iteration == 3
    )  # 6 scans

    workflow(
        ["inference.yaml"], "infer", dataset_dir=str(data), output_dir=str(out), ckpt_path=str(best)
    )
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(0.0 <= float(r["prob_abnormal"]) <= 1.0 for r in rows)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bundle_run_and_app_infer_give_the_same_probabilities(tmp_path, checkpoint, precision):
    """One inference path: the repository's inference.yaml under MONAI's workflow and
    python -m app.infer build the same preprocessing, inferer and postprocessing."""
    from conftest import TINY_SETTINGS, ct_volume, nifti

    from app.infer import main as infer_main

    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(5):
        nifti(scans / f"s{i}.nii.gz", ct_volume((48, 48, 20), seed=i))
    model = {k: TINY_SETTINGS[k] for k in ("spatial_size", "filters", "dense_units")}
    flow = config_workflow(
        ["inference.yaml"],
        "infer",
        dataset_dir=str(scans),
        output_dir=str(tmp_path / "bundle"),
        ckpt_path=str(checkpoint),
        precision=precision,
        device="$torch.device('cpu')",
        **model,
    )
    flow.run()
    args = [str(scans), "--checkpoint", str(checkpoint), "--output", str(tmp_path / "app")]
    assert infer_main([*args, "--precision", precision, "--device", "cpu", "--no-progress"]) == 0

    def probabilities(folder):
        with (folder / "predictions.csv").open() as f:
            return {
                Path(r["path"]).name: (float(r["prob_abnormal"]), r["label"])
                for r in csv.DictReader(f)
            }

    bundle, app = probabilities(tmp_path / "bundle"), probabilities(tmp_path / "app")
    assert bundle.keys() == app.keys() and len(app) == 5
    for name, (prob, label) in app.items():
        assert abs(bundle[name][0] - prob) <= 1e-6 and bundle[name][1] == label, name


def test_training_config_leaves_cudnn_fast_and_logs_tensorboard_per_epoch(tmp_path):
    """GPU readiness seen on the CPU: set_determinism's cudnn.deterministic is undone unless
    asked for, and no TensorBoard handler of the trainer writes every iteration."""
    import torch
    from monai.handlers import TensorBoardStatsHandler

    data = synth_dataset(tmp_path / "d", 2, (48, 48, 8))
    for wanted in (False, True):
        flow = config_workflow(
            ["train.yaml"],
            "train",
            dataset_dir=str(data),
            output_dir=str(tmp_path / f"out{wanted}"),
            cudnn_deterministic=wanted,
            progress=False,
        )
        assert torch.backends.cudnn.deterministic is wanted
    handlers = flow.parser.get_parsed_content("train#handlers")
    boards = [h for h in handlers if isinstance(h, TensorBoardStatsHandler)]
    assert boards and all(not h.iteration_log for h in boards)
    torch.backends.cudnn.deterministic = False


@pytest.fixture
def traced_checkpoint(tmp_path, checkpoint):
    """A checkpoint whose record names the training machine's absolute paths."""
    data = torch.load(checkpoint, weights_only=True)
    secret = "/home/alice/study-Smith_J-1957/scans"
    info = {
        **data["run_info"],
        "dataset_dir": secret,
        "training_data": {"scans": 8, "class_counts": [4, 4], "source": secret,
                          "generated": True, "digest": "ab" * 32},
    }  # fmt: skip
    path = tmp_path / "ckpt" / "best_model.pt"
    path.parent.mkdir()
    torch.save({**data, "run_info": info}, path)
    return path


def test_export_writes_no_path_of_the_exporting_machine(traced_checkpoint, tmp_path):
    bundle = tmp_path / "bundle"
    assert export_main(["--checkpoint", str(traced_checkpoint), "--output", str(bundle),
                        "--no-onnx", "--zip"]) == 0  # fmt: skip
    texts = [p.read_text() for p in bundle.rglob("*") if p.suffix in (".json", ".yaml", ".md")]
    for text in texts:
        assert "/home/alice" not in text and "Smith_J" not in text and str(tmp_path) not in text
    readme = (bundle / "docs" / "README.md").read_text()
    assert "from `scans` (content SHA-256 " + "ab" * 32 in readme


def test_export_never_follows_links_nor_deletes_what_it_did_not_write(
    traced_checkpoint, tmp_path, capsys
):
    """A user's folder named OUTPUT.partial is left alone; a link as OUTPUT is refused; a
    MONAI bundle of someone else's (the same layout, no marker of ours) is never replaced; an
    existing zip is not replaced silently, nor a zip we did not write."""
    base = ["--checkpoint", str(traced_checkpoint), "--no-onnx"]
    mine = tmp_path / "bundle.partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "linked.partial").symlink_to(elsewhere)
    assert export_main([*base, "--output", str(tmp_path / "bundle")]) == 0
    assert export_main([*base, "--output", str(tmp_path / "linked")]) == 0
    assert (mine / "notes.txt").read_text() == "keep" and list(elsewhere.iterdir()) == []
    assert not (tmp_path / "linked").is_symlink()
    (tmp_path / "link").symlink_to(elsewhere)
    assert export_main([*base, "--output", str(tmp_path / "link"), "--overwrite"]) == 2
    assert "symbolic link" in capsys.readouterr().err and list(elsewhere.iterdir()) == []
    spleen = tmp_path / "spleen"  # a third-party bundle: configs/metadata.json, models/...
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "LICENSE"):
        (spleen / name).parent.mkdir(parents=True, exist_ok=True)
        (spleen / name).write_text("theirs")
    assert export_main([*base, "--output", str(spleen), "--overwrite"]) == 2
    assert "holds no .ctclassify-bundle.json" in capsys.readouterr().err
    assert (spleen / "models" / "model.pt").read_text() == "theirs"
    # our own bundle is replaced with --overwrite; the zip only when it is ours
    (tmp_path / "bundle.zip").write_text("someone's zip")
    assert export_main([*base, "--output", str(tmp_path / "bundle"), "--zip"]) == 2
    assert export_main([*base, "--output", str(tmp_path / "bundle"), "--zip", "--overwrite"]) == 2
    assert (tmp_path / "bundle.zip").read_text() == "someone's zip"
    (tmp_path / "bundle.zip").unlink()
    assert export_main([*base, "--output", str(tmp_path / "bundle"), "--zip", "--overwrite"]) == 0
    assert export_main([*base, "--output", str(tmp_path / "bundle"), "--zip", "--overwrite"]) == 0
    assert not list(tmp_path.glob(".bundle.*"))  # no temporary folder left behind


def test_bundle_writer_records_a_non_finite_probability_as_a_failed_scan(tmp_path):
    """The exported bundle's writer: NaN from the network is an error row, never 'normal'."""
    from types import SimpleNamespace

    from app.runtime.writer import PredictionWriter

    writer = PredictionWriter(tmp_path, ["normal", "abnormal"])
    engine = SimpleNamespace(state=SimpleNamespace(
        batch=[{"path": "a.nii.gz"}, {"path": "b.nii.gz"}],
        output=[{"prob": torch.tensor(float("nan")), "pred": torch.tensor(0.0)},
                {"prob": torch.tensor(0.75), "pred": torch.tensor(1.0)}],
    ))  # fmt: skip
    writer.started(engine)
    writer.write(engine)
    writer.completed(engine)
    with (tmp_path / "predictions.csv").open() as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    assert rows["a.nii.gz"]["label"] == "" and "non-finite" in rows["a.nii.gz"]["error"]
    assert (
        rows["b.nii.gz"]["label"] == "abnormal" and rows["b.nii.gz"]["prob_abnormal"] == "0.750000"
    )


def test_recipe_choices_travel_with_the_export(tmp_path):
    """A model with the lung crop, the lungs flattened, attention pooling and a density branch:
    the exported bundle (TorchScript and ONNX made from it) and app.infer give the same
    probabilities."""
    from conftest import TINY_SETTINGS

    from app.data.synth import generate_scan, save_scan
    from nets.cnn3d import CNN3D

    torch.manual_seed(3)
    settings = {**TINY_SETTINGS, "pooling": "attention", "lung_crop": True, "density_bins": 16,
                "lung_flatten_mm": 20.0}  # fmt: skip
    net = CNN3D(filters=settings["filters"], dense_units=settings["dense_units"],
                pooling="attention", density_bins=16)  # fmt: skip
    with torch.no_grad():
        net.density.linear.weight.normal_(0, 0.05)  # not the zero start: the branch counts
    ckpt = tmp_path / "run" / "best_model.pt"
    ckpt.parent.mkdir()
    torch.save({"network": net.eval().state_dict(), "run_info": settings}, ckpt)
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(3):
        save_scan(generate_scan(i % 2, i, shape=(64, 64, 20)), scans / f"s{i}.nii.gz")
    bundle = tmp_path / "bundle"
    assert export_main(["--checkpoint", str(ckpt), "--output", str(bundle)]) == 0
    flatten = [line for f in (bundle / "configs").glob("*.yaml") for line in f.read_text().splitlines()
               if line.startswith("lung_flatten_mm:")]  # fmt: skip
    assert flatten and all(float(line.split(":")[1].split("#")[0]) == 20.0 for line in flatten)
    proc = monai_bundle(bundle_run_args(scans, tmp_path / "b", "--precision", "fp32"), cwd=bundle)
    assert proc.returncode == 0, proc.stderr[-2000:]
    args = [str(scans), "--checkpoint", str(ckpt), "--output", str(tmp_path / "a")]
    assert infer_main([*args, "--precision", "fp32", "--device", "cpu", "--no-progress"]) == 0

    def probabilities(folder):
        with (folder / "predictions.csv").open() as f:
            return {Path(r["path"]).name: float(r["prob_abnormal"]) for r in csv.DictReader(f)}

    via_bundle, via_app = probabilities(tmp_path / "b"), probabilities(tmp_path / "a")
    assert via_bundle.keys() == via_app.keys() and len(via_app) == 3
    for name, prob in via_app.items():
        assert abs(via_bundle[name] - prob) <= 1e-5, name
    # probabilities that differ (by 50x the agreement asked; flattened lungs look much alike)
    assert max(via_app.values()) - min(via_app.values()) > 5e-4
    x = torch.rand(1, 1, 48, 48, 48)
    with torch.no_grad():
        expected = net(x).numpy()
        np.testing.assert_allclose(torch.jit.load(str(bundle / "models/model.ts"))(x).numpy(),
                                   expected, atol=1e-4, rtol=1e-5)  # fmt: skip
    ort = require_module("onnxruntime")
    session = ort.InferenceSession(str(bundle / "models/model.onnx"))
    np.testing.assert_allclose(
        session.run(None, {"image": x.numpy()})[0], expected, atol=1e-4, rtol=1e-5
    )


def test_the_bundle_and_app_infer_give_the_same_rows_on_a_hostile_folder(
    tmp_path, real_ct, checkpoint
):
    """One folder of what a careless user or an attacker leaves (issue 31): a DICOM series
    under ``case#1/`` (the bundle cut the path at '#': "not found"), a named pipe called
    ``b.nii.gz`` (the bundle said "cannot list folder"; reading it blocks forever), an empty
    file, random bytes, a broken link, a header claiming 1e-9 mm slices with the lung
    flattening on (a 30 GiB kernel before), and a good scan. The repository's inference.yaml
    under MONAI's workflow (what an exported bundle runs) and app.infer give each the same row:
    probability, error, warnings."""
    import os

    from conftest import TINY_SETTINGS, ct_volume, nifti

    from app.infer import main as infer_main

    scans = tmp_path / "scans"
    (scans / "case#1").mkdir(parents=True)
    shutil.copytree(real_ct / "cip_ct-64_dicom", scans / "case#1" / "series")
    nifti(scans / "a.nii.gz", ct_volume((48, 48, 20)))
    os.mkfifo(scans / "b.nii.gz")
    (scans / "c.nii.gz").write_bytes(b"")
    (scans / "d.nii.gz").write_bytes(os.urandom(2048))
    (scans / "e.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    nifti(scans / "f.nii.gz", ct_volume((48, 48, 20), seed=3), np.diag([1.0, 1.0, 1e-9, 1.0]))
    recipe = {"lung_crop": True, "lung_flatten_mm": 20.0}
    data = torch.load(checkpoint, weights_only=True)
    ckpt = tmp_path / "flat.pt"
    torch.save({**data, "run_info": {**TINY_SETTINGS, **recipe}}, ckpt)
    model = {k: TINY_SETTINGS[k] for k in ("spatial_size", "filters", "dense_units")}
    flow = config_workflow(
        ["inference.yaml"],
        "infer",
        dataset_dir=str(scans),
        output_dir=str(tmp_path / "bundle"),
        ckpt_path=str(ckpt),
        device="$torch.device('cpu')",
        **model,
        **recipe,
    )
    with pytest.raises(SystemExit) as stop:  # the bundle's writer: status 1, some failed
        flow.run()
    assert stop.value.code == 1
    args = [str(scans), "--checkpoint", str(ckpt), "--output", str(tmp_path / "app")]
    infer_main([*args, "--device", "cpu", "--no-progress"])

    def rows(folder):
        with (folder / "predictions.csv").open() as f:
            return {
                r["path"]: (r["prob_abnormal"][:8], r["error"], r["warnings"])
                for r in csv.DictReader(f)
            }

    bundle, app = rows(tmp_path / "bundle"), rows(tmp_path / "app")
    assert bundle == app
    assert len(app) == 7
    by_name = {Path(p).name: row for p, row in app.items()}
    assert by_name["series"][1] == "" and by_name["series"][0]  # classified, not "not found"
    assert "named pipe" in by_name["b.nii.gz"][1]
    assert by_name["f.nii.gz"][0] and "spacing" in by_name["f.nii.gz"][2]


def test_the_bundle_prints_a_line_per_scan_and_its_readme_says_what_its_config_does(
    tmp_path, real_ct, checkpoint
):
    """An exported bundle's console (issue 35): the line app.infer prints for each scan, a DICOM
    series included, and no line per reader MONAI tried before the one that read it. Its
    docs/README.md says each preprocessing step its inference.yaml runs: the lung crop and the
    flattening where the model has them, not where it has not."""
    from conftest import TINY_SETTINGS

    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(real_ct / "cip_ct-64_chest.nii.gz", scans / "chest.nii.gz")
    shutil.copytree(real_ct / "cip_ct-64_dicom", scans / "series")
    (scans / "empty.nii.gz").write_bytes(b"")
    bundle = tmp_path / "bundle"
    assert export_main(["--checkpoint", str(checkpoint), "--output", str(bundle)]) == 0
    readme = (bundle / "docs" / "README.md").read_text()
    assert "reorient to LAS" in readme and "crop to the lungs" not in readme
    proc = monai_bundle(bundle_run_args(scans, tmp_path / "b"), cwd=bundle)
    assert proc.returncode == 1, proc.stderr[-2000:]  # the empty file failed
    assert "unable to load" not in proc.stdout + proc.stderr
    args = [str(scans), "--checkpoint", str(checkpoint), "--output", str(tmp_path / "a")]
    infer_main([*args, "--device", "cpu", "--no-progress"])
    with (tmp_path / "a" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    printed = proc.stdout.splitlines()
    for row in rows:  # the same words, for the same path as the bundle was given it
        name = Path(row["path"]).name
        ours = [line for line in printed if line.startswith(str(scans / name) + ":")]
        assert len(ours) == 1, (name, printed[-10:])
        if row["error"]:
            assert ours[0].endswith(f": error: {row['error']}")
        else:
            assert f"{100 * float(row['prob_abnormal']):.2f} percent that it is abnormal" in ours[0]
    flat = tmp_path / "flat.pt"
    data = torch.load(checkpoint, weights_only=True)
    recipe = {"lung_crop": True, "lung_flatten_mm": 20.0}
    torch.save({**data, "run_info": {**TINY_SETTINGS, **recipe}}, flat)
    assert export_main(["--checkpoint", str(flat), "--output", str(tmp_path / "fb")]) == 0
    readme = " ".join((tmp_path / "fb" / "docs" / "README.md").read_text().split())
    assert "crop to the lungs' bounding box" in readme
    assert "a Gaussian of 20 mm" in readme
    assert readme.index("crop to the lungs") < readme.index("clip HU") < readme.index("resize")


def test_export_warns_nothing_a_user_must_read_past(tmp_path, checkpoint, capfd):
    """app.export under warnings made errors (issue 35: 105 deprecation warnings buried the test
    summary, the ONNX export's among them): PyTorch's current ONNX exporter, and nothing of
    its own on the console but the bundle's line."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.filterwarnings("ignore", "`torch.jit", DeprecationWarning)  # MONAI's own use
        assert export_main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "b")]) == 0
    captured = capfd.readouterr()
    assert "torchvision is not installed" not in captured.err
    assert "Warning" not in captured.err, captured.err[-2000:]
    assert not (tmp_path / "b" / "models" / "model.onnx.data").exists()  # one file
