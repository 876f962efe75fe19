"""The evaluation as one self-contained HTML page: model, data, date, metrics, pictures, scans."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from app.evaluation.plots import CALIBRATION_PNG, CONFUSION_PNG, ROC_PNG
from app.plots import embedded_png
from app.run_folder import REPORT_HTML
from app.runtime.files import atomic_write_text

NAMES = {
    "roc_auc": "ROC-AUC",
    "accuracy": "accuracy",
    "sensitivity": "sensitivity (recall of abnormal)",
    "specificity": "specificity",
    "ppv": "PPV (precision)",
    "npv": "NPV",
    "brier": "Brier score",
    "ece": "expected calibration error (10 bins)",
}


def _num(value: Any) -> str:
    return (
        "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
    )


def _metric_rows(metrics: dict[str, Any]) -> str:
    e = html.escape
    table = []
    for row in metrics["rows"]:
        ci = (
            f"{_num(row['ci_low'])}-{_num(row['ci_high'])}" if not math.isnan(row["ci_low"]) else ""
        )
        table.append(
            f"<tr><td>{e(NAMES.get(row['metric'], row['metric']))}</td>"
            f"<td class=num>{_num(row['value'])}</td><td class=num>{ci}</td>"
            f"<td>{e(row['method'])}</td></tr>"
        )
    return "".join(table)


def _scan_table(rows: list[dict[str, Any]]) -> str:
    """Every scan: path, true class, P(abnormal) (an ensemble's folds too), predicted, error."""
    e = html.escape
    scans = []
    fold_keys = [k for k in (rows[0] if rows else {}) if k.startswith("prob_fold_")]
    for r in rows:
        prob = "" if r["prob_abnormal"] == "" else f"{100 * float(r['prob_abnormal']):.1f}%"
        wrong = r["predicted"] != "" and int(r["predicted"]) != int(r["true_label"])
        folds = (  # an ensemble: what each fold model said, where they disagree
            "<td class=num>"
            + " / ".join(f"{100 * float(r[k]):.1f}" for k in fold_keys if r[k] != "")
            + "</td>"
            if fold_keys
            else ""
        )
        scans.append(
            f"<tr class={'wrong' if wrong else 'ok'}><td class=path>{e(str(r['path']))}</td>"
            f"<td>{e(str(r['true_name']))}</td><td class=num>{prob}</td>{folds}"
            f"<td>{e(str(r['predicted_name']))}</td><td>{e(str(r['error']))}</td></tr>"
        )
    fold_head = "<th>each fold, %</th>" if fold_keys else ""
    return (
        f"<table><tr><th>path</th><th>true</th><th>P(abnormal)</th>{fold_head}<th>predicted</th>"
        f"<th>error</th></tr>\n{''.join(scans)}</table>"
    )


def _ensemble_section(summary: dict[str, Any]) -> str:
    """A cross-validation ensemble's members and calibration ('' for one model)."""
    if not summary.get("folds"):
        return ""
    e = html.escape
    metrics = summary["metrics"]
    fold_rows = "".join(
        f"<tr><td>fold {f['fold']}</td><td class=num>{_num(f['roc_auc']['value'])}</td>"
        f"<td class=num>{_num(f['roc_auc']['low'])}-{_num(f['roc_auc']['high'])}</td>"
        f"<td class=num>{_num(f['brier'])}</td><td class=num>{_num(f['ece'])}</td></tr>"
        for f in summary["folds"]
    )
    cal = summary["calibration"]
    cal_rows = "".join(
        f"<tr><td>{e(what)}</td><td class=num>{_num(cal['before'][k])}</td>"
        f"<td class=num>{_num(cal['after'][k])}</td></tr>"
        for k, what in (
            ("nll", "negative log-likelihood"),
            ("brier", "Brier score"),
            ("ece", "expected calibration error"),
        )
    )
    return f"""<h2>Fold models (the ensemble averages them)</h2>
<table><tr><th>model</th><th>ROC-AUC</th><th>CI</th><th>Brier</th><th>ECE</th></tr>
{fold_rows}<tr><td>ensemble</td><td class=num>{_num(metrics["roc_auc"]["value"])}</td>
<td class=num>{_num(metrics["roc_auc"]["low"])}-{_num(metrics["roc_auc"]["high"])}</td>
<td class=num>{_num(metrics["brier"])}</td><td class=num>{_num(metrics["ece"])}</td></tr></table>
<h2>Calibration: temperature {cal["temperature"]:.3g} (fitted out of fold)</h2>
<table><tr><th></th><th>before</th><th>after</th></tr>{cal_rows}</table>
"""


def _baseline_section(base: dict[str, Any] | None, note: str | None = None) -> str:
    if not base:
        return f"<h2>Against its baseline</h2>\n<p>{html.escape(note)}.</p>\n" if note else ""
    e = html.escape
    return f"""<h2>Against its baseline</h2>
<p>{e(base["what"])}, fitted on the model's {base["trained_on"]} training scans, on the same
{base["scans"]} test scans: ROC-AUC {_num(base["roc_auc"]["value"])}
({_num(base["roc_auc"]["low"])}-{_num(base["roc_auc"]["high"])}); the model's ROC-AUC minus the
baseline's: {_num(base["difference"]["value"])} ({_num(base["difference"]["low"])} to
{_num(base["difference"]["high"])}, {e(base["difference"]["method"])}).
<strong>{e(base["verdict"][0].upper() + base["verdict"][1:])}.</strong></p>
"""


def _severity_section(figures: dict[str, Any] | None) -> str:
    """A severity model's grade figures: kappa, grade error, accuracy and one-vs-rest ROC-AUC
    with their intervals, the confusion of grades, and the burden baseline's figures."""
    if not figures:
        return ""
    e = html.escape

    def cell(estimate: dict[str, Any]) -> str:
        return (
            f"<td class=num>{_num(estimate['value'])}</td><td class=num>"
            f"{_num(estimate['low'])}-{_num(estimate['high'])}</td><td>{e(estimate['method'])}</td>"
        )

    base = figures.get("baseline") or {}
    rows = ""
    for key, name in (
        ("quadratic_weighted_kappa", "quadratic-weighted kappa"),
        ("mean_absolute_error", "mean absolute grade error"),
        ("accuracy", "exact-grade accuracy"),
    ):
        rows += f"<tr><td>{name}</td>{cell(figures[key])}</tr>\n"
        if base.get(key):
            rows += f"<tr><td>{name}, burden baseline</td>{cell(base[key])}</tr>\n"
    for row in figures["per_grade"]:
        rows += f"<tr><td>{e(row['grade'])} vs the rest ROC-AUC ({row['scans']} scans)</td>"
        rows += f"{cell(row['roc_auc'])}</tr>\n"
    names = figures["grades"]
    head = "".join(f"<th>predicted {e(n)}</th>" for n in names)
    confusion = "".join(
        f"<tr><th>true {e(n)}</th>" + "".join(f"<td class=num>{v}</td>" for v in counts) + "</tr>"
        for n, counts in zip(names, figures["confusion"], strict=True)
    )
    what = f"<p>Burden baseline: {e(base['what'])}.</p>" if base.get("what") else ""
    return f"""<h2>Severity grades</h2>
<table><tr><th>metric</th><th>value</th><th>CI</th><th>method</th></tr>
{rows}</table>
<table><tr><th></th>{head}</tr>{confusion}</table>
{what}
"""


def _banners(summary: dict[str, Any]) -> str:
    """Red lines above everything: test scans the model used; a model of generated scans."""
    overlap = summary.get("overlap")
    banner = (
        f"<p class=banner>NOT INDEPENDENT: {overlap['scans']} test scans were used by the model "
        f"({html.escape(str(overlap['used_for']))}); every figure on this page is optimistic.</p>"
        if overlap
        else ""
    )
    if summary.get("independent") == "unknown":
        how = str(summary.get("independence") or "nothing recorded to compare with")
        banner += (
            "<p class=banner>INDEPENDENCE UNKNOWN: whether the model trained on these scans "
            f"cannot be checked: {html.escape(how.removeprefix('unknown: '))}.</p>"
        )
    if summary["model"].get("generated"):
        real = (summary.get("scan_warnings") or {}).get("real_on_generated_model", 0)
        banner += (
            "<p class=banner>The model was trained on generated scans (app.data synth), not on "
            f"real CT: {real} of these test scans are real CT, and its figures on them mean "
            "little.</p>"
            if real
            else "<p class=note>The model was trained on generated scans (app.data synth), and "
            "these test scans are generated too: these figures describe generated scans; on real "
            "CT it would do otherwise.</p>"
        )
    far = (summary.get("scan_warnings") or {}).get("far_spacing", 0)
    if far:
        banner += (
            f"<p class=note>{far} test scans have voxel spacing far from the training scans': the "
            "figures may not hold for them (their rows say so).</p>"
        )
    return banner


def write_report(summary: dict[str, Any], rows: list[dict[str, Any]], out_dir: Path) -> Path:
    """Write ``out_dir/report.html`` from ``metrics.json``'s content and the prediction rows."""
    e = html.escape
    metrics = summary["metrics"]
    c = metrics["confusion"]
    independent = summary.get("independent")
    not_independent = (
        ""
        if independent is True
        else " (not independent)"
        if independent is False
        else " (independence unknown)"
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ctclassify evaluation</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 70em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.3em 0.6em; }}
.num {{ text-align: right; }} .path {{ font-family: monospace; font-size: 0.85em; }}
tr.wrong {{ background: #fde8e8; }} img {{ max-width: 32%; margin-right: 1%; }}
dt {{ font-weight: bold; }} dd {{ margin: 0 0 0.5em 0; }}
.banner {{ background: #b00020; color: white; padding: 0.6em; font-weight: bold; }}
.note {{ background: #fff3cd; border-left: 6px solid #b26a00; padding: 0.6em; }}
</style></head><body>
<h1>Evaluation</h1>
{_banners(summary)}
<p>Research use only, not for diagnosis.</p>
<dl>
<dt>Model</dt><dd>{e(summary["model"]["description"])}</dd>
<dt>Test data</dt><dd>{e(summary["data"])}: {metrics["n"]} scans classified
({metrics["n_positive"]} abnormal, {metrics["n_negative"]} normal), {summary["failed"]} failed</dd>
<dt>Threshold</dt><dd>{metrics["threshold"]:g} (P(abnormal) at or above it: abnormal)</dd>
<dt>Date</dt><dd>{e(summary["date"])}</dd>
<dt>Confusion</dt><dd>TP {c["tp"]}, FP {c["fp"]}, TN {c["tn"]}, FN {c["fn"]}</dd>
</dl>
<h2>Metrics ({int(100 * metrics["confidence"])}% confidence intervals){not_independent}</h2>
<table><tr><th>metric</th><th>value</th><th>CI</th><th>method</th></tr>
{_metric_rows(metrics)}</table>
<p>{embedded_png(out_dir / ROC_PNG, "ROC curve")}{embedded_png(out_dir / CALIBRATION_PNG, "calibration")}
{embedded_png(out_dir / CONFUSION_PNG, "confusion matrix")}</p>
{_baseline_section(summary.get("baseline"), summary.get("baseline_note"))}{_severity_section(summary.get("severity"))}{_ensemble_section(summary)}<h2>Scans</h2>
{_scan_table(rows)}
</body></html>
"""
    path = out_dir / REPORT_HTML
    atomic_write_text(path, page)
    return path
