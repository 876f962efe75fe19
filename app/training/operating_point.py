"""A single model's operating point: its temperature and threshold, chosen on its validation split
(as a cross-validation folder chooses them out of fold), recorded in its checkpoint.

The kept model predicts its validation scans once; the temperature that minimises their NLL
(``app.evaluation.metrics.fit_temperature``) and Youden's J threshold (:func:`youden_midpoint`, on the same scans) become
the checkpoint's ``temperature`` and ``threshold`` (on the temperature-scaled probability, the
one ``app.infer``, ``app.evaluate`` and the bundle print), with the sensitivity and specificity
the threshold gave there (Wilson intervals) in ``operating_point``. A validation split with
fewer than :data:`MIN_PER_CLASS` scans of either class chooses nothing: 0.5 and no scaling stay,
and ``operating_point`` says why.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from app.evaluation.metrics import fit_temperature, logits_of, wilson
from app.readback import read_split
from app.run_folder import BEST_MODEL, OPERATING_POINT, SPLIT
from app.runtime.files import atomic_write, atomic_write_text

#: fewer validation scans of a class than this choose no threshold (Youden's J on 5 scans a
#: class moves by 0.1 with one scan)
MIN_PER_CLASS = 10


def youden_midpoint(logits: np.ndarray, labels: np.ndarray) -> float:
    """The logit cut with the most room on either side among those that reach the best Youden's
    J (sensitivity + specificity - 1): the middle of the widest range of thresholds that call
    the scans alike and reach it. A split the scores separate perfectly is cut halfway between
    its highest normal and its lowest abnormal score, not at either (``choose_threshold``'s
    highest best cut sits on the lowest abnormal score, where a new scan falls either way)."""
    z = np.unique(logits)
    cuts = np.concatenate([[z[0] - 1.0], (z[1:] + z[:-1]) / 2, [z[-1] + 1.0]])
    positive, negative = logits[labels == 1], logits[labels == 0]
    sensitivity = (positive[None, :] >= cuts[:, None]).mean(axis=1)
    specificity = (negative[None, :] < cuts[:, None]).mean(axis=1)
    j = sensitivity + specificity - 1
    best = np.flatnonzero(j >= j.max() - 1e-12)
    # cut i lies between scores z[i - 1] and z[i]: a run of cuts i..k leaves every threshold
    # from z[i - 1] to z[k] calling the scans alike (beyond the ends: the end cuts themselves)
    low = np.concatenate([[cuts[0]], z])
    high = np.concatenate([z, [cuts[-1]]])
    runs = np.split(best, np.flatnonzero(np.diff(best) > 1) + 1)
    widest = max(runs, key=lambda r: (high[r[-1]] - low[r[0]], -r[0]))
    return float((low[widest[0]] + high[widest[-1]]) / 2)


def choose(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Temperature, threshold (raw and on the scaled probability) and what they gave on the
    scans they were chosen on; ``chosen`` False (threshold 0.5, temperature 1) when a class has
    fewer than :data:`MIN_PER_CLASS` scans."""

    probs, labels = np.asarray(probs, float), np.asarray(labels, int)
    normal, abnormal = int((labels == 0).sum()), int((labels == 1).sum())
    record: dict[str, Any] = {"scans": len(labels), "normal": normal, "abnormal": abnormal}
    if min(normal, abnormal) < MIN_PER_CLASS:
        return {
            **record,
            "chosen": False,
            "method": (
                f"none: the validation split holds {normal} normal and {abnormal} abnormal "
                f"scans, fewer than {MIN_PER_CLASS} of a class; 0.5 and no temperature kept"
            ),
            "threshold": 0.5,
            "temperature": 1.0,
        }
    logits = logits_of(probs)
    cut = youden_midpoint(logits, labels)
    temperature = fit_temperature(logits, labels)
    separated = logits[labels == 1].min() > logits[labels == 0].max()
    if separated:  # the likelihood keeps rising as T falls: the scans cannot bound a sharpening
        temperature = max(temperature, 1.0)
    scaled = float(1 / (1 + math.exp(-cut / temperature)))
    called = logits >= cut
    sens = wilson(int((called & (labels == 1)).sum()), abnormal)
    spec = wilson(int((~called & (labels == 0)).sum()), normal)
    return {
        **record,
        "chosen": True,
        "method": "Youden's J (the middle of its best cuts) on the validation split"
        + (", which it separates perfectly (no temperature below 1)" if separated else ""),
        # to 6 significant digits: a threshold near 0 or 1 stays itself (rounded to decimals,
        # 4.5e-5 became 0, and every scan was called abnormal)
        "threshold": float(f"{scaled:.6g}"),
        "temperature": float(temperature),
        "sensitivity": [sens.value, sens.low, sens.high],
        "specificity": [spec.value, spec.low, spec.high],
    }


def record_operating_point(run: Path) -> dict[str, Any]:
    """Predict the run's validation scans with its kept model (no scaling, threshold 0.5),
    choose the operating point, write it into ``best_model.pt`` (atomically) and
    ``operating_point.json``; returns it."""
    import torch

    from app.inference.checkpoints import load_model, pick_device
    from app.inference.classifier import Classifier

    items = read_split(run / SPLIT)["validation"]
    network, settings = load_model(run / BEST_MODEL)
    plain = {k: v for k, v in settings.items() if k not in ("threshold", "temperature")}
    clf = Classifier(network, plain, pick_device("auto"), 0.5, checkpoint=run / BEST_MODEL)
    probs, labels = [], []
    for item, pred in zip(items, clf.predict_many([str(i["image"]) for i in items]), strict=True):
        if pred.prob_abnormal is not None:
            probs.append(pred.prob_abnormal)
            labels.append(int(int(item["label"]) > 0))  # a severity run: any grade is abnormal
    point = choose(np.array(probs), np.array(labels))
    data = torch.load(run / BEST_MODEL, map_location="cpu", weights_only=True)
    info = dict(data.get("run_info") or {})
    info["threshold"] = point["threshold"]
    info["temperature"] = point["temperature"]
    info["operating_point"] = {
        k: v for k, v in point.items() if k not in ("threshold", "temperature")
    }
    data["run_info"] = info

    def save(f: Any) -> None:
        torch.save(data, f)

    atomic_write(run / BEST_MODEL, save)
    atomic_write_text(run / OPERATING_POINT, json.dumps(point, indent=1))
    return point
