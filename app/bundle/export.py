"""Export a trained model as a MONAI bundle that runs where MONAI is installed and this app is
not (``python -m app.export`` is its command line)."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings
import zipfile
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path
from typing import Any

import yaml

from app.config import CONFIG_DIR, METADATA, TRAINING_SCANS
from app.errors import ConfigError
from app.model_settings import MODEL_SETTINGS, shareable, validate_settings
from app.run_folder import (
    BUNDLE_MARKER,
    CV_CALIBRATION,
    METRICS_CSV,
    check_own_folder,
    kept_row,
    read_metrics,
)
from app.runtime.files import atomic_write, atomic_write_text

REPO = Path(__file__).resolve().parents[2]
#: this project's packages that travel in the bundle's scripts/ (whole packages: a new module
#: travels without a list to update), and how config targets move with them
PORTABLE = {"nets": "nets", "transforms": "transforms", "app/runtime": "runtime"}
TARGET_PREFIXES = {
    "nets.": "scripts.nets.",
    "transforms.": "scripts.transforms.",
    "app.runtime.": "scripts.runtime.",
}


def _retarget(node: Any) -> Any:
    """Point ``_target_`` entries at the bundle's ``scripts`` package."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "_target_" and isinstance(value, str):
                for old, new in TARGET_PREFIXES.items():
                    if value.startswith(old):
                        value = new + value[len(old) :]
                if value.startswith(("app.", "nets.", "transforms.")):
                    raise ValueError(f"config target {value} is not portable into a bundle")
            out[key] = _retarget(value)
        return out
    if isinstance(node, list):
        return [_retarget(v) for v in node]
    return node


def bundle_inference_config(
    settings: dict[str, Any], config_dir: Path = CONFIG_DIR
) -> dict[str, Any]:
    """common.yaml + inference.yaml merged into one self-contained config with the run's settings."""
    merged: dict[str, Any] = {}
    for name in ("common.yaml", "inference.yaml"):
        merged.update(yaml.safe_load((config_dir / name).read_text()))
    # validated plain values only (never an expression), and only the model's own settings
    # replace config ids: the training data folder is not the bundle's dataset_dir
    plain = validate_settings(settings, "the run settings")
    for key in (*MODEL_SETTINGS, "threshold", "temperature", "class_names"):
        if key in plain and key in merged:
            merged[key] = plain[key]
    if plain.get("ensemble"):  # K copies of the network, their calibrated probabilities averaged
        single = merged["network_def"]
        merged["network_def"] = {
            "_target_": "nets.ensemble.MeanProbabilityEnsemble",
            "members": [copy.deepcopy(single) for _ in range(int(plain["ensemble"]["members"]))],
            "temperature": plain["ensemble"]["temperature"],
        }
    merged = _retarget(merged)
    # literal copy for readers that must not evaluate the bundle (app.infer --checkpoint BUNDLE),
    # without the training machine's paths
    merged["run_settings"] = shareable(plain)
    return merged


#: what ``monai.bundle run`` of an exported bundle imports besides monai, torch and numpy (each
#: listed with the exporting environment's version in ``metadata.json``; the test runs the
#: bundle with every other installed package blocked)
BUNDLE_REQUIRES = ("nibabel", "pytorch-ignite", "pyyaml", "fire", "scipy", "pydicom")


def _installed(name: str) -> str:

    try:
        return version(name).split("+")[0]
    except PackageNotFoundError:
        return "unknown"


def preprocessing_text(settings: dict[str, Any]) -> str:
    """The bundle README's preprocessing paragraph, step by step from the same settings that
    ``configs/inference.yaml``'s ``preprocessing`` is built with (``transforms.presets``'
    order): what the config does is what the README says."""
    steps = [f"reorient to {settings['axcodes']}"]
    flatten = float(settings.get("lung_flatten_mm") or 0.0)
    if settings.get("lung_crop"):
        steps.append(
            "crop to the lungs' bounding box (the app's lung mask; the whole scan where the mask "
            "is in doubt, which the scan's warnings then say)"
        )
    if settings.get("lung_only"):
        steps.append("set every voxel outside the lungs (the mask dilated by 2 voxels) to air")
    if flatten:
        steps.append(
            f"subtract from each lung voxel its lung's smooth background (a Gaussian of "
            f"{flatten:g} mm), so dependent density and expiration vanish and local findings stay"
        )
    steps += [
        f"clip HU to {settings['hu_window']} and scale to [0, 1]",
        f"resize (trilinear, corners aligned) to {settings['spatial_size']}",
        "rotate 90 degrees in the axial plane",
    ]
    shape = ", ".join(str(v) for v in settings["spatial_size"])
    text = (
        "Preprocessing (`preprocessing` in `configs/inference.yaml`): "
        + "; ".join(steps)
        + f": the network sees a float32 tensor of shape (1, {shape})"
    )
    bins = int(settings.get("density_bins") or 0)
    if bins:
        text += (
            f", and its density branch a {bins}-bin histogram of that tensor's intensities "
            "(read out beside the convolutions)"
        )
    return textwrap.fill(text + ".", width=96)


