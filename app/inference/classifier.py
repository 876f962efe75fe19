"""Classify scans with a trained model: the Python API behind ``python -m app.infer``.

Example:
    >>> from app.inference.classifier import Classifier
    >>> clf = Classifier.load("runs/demo", device="cpu")          # doctest: +SKIP
    >>> clf.predict("scan.nii.gz").prob_abnormal                   # doctest: +SKIP
    0.8731
    >>> for p in clf.predict_many(["a.nii.gz", "dicom/series1"]):  # doctest: +SKIP
    ...     print(p.path, p.label, p.error)
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.bundle.portable.inferers import PRECISIONS, resolve_precision
from app.bundle.portable.scanqc import Limits, TrainingContext
from app.bundle.portable.scans import ScanInput, find_inputs
from app.bundle.portable.screen import screen_scan, split_loading
from app.errors import EXIT_REFUSED, ConfigError, CTClassifyError
from app.inference.model_card import ModelCard
from app.model_settings import MODEL_SETTINGS, SettingsError, validate_settings
from app.run_folder import BEST_MODEL, METRICS_CSV
from nets.ensemble import MeanProbabilityEnsemble
from transforms.augment import LEFT_RIGHT_DIM

#: a cross-validation folder's threshold and temperature (app.train --folds K)
CV_CALIBRATION = "cv_calibration.json"


#: how ``Classifier.saliency`` maps where the model looks
SALIENCY_METHODS = ("gradient", "gradcam")
#: Gaussian smoothing (voxels of the network's input) of the gradient saliency
SALIENCY_SIGMA = 2.0


class CheckpointError(CTClassifyError):
    """The checkpoint cannot be used (missing, unsafe, or without the settings of its model)."""

    exit_status = EXIT_REFUSED


@dataclass
class Prediction:
    """The result for one input. ``prob_abnormal`` is ``None`` when ``error`` says why."""

    path: str
    prob_abnormal: float | None
    label: str | None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    #: a cross-validation ensemble's fold models, each one's temperature-scaled P(abnormal)
    #: (``prob_abnormal`` is their mean); ``None`` for one model
    fold_probs: list[float] | None = None
    #: with test-time augmentation: the standard deviation of P(abnormal) across the views
    #: (the scan and its left-right mirror), an uncertainty; ``None`` without
    tta_spread: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def sentence(self) -> str:
        """The reference's console line, for both classes, with the scan's QC warnings."""
        if self.prob_abnormal is None:
            return f"{self.path}: error: {self.error}"
        p = self.prob_abnormal
        note = f"  [warning: {'; '.join(self.warnings)}]" if self.warnings else ""
        return (
            f"{self.path}: This model is {100 * (1 - p):.2f} percent confident that CT scan is normal "
            f"and {100 * p:.2f} percent that it is abnormal -> {self.label}{note}"
        )


def resolve_checkpoint(path: str | Path | None, runs_dir: str | Path = "runs") -> Path:
    """A checkpoint file from a file, a run folder (its best model) or ``None`` (newest run)."""
    if path is None:
        candidates = sorted(Path(runs_dir).glob(f"*/{BEST_MODEL}"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise CheckpointError(
                f"no trained model under {runs_dir}/: train one (`python -m app.train --demo`) or "
                "pass --checkpoint RUN_DIR|FILE"
            )
        return candidates[-1]
    path = Path(path)
    if path.is_dir():
        for name in (BEST_MODEL, "models/model.pt"):
            if (path / name).is_file():
                return path / name
        from app.run_folder import latest_checkpoint

        last = latest_checkpoint(path)
        if last is None:
            raise CheckpointError(
                f"{path} holds no best_model.pt, models/model.pt or last checkpoint"
            )
        return last
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(network state dict, run settings) from a checkpoint, without unpickling any object."""
    import pickle

    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} was refused: it holds Python objects that loading would execute, not only "
            f"weights ({str(exc).splitlines()[0][:200]})"
        ) from exc
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a checkpoint dictionary")
    state = data.get("network", data.get("model"))
    settings = data.get("run_info")
    source = str(path)
    if settings is None and (path.parent.parent / "configs" / "metadata.json").is_file():
        import yaml

        from app.model_settings import read_bundle_settings

        source = str(path.parent.parent / "configs" / "inference.yaml")
        try:
            settings = read_bundle_settings(path.parent.parent)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise CheckpointError(f"{source} cannot be read ({str(exc)[:200]})") from exc
        state = data if state is None else state
    if settings is None:
        raise CheckpointError(
            f"{path} does not carry the settings its model was trained with ('run_info'); "
            "use a checkpoint written by app.train or an exported bundle"
        )
    try:
        settings = validate_settings(settings, source)
    except SettingsError as exc:
        raise CheckpointError(str(exc)) from exc
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path} holds no network weights (expected a 'network' entry)")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path}: the network entry holds values that are not tensors")
    broken = [
        k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if broken:
        raise CheckpointError(
            f"{path}: weights {', '.join(broken[:3])} hold NaN or infinite values (a diverged or "
            "damaged model): refused"
        )
    return state, settings


def validation_of(checkpoint: Path) -> dict[str, Any] | None:
    """The validation metrics of a run folder's checkpoint, from the ``metrics.csv`` beside it:
    the first best validation accuracy for ``best_model.pt`` (the epoch it was saved at), that
    epoch's row for ``last_checkpoint_epoch=N.pt``."""
    from app.run_folder import kept_row, read_metrics

    try:
        rows = [r for r in read_metrics(checkpoint.parent / METRICS_CSV) if r.get("val_acc")]
    except (OSError, ValueError, KeyError):
        return None
    row: Mapping[str, Any] | None
    if checkpoint.name == BEST_MODEL:
        row = kept_row(rows)
    else:
        epoch = checkpoint.stem.rsplit("=", 1)[-1]
        row = next((r for r in rows if str(r["epoch"]) == epoch), None)
    if row is None:
        return None
    keys = ("val_acc", "val_auc", "val_sensitivity", "val_specificity", "val_loss")
    return {"epoch": int(row["epoch"]), **{k: row[k] for k in keys if row.get(k) is not None}}


def pick_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here")
    return device


class ScanPreparer:
    """Checks and preprocesses one input; never raises (errors become part of the result:
    :func:`app.bundle.portable.screen.screen_scan`, which an exported bundle runs too).

    Picklable and free of the network, so DataLoader workers can run it.

    Args:
        preprocessing: the evaluation chain of the configs (starting with ``LoadImaged``).
        limits: caps checked before reading voxels.
        image_key: key of the image in the chain's dictionaries.
        training: what the model was trained on, for warnings about scans unlike it.
    """

    def __init__(
        self,
        preprocessing: Any,
        limits: Limits,
        image_key: str = "image",
        training: TrainingContext | None = None,
    ) -> None:
        self.load, self.rest = split_loading(preprocessing)
        self.limits = limits
        self.key = image_key
        self.training = training

    def __call__(self, scan: ScanInput) -> dict[str, Any]:
        result = screen_scan(scan, self.load, self.rest, self.limits, self.training, self.key)
        if result["image"] is not None:
            result["image"] = torch.as_tensor(result["image"])
        return result


class _InputDataset(torch.utils.data.Dataset):
    def __init__(self, inputs: Sequence[ScanInput], preparer: ScanPreparer) -> None:
        self.inputs = list(inputs)
        self.preparer = preparer

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.preparer(self.inputs[index])


def _as_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch


def _prefetched(
    prepare: Callable[[ScanInput], dict[str, Any]], scans: Sequence[ScanInput], ahead: int
) -> Iterator[dict[str, Any]]:
    """``prepare`` each scan in a background thread, at most ``ahead`` scans ahead, in order.

    Reading, inflating and resizing release the GIL (ISA-L/zlib, NumPy, PyTorch), so the next
    scans are prepared while the network classifies the current ones. The preparer catches every
    error of a scan itself, so one bad file never stops the others.
    """
    if not scans:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctclassify-read") as pool:
        pending: deque[Future[dict[str, Any]]] = deque()
        todo = iter(scans)
        try:
            for scan in itertools.islice(todo, ahead):
                pending.append(pool.submit(prepare, scan))
            while pending:
                result = pending.popleft().result()
                for scan in itertools.islice(todo, 1):
                    pending.append(pool.submit(prepare, scan))
                yield result
        finally:  # a consumer that stops early: drop what was not started
            for future in pending:
                future.cancel()


def _batched(items: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class Classifier:
    """A trained model with the preprocessing it was trained with.

    Args:
        network: the CNN (eval mode is set here).
        settings: the run settings the checkpoint carries.
        device: where the network runs.
        threshold: P(abnormal) at or above it gives ``abnormal``; default: the run's.
        limits: caps on scan size checked before reading.
        checkpoint: where the weights came from.
        precision: ``auto`` (bfloat16 autocast on CPUs with AVX512-BF16/AMX and on GPUs with
            bfloat16, float16 on older GPUs, float32 elsewhere), ``fp32``, ``bf16``, or ``fp16``
            (CUDA). Autocast probabilities are slightly off float32's; ``docs/benchmarks.md``
            has the measured figures. On the CPU the network always runs in channels-last memory.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        settings: dict[str, Any],
        device: torch.device,
        threshold: float | None = None,
        limits: Limits | None = None,
        checkpoint: Path | None = None,
        precision: str = "auto",
    ) -> None:
        from app.config import load_config

        if precision not in PRECISIONS:
            raise ConfigError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
            )
        try:
            self.precision = resolve_precision(precision, device)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        try:
            self.settings = validate_settings(settings, str(checkpoint or "settings"))
        except SettingsError as exc:
            raise CheckpointError(str(exc)) from exc
        self.device = device
        self.checkpoint = checkpoint
        # the building blocks of inference.yaml, as monai.bundle run builds them: the threshold
        # and class names are the configs' unless the checkpoint (or the caller) has its own
        runtime: dict[str, Any] = {"precision": precision, "device": f"$torch.device('{device}')"}
        if threshold is not None:
            runtime["threshold"] = float(threshold)
        parser = load_config("inference.yaml", overrides={**self._overrides(), **runtime})
        self.threshold = float(parser.get_parsed_content("threshold"))
        self.class_names = [str(c) for c in parser.get_parsed_content("class_names")]
        self.inferer = parser.get_parsed_content("inferer")
        self.postprocessing = parser.get_parsed_content("postprocessing")
        self.autocast_fp16 = bool(parser.get_parsed_content("amp"))
        #: whether a process of its own should keep freed memory (``reuse_freed_memory()``)
        self.reuse_freed_memory = bool(parser.get_parsed_content("reuse_freed_memory"))
        #: test-time augmentation: average each scan with its left-right mirror
        self.tta = False
        self.network = network.to(device).eval()
        if parser.get_parsed_content("channels_last"):
            self.network = self.network.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        self.preparer = ScanPreparer(
            parser.get_parsed_content("preprocessing"),
            limits or Limits(),
            parser.get_parsed_content("image_key"),
            TrainingContext.from_settings(self.settings),
        )

    def _overrides(self) -> dict[str, Any]:
        keys = (*MODEL_SETTINGS, "threshold", "class_names")
        return {k: self.settings[k] for k in keys if k in self.settings}

    @classmethod
    def load(
        cls,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "auto",
        threshold: float | None = None,
        limits: Limits | None = None,
        precision: str = "auto",
    ) -> Classifier:
        """Rebuild the model from a checkpoint file, run folder, exported bundle, or the newest run."""
        import transforms  # noqa: F401  (quiets MONAI's optional-decoder notices)

        if checkpoint is not None and (Path(checkpoint) / CV_CALIBRATION).is_file():
            return cls.load_ensemble(Path(checkpoint), device, threshold, limits, precision)
        path = resolve_checkpoint(checkpoint)
        state, settings = load_checkpoint(path)
        if "validation" not in settings:
            found = validation_of(path)
            if found:
                settings["validation"] = found
        network = build_network(settings)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{path}: weights do not fit the network its settings describe ({exc})"
            ) from exc
        return cls(network, settings, pick_device(device), threshold, limits, path, precision)

    @classmethod
    def load_ensemble(
        cls,
        folder: Path,
        device: str | torch.device = "auto",
        threshold: float | None = None,
        limits: Limits | None = None,
        precision: str = "auto",
    ) -> Classifier:
        """A cross-validation folder (``app.train --folds K``) as one model: the mean of the fold
        models' temperature-scaled probabilities, at the threshold chosen out of fold (on the
        same scale), unless ``threshold`` is given."""
        from app.readback import ReadBackError, read_calibration

        try:
            calibration = read_calibration(folder / CV_CALIBRATION)
        except ReadBackError as exc:
            raise CheckpointError(str(exc)) from None
        temperature = float(calibration["temperature"])
        chosen = float(calibration["threshold_calibrated"])
        from app.run_folder import fold_dirs

        folds = fold_dirs(folder)
        if not folds or [int(p.name[5:]) for p in folds] != list(range(len(folds))):
            raise CheckpointError(f"{folder} holds no fold-0 ... fold-K folders")
        members, settings = [], None
        for run in folds:
            state, fold_settings = load_checkpoint(run / BEST_MODEL)
            if settings is None:
                settings = fold_settings
            elif any(fold_settings[k] != settings[k] for k in MODEL_SETTINGS):
                raise CheckpointError(f"{run}: its model settings differ from fold-0's")
            net = build_network(fold_settings)
            try:
                net.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
            except RuntimeError as exc:
                raise CheckpointError(f"{run / BEST_MODEL}: weights do not fit ({exc})") from exc
            members.append(net)
        assert settings is not None
        summary = _cv_means(folder)
        if summary:
            settings["validation"] = summary
        settings["threshold"] = chosen
        settings["ensemble"] = {"members": len(members), "temperature": temperature}
        if calibration.get("threshold_method"):
            settings["ensemble"]["threshold_method"] = calibration["threshold_method"]
        ensemble = MeanProbabilityEnsemble(members, temperature)
        return cls(ensemble, settings, pick_device(device), threshold, limits, folder, precision)

    @property
    def card(self) -> ModelCard:
        """What the model is: its identity, training data, validation metrics and caveats."""
        return ModelCard(self.settings, self.checkpoint, self.threshold, self.class_names)

    def identity(self) -> dict[str, Any]:
        return self.card.identity()

    def describe(self) -> str:
        return self.card.describe()

    def caveats(self) -> list[str]:
        return self.card.caveats()

    @property
    def folds(self) -> int:
        """How many fold models the model averages (0: one model, not an ensemble)."""
        return len(self.network.members) if isinstance(self.network, MeanProbabilityEnsemble) else 0

    @torch.inference_mode()
    def _forward(
        self, images: list[torch.Tensor]
    ) -> list[tuple[float, str, list[float] | None, float | None]]:
        """(P(abnormal), label, each fold's P(abnormal) or ``None``, the spread across the
        test-time views or ``None``) per image: the configs' inferer and postprocessing
        (sigmoid, threshold), with float16 autocast where the bundle's evaluator uses it
        (``amp``). An ensemble's logit is its own ``forward``'s, computed from the fold
        probabilities it also returns. With ``tta``, the mean probability over the scan and its
        left-right mirror."""
        batch = torch.stack([torch.as_tensor(i) for i in images]).to(self.device, non_blocking=True)
        views = [batch, batch.flip(LEFT_RIGHT_DIM)] if self.tta else [batch]
        view_logits, view_members = [], []
        for view in views:
            members = None
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.autocast_fp16):
                if isinstance(self.network, MeanProbabilityEnsemble):
                    members = self.inferer(view, self.network.member_probabilities).float()
                    logits = self.network.combine(members)
                else:
                    logits = self.inferer(view, self.network)
            view_logits.append(logits.float())
            view_members.append(members)
        spread = None
        if len(views) > 1:  # the mean probability over the views, as a logit
            probs = torch.stack([torch.sigmoid(v) for v in view_logits])
            spread = probs.std(dim=0, unbiased=False)[:, 0].tolist()
            mean = probs.mean(dim=0).clamp(1e-7, 1 - 1e-7)
            logits = torch.log(mean) - torch.log1p(-mean)
            if view_members[0] is not None:
                view_members = [torch.stack([m for m in view_members if m is not None]).mean(0)]
        else:
            logits = view_logits[0]
        members = view_members[0]
        fold_probs = None if members is None else members[:, :, 0].T.tolist()
        results = []
        for i, logit in enumerate(logits):
            out = self.postprocessing({"pred": logit})
            results.append(
                (
                    float(out["prob"]),
                    self.class_names[int(out["pred"])],
                    None if fold_probs is None else fold_probs[i],
                    None if spread is None else float(spread[i]),
                )
            )
        return results

    def predict_many(
        self,
        inputs: Iterable[str | Path | ScanInput],
        batch_size: int = 2,
        workers: int = 0,
        keep_images: bool = False,
    ) -> Iterator[Prediction]:
        """Classify inputs in batches, streaming one :class:`Prediction` per input, in order.

        Inputs are NIfTI paths, DICOM series folders, or :class:`ScanInput` from
        :func:`app.bundle.portable.scans.find_inputs`. Bad inputs yield a prediction with ``error`` set; memory
        holds a few batches at a time. With ``keep_images`` each prediction carries its
        preprocessed volume as ``prediction.image`` (for montages and saliency).
        """
        scans = [s if isinstance(s, ScanInput) else _as_input(s) for s in inputs]
        size = max(batch_size, 1)
        batches: Iterable[list[dict[str, Any]]]
        if workers > 0:
            batches = torch.utils.data.DataLoader(
                _InputDataset(scans, self.preparer),
                batch_size=size,
                num_workers=workers,
                collate_fn=_as_list,
                pin_memory=self.device.type == "cuda",
            )
        else:
            batches = _batched(_prefetched(self.preparer, scans, ahead=2 * size), size)
        for batch in batches:
            ready = [r for r in batch if r["image"] is not None]
            results = self._forward([r["image"] for r in ready]) if ready else []
            for r, (p, label, folds, spread) in zip(ready, results, strict=True):
                if not math.isfinite(p):
                    r["error"] = "the model gave a non-finite probability (NaN or inf): no label"
                    continue
                r["prob"], r["label"], r["folds"], r["spread"] = p, label, folds, spread
            for r in batch:
                prob = r.get("prob")
                folds = r.get("folds")
                pred = Prediction(
                    path=r["path"],
                    prob_abnormal=None if prob is None else round(float(prob), 6),
                    label=r.get("label"),
                    warnings=r["warnings"],
                    error=r["error"],
                    seconds=round(r["seconds"], 3),
                    fold_probs=None if folds is None else [round(float(f), 6) for f in folds],
                    tta_spread=None if r.get("spread") is None else round(float(r["spread"]), 6),
                )
                if keep_images:
                    pred.image = r["image"]  # type: ignore[attr-defined]
                yield pred

    def predict(self, path: str | Path) -> Prediction:
        """Classify one NIfTI file or DICOM series folder."""
        return next(self.predict_many([path]))

    def saliency(
        self, image: torch.Tensor, method: str = "gradient", block: int = -1
    ) -> np.ndarray:
        """Where the model looks, for one preprocessed (C, x, y, z) volume: a map of the input's
        grid in [0, 1].

        ``gradient`` (the default): the positive part of the gradient of the abnormal logit with
        respect to each input voxel (the voxels whose brightening raises it), smoothed by a
        Gaussian of :data:`SALIENCY_SIGMA` voxels: on generated scans its maximum lies in a
        lesion on every tested abnormal scan for the small-data recipe (docs/training.md).
        ``gradcam``: MONAI's Grad-CAM of conv block ``block`` (default the last), which the
        network's few-voxel last blocks make coarse.
        """
        if not hasattr(self.network, "features"):
            raise ConfigError("saliency needs one network: run it with one fold's model")
        if method == "gradient":
            from scipy import ndimage

            with torch.enable_grad():
                x = torch.as_tensor(image, dtype=torch.float32)[None].to(self.device)
                x.requires_grad_(True)
                (grad,) = torch.autograd.grad(self.network(x).sum(), x)  # no weight gradients
            heat = ndimage.gaussian_filter(
                grad[0, 0].clamp_min(0).cpu().numpy().astype(np.float64), SALIENCY_SIGMA
            )
        elif method == "gradcam":
            from monai.visualize import GradCAM

            blocks = len(self.network.features)  # type: ignore[arg-type]
            if not -blocks <= block < blocks:
                raise ConfigError(f"saliency block {block}: the network has {blocks} blocks")
            cam = GradCAM(nn_module=self.network, target_layers=f"features.{block % blocks}.conv")
            with torch.enable_grad():
                x = torch.as_tensor(image)[None].to(self.device).requires_grad_(True)
                heat = cam(x=x, class_idx=0)[0, 0].detach().cpu().numpy()
        else:
            raise ConfigError(f"saliency method must be one of {', '.join(SALIENCY_METHODS)}")
        span = float(heat.max() - heat.min())
        out = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
        return np.asarray(out, dtype=np.float32)


def build_network(settings: dict[str, Any]) -> torch.nn.Module:
    """The network its settings describe: inference.yaml's ``network_def`` with the model's
    settings, or, with ``ensemble``, that many of them averaged (an exported CV ensemble)."""
    from app.config import load_config

    overrides = {k: settings[k] for k in MODEL_SETTINGS}

    def one() -> torch.nn.Module:
        return load_config("inference.yaml", overrides=overrides).get_parsed_content("network_def")

    ensemble = settings.get("ensemble")
    if not ensemble:
        return one()
    members = [one() for _ in range(int(ensemble["members"]))]
    return MeanProbabilityEnsemble(members, float(ensemble["temperature"]))


def _cv_means(folder: Path) -> dict[str, Any] | None:
    """The folds' mean validation metrics from ``cv_summary.json`` (no epoch: several)."""
    from app.readback import ReadBackError, read_cv_summary

    if not (folder / "cv_summary.json").is_file():
        return None
    try:
        stats = read_cv_summary(folder / "cv_summary.json")["mean_sd"]
    except ReadBackError as exc:
        raise CheckpointError(str(exc)) from None
    return {k: v["mean"] for k, v in stats.items()}


def _as_input(path: str | Path) -> ScanInput:
    found = find_inputs(path)
    if len(found) == 1:
        return found[0]
    if not found:
        return ScanInput(str(path), "unreadable", problem="no NIfTI file or DICOM series here")
    return ScanInput(
        str(path), "unreadable", problem=f"{len(found)} scans here: pass one at a time"
    )
