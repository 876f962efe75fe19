"""A severity model's figures on a labelled test set: the grades as well as the binary view.

Beside the binary figures of P(abnormal) = P(grade > 0) against normal vs any grade
(``app.evaluation.metrics.binary_metrics``), a severity model (``grades`` above 2) is judged on
its grades, each figure with its interval:

- the confusion matrix of true against predicted grade (the median grade,
  ``app.runtime.ordinal``);
- exact-grade accuracy (Wilson interval);
- quadratic-weighted kappa, the agreement measure of ordinal ratings (a grade two off costs
  four times one off; 1 perfect, 0 chance), and the mean absolute grade error: stratified
  bootstrap intervals (each grade's scans resampled apart, percentile);
- one-vs-rest ROC-AUC per grade, P(that grade) against the others (DeLong on the logit scale,
  as the binary ROC-AUC).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np

from app.evaluation.metrics import Estimate, auc_with_ci, wilson


def quadratic_weighted_kappa(true: np.ndarray, predicted: np.ndarray, grades: int) -> float:
    """Cohen's kappa with quadratic weights (Fleiss-Cohen) of two integer ratings in
    ``0..grades-1``: ``1 - sum(w * observed) / sum(w * expected)``, ``w = (i - j)^2``, expected
    from the two ratings' margins. 1 where the ratings cannot disagree (one grade throughout,
    the same in both)."""
    true, predicted = np.asarray(true, int), np.asarray(predicted, int)
    observed = np.zeros((grades, grades))
    np.add.at(observed, (true, predicted), 1.0)
    observed /= observed.sum()
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0))
    i, j = np.indices((grades, grades))
    weights = (i - j) ** 2
    chance = float((weights * expected).sum())
    if chance == 0:
        return 1.0
    return 1.0 - float((weights * observed).sum()) / chance


def _stratified_bootstrap(
    true: np.ndarray,
    predicted: np.ndarray,
    statistic: Any,
    confidence: float,
    n_resamples: int,
    seed: int,
) -> tuple[float, float]:
    """A percentile interval of ``statistic(true, predicted)`` over resamples that keep each
    true grade's count (its scans drawn with replacement among themselves)."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(true == g) for g in np.unique(true)]
    values = np.empty(n_resamples)
    for b in range(n_resamples):
        index = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        values[b] = statistic(true[index], predicted[index])
    alpha = (1 - confidence) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return float(low), float(high)


def severity_metrics(
    true: np.ndarray,
    probabilities: np.ndarray,
    grade_names: list[str],
    *,
    confidence: float,
    n_resamples: int,
    seed: int,
    auc_method: str | None = None,
) -> dict[str, Any]:
    """The grades' figures (see the module) of ``probabilities`` (scans, grades) against the
    ``true`` grades; JSON-ready (each estimate a dict of value, low, high, method)."""
    from app.runtime.ordinal import grades_of

    true = np.asarray(true, int)
    probabilities = np.asarray(probabilities, float)
    grades = len(grade_names)
    predicted = grades_of(probabilities)
    confusion = np.zeros((grades, grades), int)
    np.add.at(confusion, (true, predicted), 1)
    boot: dict[str, Any] = {"confidence": confidence, "n_resamples": n_resamples, "seed": seed}
    kappa = quadratic_weighted_kappa(true, predicted, grades)
    kappa_ci = _stratified_bootstrap(
        true, predicted, lambda t, p: quadratic_weighted_kappa(t, p, grades), **boot
    )
    mae = float(np.abs(true - predicted).mean())
    mae_ci = _stratified_bootstrap(true, predicted, lambda t, p: np.abs(t - p).mean(), **boot)
    per_grade = []
    for k, name in enumerate(grade_names):
        rest = int((true != k).sum())
        if (true == k).sum() and rest:
            auc = auc_with_ci(
                probabilities[:, k], (true == k).astype(int), confidence, n_resamples, seed,
                auc_method,
            )  # fmt: skip
        else:
            auc = Estimate(float("nan"), float("nan"), float("nan"), "no scans of this grade")
        per_grade.append({"grade": name, "scans": int((true == k).sum()), "roc_auc": asdict(auc)})
    bootstrap = f"stratified bootstrap by grade, percentile, {n_resamples} resamples"
    return {
        "grades": list(grade_names),
        "scans": len(true),
        "confusion": confusion.tolist(),
        "accuracy": asdict(wilson(int((true == predicted).sum()), len(true), confidence)),
        "quadratic_weighted_kappa": asdict(Estimate(kappa, *kappa_ci, bootstrap)),
        "mean_absolute_error": asdict(Estimate(mae, *mae_ci, bootstrap)),
        "per_grade": per_grade,
    }


def severity_lines(figures: dict[str, Any]) -> list[str]:
    """The grades' figures in words, for the console and the report."""

    def text(e: dict[str, Any]) -> str:
        return Estimate(**e).text()

    lines = [
        f"severity ({figures['scans']} scans, grades {', '.join(figures['grades'])}):",
        f"  quadratic-weighted kappa   {text(figures['quadratic_weighted_kappa'])}",
        f"  mean absolute grade error  {text(figures['mean_absolute_error'])}",
        f"  exact-grade accuracy       {text(figures['accuracy'])}",
    ]
    for row in figures["per_grade"]:
        lines.append(
            f"  {row['grade']} vs the rest ROC-AUC  {text(row['roc_auc'])} ({row['scans']} scans)"
        )
    names = figures["grades"]
    lines.append("  confusion (rows: true grade; columns: predicted): " + "  ".join(names))
    for name, row in zip(names, figures["confusion"], strict=True):
        lines.append(f"    {name}: " + " ".join(f"{n:4d}" for n in row))
    return lines
