"""Metrics of a binary classifier on a labelled test set, each with its 95% confidence interval.

The statistics come from well-kept libraries: scikit-learn's metrics (ROC-AUC, confusion matrix,
Brier score, ROC curve), DeLong's variance of the ROC-AUC from ``scipy.stats.rankdata`` midranks
with a logit-scale interval (or ``scipy.stats.bootstrap``: a seeded, stratified BCa bootstrap,
the Mann-Whitney U statistic computed for all resamples at once) and
``scipy.stats.binomtest(...).proportion_ci`` (Wilson intervals for accuracy, sensitivity,
specificity, PPV and NPV). Only the expected calibration error, a weighted mean over bins, is
computed here.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from app.cli import config_values


@dataclass(frozen=True)
class Estimate:
    """A value with its confidence interval (``nan`` where the data cannot give one)."""

    value: float
    low: float
    high: float
    method: str

    def text(self, digits: int = 3) -> str:
        if math.isnan(self.value):
            return "n/a"
        return f"{self.value:.{digits}f} ({self.low:.{digits}f}-{self.high:.{digits}f})"


@dataclass
class BinaryMetrics:
    """What :func:`binary_metrics` measures; ``rows()`` gives a pandas-friendly table."""

    n: int
    n_positive: int
    n_negative: int
    threshold: float
    confidence: float
    roc_auc: Estimate
    accuracy: Estimate
    sensitivity: Estimate
    specificity: Estimate
    ppv: Estimate
    npv: Estimate
    #: the mean of sensitivity and specificity: what accuracy means when the classes are unequal
    balanced_accuracy: Estimate
    #: area under the precision-recall curve (average precision), beside ROC-AUC for rare findings
    pr_auc: Estimate
    brier: float
    ece: float
    confusion: dict[str, int] = field(default_factory=dict)

    ESTIMATES = (
        "roc_auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "balanced_accuracy",
        "pr_auc",
    )  # fmt: skip

    def rows(self) -> list[dict[str, Any]]:
        """One row per metric: ``metric, value, ci_low, ci_high, method`` (``pd.DataFrame(...)``)."""
        out: list[dict[str, Any]] = []
        for name in self.ESTIMATES:
            e: Estimate = getattr(self, name)
            out.append(
                {
                    "metric": name,
                    "value": e.value,
                    "ci_low": e.low,
                    "ci_high": e.high,
                    "method": e.method,
                }
            )
        for name in ("brier", "ece"):
            out.append(
                {
                    "metric": name,
                    "value": getattr(self, name),
                    "ci_low": math.nan,
                    "ci_high": math.nan,
                    "method": "",
                }
            )
        return out

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluation_settings() -> dict[str, Any]:
    """The defaults of every function here and of ``app.evaluate``: ``confidence``, ``auc_ci``,
    ``bootstrap_resamples``, ``bootstrap_seed`` (``configs/evaluate.yaml``, ``evaluation``) and
    ``threshold`` (``configs/common.yaml``)."""

    values = dict(config_values("evaluate.yaml")["evaluation"])
    values["threshold"] = config_values("common.yaml")["threshold"]
    return values


def _or_default(value: Any, key: str) -> Any:
    return evaluation_settings()[key] if value is None else value


def wilson(successes: int, trials: int, confidence: float | None = None) -> Estimate:
    """A proportion with its Wilson score interval (``nan`` for no trials)."""
    from scipy.stats import binomtest

    confidence = float(_or_default(confidence, "confidence"))
    if trials == 0:
        return Estimate(math.nan, math.nan, math.nan, "wilson")
    ci = binomtest(int(successes), int(trials)).proportion_ci(confidence, method="wilson")
    return Estimate(successes / trials, float(ci.low), float(ci.high), "wilson")


def _auc_statistic(positive: np.ndarray, negative: np.ndarray, axis: int = -1) -> np.ndarray:
    """ROC-AUC as the Mann-Whitney U of positives over negatives, for every resample at once."""
    from scipy.stats import mannwhitneyu

    u = mannwhitneyu(positive, negative, axis=axis).statistic
    return u / (positive.shape[axis] * negative.shape[axis])


#: below this many scans in the smaller class the ROC-AUC interval is flagged: simulated
#: coverage of the 95% DeLong-logit interval (true AUC 0.80, 2,000 sets each) was 0.915 at
#: 5 of 50, 0.949 at 10/40, 0.959 at 20/20 and 50/50 (tests/test_evaluate.py measures it)
MIN_CLASS_FOR_AUC_CI = 10


def delong_auc(positive: np.ndarray, negative: np.ndarray) -> tuple[float, float]:
    """ROC-AUC and its DeLong variance (midranks, Sun and Xu 2014's fast algorithm); the
    variance is Hanley and McNeil's where DeLong's is zero or undefined (perfect separation,
    one scan in a class)."""
    m, n = len(positive), len(negative)
    auc, v10, v01 = _placements(positive, negative)
    var = float(v10.var(ddof=1) / m + v01.var(ddof=1) / n) if m > 1 and n > 1 else math.nan
    if not math.isfinite(var) or var <= 0:
        a = min(max(auc, 0.5 / (m * n)), 1 - 0.5 / (m * n))
        q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
        var = (a * (1 - a) + (m - 1) * (q1 - a * a) + (n - 1) * (q2 - a * a)) / (m * n)
    return auc, var


def _placements(positive: np.ndarray, negative: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """ROC-AUC and DeLong's placement values (V10 per positive, V01 per negative)."""
    from scipy.stats import rankdata

    m, n = len(positive), len(negative)
    together = rankdata(np.r_[positive, negative])
    auc = float((together[:m].sum() - m * (m + 1) / 2) / (m * n))
    v10 = (together[:m] - rankdata(positive)) / n
    v01 = 1 - (together[m:] - rankdata(negative)) / m
    return auc, v10, v01


def paired_auc_difference(
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    labels: np.ndarray,
    confidence: float | None = None,
) -> Estimate:
    """ROC-AUC of ``probs_a`` minus that of ``probs_b`` on the same scans, with DeLong's
    interval for correlated ROC curves (DeLong, DeLong and Clarke-Pearson 1988: the covariance
    of the two AUCs from their placement values)."""
    from scipy.stats import norm

    confidence = float(_or_default(confidence, "confidence"))
    a, b, y = (np.asarray(v) for v in (probs_a, probs_b, labels))
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    if m < 2 or n < 2:
        return Estimate(math.nan, math.nan, math.nan, "DeLong paired")
    auc_a, v10_a, v01_a = _placements(a[pos], a[neg])
    auc_b, v10_b, v01_b = _placements(b[pos], b[neg])
    s10 = np.cov(np.vstack([v10_a, v10_b]))
    s01 = np.cov(np.vstack([v01_a, v01_b]))
    var = float(
        (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    )
    diff = auc_a - auc_b
    half = float(norm.ppf(0.5 + confidence / 2)) * math.sqrt(max(var, 0.0))
    return Estimate(diff, diff - half, diff + half, "DeLong paired")


def perfect_separation_probability(auc: float, positives: int, negatives: int) -> float:
    """The probability that ``positives`` and ``negatives`` scans drawn from a binormal
    equal-variance model with true ROC-AUC ``auc`` are perfectly separated (every positive
    scored above every negative): the integral over t of the density of the lowest positive,
    m phi(t - d) (1 - Phi(t - d))^(m - 1), times Phi(t)^n, with d = sqrt(2) Phi^-1(auc)."""
    from scipy.stats import norm

    if auc <= 0.0:
        return 0.0
    if auc >= 1.0:
        return 1.0
    d = math.sqrt(2.0) * float(norm.ppf(auc))
    m, n = int(positives), int(negatives)
    t = np.linspace(d - 12.0, d + 12.0, 24_001)  # the lowest positive lies within 12 sd of d
    log_density = (
        math.log(m) + norm.logpdf(t - d) + (m - 1) * norm.logsf(t - d) + n * norm.logcdf(t)
    )
    value = float(np.trapezoid(np.exp(log_density), t))
    return min(max(value, 0.0), 1.0)


@functools.lru_cache(maxsize=256)
def perfect_separation_bound(positives: int, negatives: int, alpha: float) -> float:
    """The exact lower confidence bound of ROC-AUC after perfect separation: the true AUC at
    which a perfectly separated set has probability ``alpha`` (binormal model,
    :func:`perfect_separation_probability`). Every AUC below it makes what was seen rarer than
    ``alpha``, so the interval [bound, 1] misses the truth on at most ``alpha`` of sets."""
    from scipy.optimize import brentq

    def excess(auc: float) -> float:
        return perfect_separation_probability(auc, positives, negatives) - alpha

    return float(brentq(excess, 1e-9, 1.0 - 1e-12, xtol=1e-7))


def auc_with_ci(
    probs: np.ndarray,
    labels: np.ndarray,
    confidence: float | None = None,
    n_resamples: int | None = None,
    seed: int | None = None,
    method: str | None = None,
) -> Estimate:
    """ROC-AUC (scikit-learn) and its interval.

    ``delong`` (the configs' default): DeLong's variance on the logit scale (the interval stays inside
    (0, 1) and keeps its coverage on small and imbalanced sets); ``bootstrap``: a seeded
    stratified BCa bootstrap (positives and negatives resampled separately). With fewer than
    :data:`MIN_CLASS_FOR_AUC_CI` scans in the smaller class the method says the interval is
    unreliable (its coverage falls below 95%). A perfectly separated set (ROC-AUC 1 or 0) gets
    the exact interval of :func:`_separated` with either method.
    """
    from scipy.stats import norm
    from sklearn.metrics import roc_auc_score

    confidence = float(_or_default(confidence, "confidence"))
    n_resamples = int(_or_default(n_resamples, "bootstrap_resamples"))
    seed = int(_or_default(seed, "bootstrap_seed"))
    method = str(_or_default(method, "auc_ci"))
    probs, labels = np.asarray(probs, float), np.asarray(labels, int)
    positive, negative = probs[labels == 1], probs[labels == 0]
    if len(positive) == 0 or len(negative) == 0:
        return Estimate(math.nan, math.nan, math.nan, method)
    value = float(roc_auc_score(labels, probs))
    fewest = min(len(positive), len(negative))
    caveat = (
        f"; UNRELIABLE: {fewest} scans in the smaller class (fewer than "
        f"{MIN_CLASS_FOR_AUC_CI}), coverage below {confidence:.0%}"
        if fewest < MIN_CLASS_FOR_AUC_CI
        else ""
    )
    if method not in ("delong", "bootstrap"):
        raise ValueError(f"method must be 'delong' or 'bootstrap', got {method!r}")
    if value in (0.0, 1.0):
        return _separated(value, len(positive), len(negative), confidence, caveat)
    if method == "delong":
        _, var = delong_auc(positive, negative)
        m, n = len(positive), len(negative)
        a = min(max(value, 0.5 / (m * n)), 1 - 0.5 / (m * n))
        z = float(norm.ppf(0.5 + confidence / 2))
        half = z * math.sqrt(var) / (a * (1 - a))
        centre = math.log(a / (1 - a))
        low, high = (1 / (1 + math.exp(-(centre + s * half))) for s in (-1, 1))
        return Estimate(value, min(low, value), max(high, value), "DeLong, logit" + caveat)
    return Estimate(
        value,
        *_bootstrap_interval(positive, negative, value, confidence, n_resamples, seed),
        f"stratified bootstrap ({n_resamples}, seed {seed})" + caveat,
    )


#: the method of a perfectly separated set's ROC-AUC interval
EXACT_SEPARATION = "exact bound for perfect separation (binormal)"


def _separated(value: float, m: int, n: int, confidence: float, caveat: str) -> Estimate:
    """A perfectly separated set (ROC-AUC 1, or 0 when every negative is scored higher): no
    variance estimate says anything there (DeLong's is 0; the bootstrap's resamples are all
    separated), so the interval is the exact one, [bound, 1] with the bound at which perfect
    separation has probability (1 - confidence) / 2 (:func:`perfect_separation_bound`): the
    lower tail of a two-sided interval, as DeLong's lower end is; mirrored for 0. Sets of any
    true AUC then miss it from above on at most that share (binormal model)."""
    bound = perfect_separation_bound(m, n, (1.0 - confidence) / 2)
    low, high = (bound, 1.0) if value == 1.0 else (0.0, 1.0 - bound)
    return Estimate(value, low, high, EXACT_SEPARATION + caveat)


def _balanced_statistic(positive: np.ndarray, negative: np.ndarray, axis: int = -1) -> np.ndarray:
    """(sensitivity + specificity) / 2 of 0/1 "called right" flags, vectorised for scipy."""
    return (np.mean(positive, axis=axis) + np.mean(negative, axis=axis)) / 2


def _balanced_accuracy(
    predicted: np.ndarray,
    labels: np.ndarray,
    confidence: float,
    n_resamples: int | None,
    seed: int | None,
) -> Estimate:
    """Balanced accuracy with a stratified bootstrap interval (each class resampled apart)."""
    right_pos = (predicted[labels == 1] == 1).astype(float)
    right_neg = (predicted[labels == 0] == 0).astype(float)
    if not (len(right_pos) and len(right_neg)):
        return Estimate(math.nan, math.nan, math.nan, "undefined: one class only")
    value = float(_balanced_statistic(right_pos, right_neg))
    resamples = int(_or_default(n_resamples, "bootstrap_resamples"))
    low, high = _bootstrap_interval(
        right_pos, right_neg, value, confidence, resamples,
        int(_or_default(seed, "bootstrap_seed")), _balanced_statistic,
    )  # fmt: skip
    if low == high:  # every resample alike (all called right, say): Wilson's per class instead
        sens, spec = (
            wilson(int(right_pos.sum()), len(right_pos), confidence),
            wilson(int(right_neg.sum()), len(right_neg), confidence),
        )
        return Estimate(value, (sens.low + spec.low) / 2, (sens.high + spec.high) / 2,
                        "mean of the classes' Wilson intervals")  # fmt: skip
    return Estimate(value, low, high, f"stratified bootstrap ({resamples})")


def _ap_statistic(positive: np.ndarray, negative: np.ndarray, axis: int = -1) -> np.ndarray:
    """Average precision, vectorised for scipy: the mean over the abnormal scans of the
    precision at each one's score (every scan scored at or above it counted, ties included:
    scikit-learn's ``average_precision_score``, ``tests/test_imbalance.py`` checks it)."""
    pos = np.moveaxis(np.asarray(positive, float), axis, -1)
    neg = np.moveaxis(np.asarray(negative, float), axis, -1)
    above_pos = (pos[..., None, :] >= pos[..., :, None]).sum(axis=-1)
    above_neg = (neg[..., None, :] >= pos[..., :, None]).sum(axis=-1)
    return np.asarray((above_pos / (above_pos + above_neg)).mean(axis=-1))


def _pr_auc(
    probs: np.ndarray,
    labels: np.ndarray,
    confidence: float,
    n_resamples: int | None,
    seed: int | None,
) -> Estimate:
    """Average precision (the area under the precision-recall curve) with a stratified
    percentile bootstrap interval; chance is the share of abnormal scans."""
    positive, negative = probs[labels == 1], probs[labels == 0]
    if not (len(positive) and len(negative)):
        return Estimate(math.nan, math.nan, math.nan, "undefined: one class only")
    value = float(_ap_statistic(positive, negative))
    resamples = int(_or_default(n_resamples, "bootstrap_resamples"))
    low, high = _bootstrap_interval(
        positive, negative, value, confidence, resamples, int(_or_default(seed, "bootstrap_seed")),
        _ap_statistic, percentile=True,
    )  # fmt: skip
    return Estimate(value, low, high, f"stratified percentile bootstrap ({resamples})")


def _bootstrap_interval(
    positive: np.ndarray,
    negative: np.ndarray,
    value: float,
    confidence: float,
    n_resamples: int,
    seed: int,
    statistic: Any = None,
    percentile: bool = False,
) -> tuple[float, float]:
    """A stratified bootstrap interval of ``statistic`` (default: ROC-AUC) over the two
    classes' values, BCa where defined, else percentile."""
    from scipy.stats import bootstrap

    statistic = _auc_statistic if statistic is None else statistic

    low = high = value
    if len(positive) > 1 and len(negative) > 1 and np.ptp(np.r_[positive, negative]) > 0:
        for kind in ("BCa", "percentile"):  # BCa is undefined when every resample is equal
            with warnings.catch_warnings():  # ... SciPy says so and gives NaN: handled below
                warnings.simplefilter("ignore", RuntimeWarning)
                warnings.filterwarnings("ignore", "The BCa confidence interval cannot")
                result = bootstrap(
                    (positive, negative),
                    statistic,
                    n_resamples=n_resamples,
                    confidence_level=confidence,
                    method="percentile" if percentile else kind,
                    vectorized=True,
                    random_state=np.random.default_rng(seed),
                )
            low, high = (
                float(result.confidence_interval.low),
                float(result.confidence_interval.high),
            )
            if not (math.isnan(low) or math.isnan(high)):
                break
    return low, high


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Mean |predicted probability - observed frequency| over equal-width bins, weighted by
    each bin's share of the scans."""
    probs, labels = np.asarray(probs, float), np.asarray(labels, float)
    if len(probs) == 0:
        return math.nan
    which = np.minimum((probs * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum() * abs(probs[inside].mean() - labels[inside].mean())
    return float(total / len(probs))


def binary_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    threshold: float | None = None,
    confidence: float | None = None,
    n_resamples: int | None = None,
    seed: int | None = None,
    auc_method: str | None = None,
) -> BinaryMetrics:
    """Every figure of a test set: P(abnormal) ``probs`` against 0/1 ``labels``; a scan is
    called abnormal at ``probs >= threshold`` (as ``app.infer`` calls it). ``None``: the
    configs' value (:func:`evaluation_settings`)."""
    from sklearn.metrics import brier_score_loss, confusion_matrix

    threshold = float(_or_default(threshold, "threshold"))
    confidence = float(_or_default(confidence, "confidence"))
    probs, labels = np.asarray(probs, float), np.asarray(labels, int)
    if probs.shape != labels.shape or probs.ndim != 1:
        raise ValueError(f"probs {probs.shape} and labels {labels.shape} must be equal 1D arrays")
    if not set(np.unique(labels)) <= {0, 1}:
        raise ValueError("labels must be 0 (normal) or 1 (abnormal)")
    if not np.isfinite(probs).all() or probs.min(initial=0) < 0 or probs.max(initial=0) > 1:
        raise ValueError("probabilities must lie in [0, 1]")
    predicted = (probs >= threshold).astype(int)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(labels, predicted, labels=[0, 1]).ravel())
    n = len(labels)
    return BinaryMetrics(
        n=n,
        n_positive=tp + fn,
        n_negative=tn + fp,
        threshold=float(threshold),
        confidence=confidence,
        roc_auc=auc_with_ci(probs, labels, confidence, n_resamples, seed, auc_method),
        accuracy=wilson(tp + tn, n, confidence),
        sensitivity=wilson(tp, tp + fn, confidence),
        specificity=wilson(tn, tn + fp, confidence),
        ppv=wilson(tp, tp + fp, confidence),
        npv=wilson(tn, tn + fn, confidence),
        balanced_accuracy=_balanced_accuracy(predicted, labels, confidence, n_resamples, seed),
        pr_auc=_pr_auc(probs, labels, confidence, n_resamples, seed),
        brier=float(brier_score_loss(labels, probs)) if n else math.nan,
        ece=expected_calibration_error(probs, labels),
        confusion={"tp": tp, "fp": fp, "tn": tn, "fn": fn},
    )


def logits_of(probs: np.ndarray) -> np.ndarray:
    """``log(p / (1 - p))``, with ``p`` kept within 1e-7 of 0 and 1."""
    p = np.clip(np.asarray(probs, float), 1e-7, 1 - 1e-7)
    return np.asarray(np.log(p) - np.log1p(-p))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean binary cross-entropy of sigmoid(logits / temperature)."""
    z = logits / temperature
    return float(np.mean(np.logaddexp(0, z) - labels * z))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling: the T in [0.05, 20] that minimises the NLL of sigmoid(logit / T)."""
    from scipy.optimize import minimize_scalar

    found = minimize_scalar(
        lambda log_t: nll(logits, labels, math.exp(log_t)),
        bounds=(math.log(0.05), math.log(20.0)),
        method="bounded",
    )
    best = math.exp(float(found.x))
    return best if nll(logits, labels, best) <= nll(logits, labels, 1.0) else 1.0


def unscaled_probabilities(fold_probs: np.ndarray, temperature: float) -> np.ndarray:
    """An ensemble's probabilities without temperature scaling: the mean over folds of
    ``sigmoid(temperature * logit(p))`` for ``fold_probs`` (scans, folds) that were each scaled
    by ``temperature`` (what the fold models said, before calibration, averaged)."""
    logits = logits_of(fold_probs)
    return np.asarray(np.mean(1.0 / (1.0 + np.exp(-temperature * logits)), axis=1))


def calibration_figures(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Negative log-likelihood, Brier score and expected calibration error of ``probs``."""
    from sklearn.metrics import brier_score_loss, log_loss

    probs, labels = np.asarray(probs, float), np.asarray(labels, int)
    return {
        "nll": float(log_loss(labels, np.clip(probs, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "brier": float(brier_score_loss(labels, probs)),
        "ece": expected_calibration_error(probs, labels),
    }


def ensemble_figures(
    fold_probs: np.ndarray,
    labels: np.ndarray,
    temperature: float,
    confidence: float | None = None,
    n_resamples: int | None = None,
    seed: int | None = None,
    auc_method: str | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """What a cross-validation ensemble's members and calibration did on a test set.

    Args:
        fold_probs: (scans, folds) temperature-scaled probabilities of each fold model.
        labels: 0/1 per scan.
        temperature: the temperature that scaled them (fitted out of fold).

    Returns:
        Per fold ``{"fold", "roc_auc": Estimate, "brier", "ece"}`` (ROC-AUC does not depend on
        the temperature), and ``{"temperature", "before": ..., "after": ...}``: the ensemble's
        NLL, Brier score and ECE with its fold probabilities unscaled, then scaled.
    """
    fold_probs, labels = np.asarray(fold_probs, float), np.asarray(labels, int)
    if fold_probs.ndim != 2 or fold_probs.shape[0] != labels.shape[0]:
        raise ValueError(f"fold_probs {fold_probs.shape} must be (scans, folds) for {labels.shape}")
    folds = []
    for k in range(fold_probs.shape[1]):
        p = fold_probs[:, k]
        folds.append(
            {
                "fold": k,
                "roc_auc": auc_with_ci(p, labels, confidence, n_resamples, seed, auc_method),
                **{
                    name: value
                    for name, value in calibration_figures(p, labels).items()
                    if name != "nll"
                },
            }
        )
    calibration = {
        "temperature": float(temperature),
        "before": calibration_figures(unscaled_probabilities(fold_probs, temperature), labels),
        "after": calibration_figures(fold_probs.mean(axis=1), labels),
    }
    return folds, calibration
