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

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.config import load_config
from app.errors import ConfigError
from app.inference.checkpoints import (
    CheckpointError,
    load_cv_ensemble,
    load_model,
    pick_device,
    resolve_checkpoint,
)
from app.inference.model_card import ModelCard
from app.inference.reading import ScanPreparer, as_input, prepared_batches
from app.inference.saliency import saliency_map
from app.model_settings import MODEL_SETTINGS, SettingsError, validate_settings
from app.run_folder import CV_CALIBRATION
from app.runtime.inferers import PRECISIONS, resolve_precision
from app.runtime.ordinal import grades_of
from app.runtime.scanqc import Limits, TrainingContext
from app.runtime.scans import ScanInput
from app.runtime.writer import BINARY_VIEW, sentence
from nets.ensemble import MeanProbabilityEnsemble
from transforms.augment import LEFT_RIGHT_DIM

__all__ = ["CheckpointError", "Classifier", "Prediction"]


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
    #: a severity model's grade (the median of its grade probabilities) by name; ``None`` for
    #: a binary model (``label`` is then the prediction; a severity model's ``label`` is
    #: normal or abnormal at its threshold, the binary view)
    grade: str | None = None
    #: a severity model's probability of each grade, in the grades' order
    grade_probs: list[float] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def sentence(self) -> str:
        """The reference's console line, for both classes, with the scan's QC warnings (and a
        severity model's grade)."""
        return sentence(
            self.path, self.prob_abnormal, self.label, self.warnings, self.error,
            self.grade, self.grade_probs,
        )  # fmt: skip


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
        keys = (*MODEL_SETTINGS, "threshold", "temperature", "class_names")
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

        if checkpoint is not None and (Path(checkpoint) / CV_CALIBRATION).is_file():
            return cls.load_ensemble(Path(checkpoint), device, threshold, limits, precision)
        path = resolve_checkpoint(checkpoint)
        network, settings = load_model(path)
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
        ensemble, settings = load_cv_ensemble(folder)
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

    def card_json(self) -> dict[str, Any]:
        """The model card as JSON-ready data: identity, description, caveats (``app.serve``'s
        ``GET /model``, the model card a tracked run logs)."""
        return {**self.identity(), "description": self.describe(), "caveats": self.caveats()}

    @property
    def folds(self) -> int:
        """How many fold models the model averages (0: one model, not an ensemble)."""
        return len(self.network.members) if isinstance(self.network, MeanProbabilityEnsemble) else 0

    @property
    def grades(self) -> list[str] | None:
        """A severity model's grade names, in order; ``None`` for a binary model."""
        return self.class_names if int(self.settings.get("grades", 2)) > 2 else None

    @property
    def label_names(self) -> list[str]:
        """The names of the label at the threshold: the class names, or a severity model's
        binary view, normal and abnormal."""
        return list(BINARY_VIEW) if self.grades else self.class_names

    @torch.inference_mode()
    def _forward(
        self, images: list[torch.Tensor]
    ) -> list[tuple[float, str, list[float] | None, float | None, list[float] | None]]:
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
            grade_probs = out.get("grade_probs")
            results.append(
                (
                    float(out["prob"]),
                    self.label_names[int(out["pred"])],
                    None if fold_probs is None else fold_probs[i],
                    None if spread is None else float(spread[i]),
                    None if grade_probs is None else [float(p) for p in grade_probs],
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
        :func:`app.runtime.scans.find_inputs`. Bad inputs yield a prediction with ``error`` set; memory
        holds a few batches at a time. With ``keep_images`` each prediction carries its
        preprocessed volume as ``prediction.image`` (for montages and saliency).
        """
        scans = [s if isinstance(s, ScanInput) else as_input(s) for s in inputs]
        batches = prepared_batches(
            scans, self.preparer, batch_size, workers, pin_memory=self.device.type == "cuda"
        )
        for batch in batches:
            ready = [r for r in batch if r["image"] is not None]
            results = self._forward([r["image"] for r in ready]) if ready else []
            for r, (p, label, folds, spread, grades) in zip(ready, results, strict=True):
                if not math.isfinite(p) or not all(map(math.isfinite, grades or [])):
                    r["error"] = "the model gave a non-finite probability (NaN or inf): no label"
                    continue
                r["prob"], r["label"], r["folds"], r["spread"] = p, label, folds, spread
                r["grade_probs"] = grades
            for r in batch:
                prob = r.get("prob")
                folds = r.get("folds")
                pred = Prediction(
                    path=r["path"],
                    prob_abnormal=None if prob is None else round(float(prob), 6),
                    label=r.get("label"),
                    # a failed scan: its reason only (warnings speak of an output it lacks)
                    warnings=r["warnings"] if r["error"] is None else [],
                    error=r["error"],
                    seconds=round(r["seconds"], 3),
                    fold_probs=None if folds is None else [round(float(f), 6) for f in folds],
                    tta_spread=None if r.get("spread") is None else round(float(r["spread"]), 6),
                )
                if r.get("grade_probs") is not None and self.grades:
                    probs = [round(float(q), 6) for q in r["grade_probs"]]
                    pred.grade_probs = probs
                    pred.grade = self.grades[int(grades_of(np.array([probs]))[0])]
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
        grid in [0, 1] (:func:`app.inference.saliency.saliency_map`: ``gradient``, the smoothed
        positive input gradient of the abnormal logit, or ``gradcam`` of conv block ``block``)."""

        return saliency_map(self.network, image, self.device, method, block)