def _architecture(settings: dict[str, Any]) -> str:
    filters = ", ".join(str(f) for f in settings["filters"])
    extra = []
    if settings.get("density_bins"):
        extra.append(f"a density branch of {settings['density_bins']} bins")
    if settings.get("pooling", "avg") != "avg":
        extra.append(f"{settings['pooling']} pooling")
    return (
        f"A 3D CNN (four blocks of Conv3D, MaxPool3D, {settings.get('norm', 'batch')} norm; widths "
        f"{filters}; global pooling; Dense {settings['dense_units']}; Dropout {settings['dropout']}; "
        f"one logit{'; ' + ', '.join(extra) if extra else ''})"
    )


def _training_data(settings: dict[str, Any]) -> str:
    """The model's training data in one sentence, from its own record (never a guess)."""
    shared = shareable(settings)
    data = shared.get("training_data") or {}
    digest = data.get("digest")
    where = f"`{shared.get('dataset_dir', 'unknown')}`" + (
        f" (content SHA-256 {digest})" if digest else " (content digest not recorded)"
    )
    counts = data.get("class_counts")
    scans = f"{data['scans']} scans" if data.get("scans") else "scans"
    if counts and len(counts) == 2:
        scans += f" ({counts[0]} normal, {counts[1]} abnormal)"
    elif counts:
        scans += " (" + ", ".join(f"{n} of grade {k}" for k, n in enumerate(counts)) + ")"
    if data.get("generated"):
        return (
            f"{scans} generated by ctclassify (`app.data synth`), not real CT, from {where}: its "
            "output on real CT means little"
        )
    if "generated" in data:
        return f"{scans} of real CT from {where}"
    return f"{scans} from {where} (whether real or generated was not recorded)"


def _output_text(settings: dict[str, Any]) -> str:
    """What the network gives: a binary model's one probability, or a severity model's grades."""
    threshold = f'label "abnormal" at or above {settings["threshold"]:g}'
    grades = int(settings.get("grades", 2))
    if grades <= 2:
        return f'`pred`: the probability of "abnormal" (sigmoid of one logit); {threshold}.'
    names = ", ".join(map(str, settings["class_names"]))
    return (
        f"A severity model of grades {names} ({settings.get('ordinal_head', 'softmax')} head): "
        f"`pred` holds {grades - 1} cumulative probabilities, P(grade above each of the first "
        f"{grades - 1} grades); the first is P(abnormal), {threshold}. The grade is the median of "
        "the grades' probabilities (`grade`), each grade's probability in `grade_probs`."
    )


def _metadata(settings: dict[str, Any], metrics: list[dict[str, Any]]) -> dict[str, Any]:
    meta = json.loads((CONFIG_DIR / METADATA).read_text())
    meta["network_data_format"]["inputs"]["image"]["spatial_shape"] = list(settings["spatial_size"])
    meta["monai_version"] = _installed("monai")
    meta["pytorch_version"] = _installed("torch")
    meta["numpy_version"] = _installed("numpy")
    meta["required_packages_version"] = {name: _installed(name) for name in BUNDLE_REQUIRES}
    meta["description"] = (
        f"{_architecture(settings)} that predicts the probability that a chest CT scan shows "
        "viral pneumonia, after the Keras example '3D image classification from CT scans' "
        "(H. Zunair)."
    )
    grades = int(settings.get("grades", 2))
    if grades > 2:  # a severity model: its output and task say so
        names = list(settings["class_names"])
        meta["task"] = (
            f"Severity grading of chest CT volumes ({', '.join(names)}), with the binary view "
            "normal vs any finding"
        )
        meta["description"] += (
            f" A severity model: {grades - 1} cumulative logits (P(grade > k)), the first "
            f"P(abnormal)'s; its {settings.get('ordinal_head', 'softmax')} head grades "
            f"{', '.join(names)}."
        )
        meta["network_data_format"]["outputs"]["pred"].update(
            num_channels=grades - 1,
            spatial_shape=[grades - 1],
            channel_def={str(k): f"P(grade > {names[k]})" for k in range(grades - 1)},
        )
    meta["data_source"] = f"Trained on {_training_data(settings)}."

    best = kept_row(metrics)
    if best is not None:
        meta["eval_metrics"] = {
            "val_accuracy": best["val_acc"],
            "val_roc_auc": best.get("val_auc"),
            "epoch": best["epoch"],
        }
    return meta


def _docs(settings: dict[str, Any], meta: dict[str, Any], source: Path) -> str:
    """The bundle's docs/README.md, from the run's settings and the bundle's metadata."""
    evals = meta.get("eval_metrics", {})
    measured = (
        f"Validation accuracy {evals['val_accuracy']:.3f} and ROC-AUC {evals['val_roc_auc']:.3f} "
        f"at epoch {evals['epoch']} of the training run (its own validation split, on which the "
        "epoch was chosen: optimistic; measure the model on new scans with `app.evaluate`)."
        if evals
        else "The checkpoint came without a metrics.csv: no metrics recorded."
    )
    shared = shareable(settings)
    packages = {"monai": meta["monai_version"], "torch": meta["pytorch_version"],
                "numpy": meta["numpy_version"], **meta["required_packages_version"]}  # fmt: skip
    pins = " ".join(f"{name}=={v}" for name, v in packages.items() if v != "unknown")
    banner = (
        "\n**Trained on generated scans, not on real CT: its output on real CT means little.**\n"
        if (shared.get("training_data") or {}).get("generated")
        else ""
    )
    return f"""# ctclassify bundle: chest CT, normal vs viral pneumonia
{banner}
{_architecture(settings)} that gives the probability that a chest CT scan shows viral pneumonia
(COVID-19 related findings). After the Keras example "3D image classification from CT scans"
(H. Zunair). Research use only, not for diagnosis.

## Input
One CT volume in Hounsfield units (a NIfTI file, or a folder holding one DICOM series), any
orientation. Each input is checked first, as `python -m app.infer` checks it: what is not CT in
Hounsfield units (a mask, a normalised or 8-bit volume), an unreadable file or an inconsistent
DICOM series is a failed row with its reason, never a probability; the rest are classified,
with warnings (little or no lung, few slices, spacing unlike the training scans').
{preprocessing_text(settings)}

## Output
{_output_text(settings)} `run` writes `OUTPUT_DIR/predictions.csv` (path, prob_abnormal, label,
warnings, error{", grade, grade_probs" if int(settings.get("grades", 2)) > 2 else ""}) and exits
with status 0 when every input was classified, 1 when some failed (their rows say why).

## Training data and metrics
Trained on {_training_data(settings)}. Settings: {json.dumps({k: shared[k] for k in sorted(shared)})}.
{measured}
Exported from `{source.parent.name}/{source.name}`.

## Requirements
Exactly the packages `configs/metadata.json` lists, nothing of ctclassify:
```bash
pip install {pins}
```

## Commands (inside this folder)
```bash
python -m monai.bundle run --config_file configs/inference.yaml --meta_file configs/metadata.json \\
    --bundle_root . --dataset_dir SCANS --output_dir OUT
python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json \\
    --config_file configs/inference.yaml
python -m monai.bundle ckpt_export network_def --filepath model.ts --ckpt_file models/model.pt \\
    --meta_file configs/metadata.json --config_file configs/inference.yaml
# with internet access (downloads the metadata schema):
python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath schema.json
```
`models/model.pt` is a plain state dict; `models/model.ts` TorchScript (made by MONAI's
`ckpt_export`, as the bundle format asks); `models/model.onnx` ONNX (PyTorch's current
exporter; input `image`, output `pred` = the logit, batch dimension dynamic).

`run` prints a line per scan (its probability and label with its warnings, or why it failed)
and a summary. MONAI first warns that parsing a config resolves every `_target_` and evaluates
every `$` expression: true of any bundle. This one's configs are plain YAML written by
`app.export`; read them before running a bundle someone sent you.
"""


def export_bundle(
    checkpoint: str | Path,
    output: str | Path,
    *,
    overwrite: bool = False,
    onnx: bool = True,
    make_zip: bool = False,
) -> Path:
    """Write the bundle for ``checkpoint`` (run folder or file) to ``output``; returns ``output``.

    Built beside the target (``OUTPUT.partial``) and renamed into place at the end: a kill or an
    error leaves the previous bundle (or nothing), never a partial bundle under the final name.
    """
    from app.inference.checkpoints import resolve_checkpoint
    from app.inference.classifier import Classifier

    final = Path(output)
    archive = final.with_name(final.name + ".zip")
    _check_target(final, overwrite)
    if make_zip:
        _check_zip_target(archive, overwrite)
    if (Path(checkpoint) / CV_CALIBRATION).is_file():  # a cross-validation folder: its ensemble
        source = Path(checkpoint) / CV_CALIBRATION
        clf = Classifier.load(checkpoint, device="cpu")
        metrics: list[dict[str, Any]] = []
    else:
        source = resolve_checkpoint(checkpoint)
        clf = Classifier.load(source, device="cpu")
        metrics = read_metrics(source.parent / METRICS_CSV)
    settings = {**clf.settings, "threshold": clf.threshold, "class_names": clf.class_names}
    final.parent.mkdir(parents=True, exist_ok=True)
    # a new folder of our own beside the target (never an existing name, never a link's target)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        _write_marker(work)
        _write_code(work)
        _write_configs_and_docs(work, settings, metrics, source)
        _write_models(work, clf.network.cpu().eval(), settings, onnx=onnx)
        _check_target(final, overwrite)  # again: nothing changed it meanwhile
        if final.exists():
            shutil.rmtree(final)
        work.replace(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if make_zip:  # written under a temporary name, then renamed: never a truncated zip
        with tempfile.TemporaryDirectory(prefix=f".{final.name}.", dir=final.parent) as tmp:
            made = shutil.make_archive(str(Path(tmp) / "bundle"), "zip", root_dir=final)
            Path(made).replace(archive)
    return final


MARKER_ID = "ctclassify-bundle"


def _write_marker(work: Path) -> None:
    (work / BUNDLE_MARKER).write_text(json.dumps({"written_by": MARKER_ID, "format": 1}))


def is_own_bundle(folder: Path) -> bool:
    """Whether ``folder`` (not a link) holds this app's bundle marker."""
    marker = folder / BUNDLE_MARKER
    if folder.is_symlink() or marker.is_symlink() or not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()[:1000]).get("written_by") == MARKER_ID
    except (OSError, ValueError, AttributeError):
        return False


def _check_zip_target(archive: Path, overwrite: bool) -> None:
    """``--zip`` never replaces an existing file silently, nor one it did not write."""

    if not (archive.exists() or archive.is_symlink()):
        return
    if not overwrite:
        raise ConfigError(f"{archive} exists; choose another --output or add --overwrite")
    own = False
    if archive.is_file() and not archive.is_symlink():
        try:
            with zipfile.ZipFile(archive) as z:
                own = BUNDLE_MARKER in z.namelist()
        except (OSError, zipfile.BadZipFile):
            own = False
    if not own:
        raise ConfigError(
            f"--overwrite: {archive} is not a bundle archive written by ctclassify (no {BUNDLE_MARKER} "
            "inside, or a link or folder): not replaced"
        )


def _check_target(final: Path, overwrite: bool) -> None:
    """Refuse a file, an existing folder without ``--overwrite``, and any folder that is not a
    bundle (before any work: a foreign folder is never replaced)."""

    if final.is_symlink():
        raise ConfigError(f"--output {final} is a symbolic link: links are never followed")
    if final.exists() and not final.is_dir():
        raise ConfigError(f"--output {final} is a file, not a folder")
    if final.exists() and any(final.iterdir()):
        if not overwrite:
            raise ConfigError(f"{final} exists; choose another --output or add --overwrite")
        check_own_folder(final, "bundle")
        if not is_own_bundle(final):
            raise ConfigError(
                f"--overwrite: {final} holds no {BUNDLE_MARKER} (a bundle this app wrote has one): "
                "nothing was removed; choose another --output or remove it yourself"
            )


def _write_code(work: Path) -> None:
    """scripts/: this project's portable packages, so the bundle runs without the app."""
    for sub in ("configs", "models", "docs", "scripts"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    for package, name in PORTABLE.items():
        (work / "scripts" / name).mkdir(exist_ok=True)
        for source_file in sorted((REPO / package).glob("*.py")):
            shutil.copy(source_file, work / "scripts" / name / source_file.name)
    (work / "scripts" / "__init__.py").write_text('"""ctclassify code carried by this bundle."""\n')


def _license_text() -> str:
    """The project's licence: the repository's LICENSE, or the installed package's copy."""

    if (REPO / "LICENSE").is_file():
        return (REPO / "LICENSE").read_text()
    try:
        dist = distribution("ctclassify")
    except PackageNotFoundError:
        dist = None
    for name in ("licenses/LICENSE", "LICENSE"):
        text = dist.read_text(name) if dist is not None else None
        if text:
            return text
    raise FileNotFoundError("the project's LICENSE is neither in the repository nor installed")


def _write_configs_and_docs(
    work: Path, settings: dict[str, Any], metrics: list[dict[str, Any]], source: Path
) -> None:

    atomic_write_text(
        work / "configs" / "inference.yaml",
        "# Exported by ctclassify (python -m app.export); self-contained.\n"
        + yaml.safe_dump(bundle_inference_config(settings), sort_keys=False),
    )
    meta = _metadata(settings, metrics)
    atomic_write_text(work / "configs" / METADATA, json.dumps(meta, indent=4))
    hashes = validate_settings(settings, "the run settings").get("training_data", {})
    if "scan_sha256" in hashes:  # app.evaluate recognises the training scans by content
        record = {"scan_sha256": hashes["scan_sha256"]}
        atomic_write_text(work / "configs" / TRAINING_SCANS, json.dumps(record))
    shutil.copy(CONFIG_DIR / "logging.conf", work / "configs" / "logging.conf")
    atomic_write_text(work / "LICENSE", _license_text())
    shutil.copy(Path(__file__).with_name("data_license.md"), work / "docs" / "data_license.md")
    atomic_write_text(work / "docs" / "README.md", _docs(settings, meta, source))


def monai_bundle(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m monai.bundle ARGS`` in ``cwd`` (a bundle folder), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _write_models(work: Path, network: Any, settings: dict[str, Any], onnx: bool) -> None:
    """models/: the state dict, TorchScript made by MONAI inside the bundle (which proves the
    bundle works without this app), and ONNX."""
    import torch

    state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    atomic_write(work / "models" / "model.pt", lambda tmp: torch.save(state, tmp))
    command = ["ckpt_export", "network_def", "--filepath", "models/model.ts"]
    command += ["--ckpt_file", "models/model.pt", "--meta_file", "configs/metadata.json"]
    command += ["--config_file", "configs/inference.yaml"]
    proc = monai_bundle(command, cwd=work)
    if proc.returncode != 0:
        raise RuntimeError(f"monai.bundle ckpt_export failed in {work}:\n{proc.stderr[-2000:]}")
    if onnx:
        size = [int(s) for s in settings["spatial_size"]]
        example = torch.zeros(1, int(settings["in_channels"]), *size)
        batch = torch.export.Dim("batch", min=1, max=4096)
        # PyTorch's current exporter (torch.export, then onnxscript); what it says on the way
        # is its own: torchvision's operators it skips (log lines), a pytree deprecation inside
        # torch; the test compares the ONNX outputs with the network's
        registration = logging.getLogger("torch.onnx._internal.exporter._registration")
        level = registration.level
        registration.setLevel(logging.ERROR)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
                torch.onnx.export(
                    network,
                    (example,),
                    str(work / "models" / "model.onnx"),
                    input_names=["image"],
                    output_names=["pred"],
                    dynamic_shapes=({0: batch},),
                    dynamo=True,
                    external_data=False,  # one file: the weights inside model.onnx
                    verbose=False,
                )
        finally:
            registration.setLevel(level)
