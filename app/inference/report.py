"""A self-contained HTML report of an inference run (images embedded, opens offline)."""

from __future__ import annotations

import html
import os
from pathlib import Path

from app.plots import embedded_png
from app.run_folder import REPORT_HTML
from app.runtime.files import atomic_write_text
from app.runtime.writer import parse_fold_probs


def _grade(row: dict[str, str]) -> str:
    """A severity model's grade and each grade's probability (%), under the label."""
    grades = parse_fold_probs(row.get("grade_probs") or "")
    if not (row.get("grade") and grades):
        return ""
    each = " / ".join(f"{100 * g:.0f}" for g in grades)
    return f'<br>{html.escape(row["grade"])}<br><small title="each grade, %">{each}</small>'


def write_report(
    rows: list[dict[str, str]],
    out_dir: Path,
    images: dict[str, dict[str, Path]],
    model: str = "",
    date: str = "",
    generated: bool = False,
) -> Path:
    """Write ``out_dir/report.html``: the model (its description: checkpoint, training data,
    validation figures, threshold) and the date, led by a banner when the model was trained on
    generated scans (``generated``), then a row per scan with probability, label,
    warnings or error, a montage thumbnail and the saliency overlay when one was computed (a
    click shows either at full size)."""
    body = []
    base = _common_folder([r["path"] for r in rows])
    for r in rows:
        prob = r.get("prob_abnormal") or ""
        pct = f"{100 * float(prob):.2f}%" if prob else ""  # as the console prints it
        folds = parse_fold_probs(r.get("fold_probs") or "")
        if folds and prob:  # an ensemble: what each fold model said
            spread = " / ".join(f"{100 * f:.1f}" for f in folds)
            pct += f'<br><small title="each fold model, %">folds {spread}</small>'
        label = r.get("label") or ""
        if r.get("error"):  # marked as failed, not only by its reason
            status, mark = "error", '<td class="failed">failed</td>'
            note = f"<b>error:</b> {html.escape(r['error'])}"
        else:
            status = "warn" if r.get("warnings") else "ok"
            mark = f'<td class="{html.escape(label)}">{html.escape(label)}{_grade(r)}</td>'
            note = html.escape(r.get("warnings") or "").replace("; ", "<br>")
        pics = images.get(r["path"], {})
        body.append(
            f'<tr class="{status}">{_path_cell(r["path"], base)}<td class="num">{pct}</td>'
            f"{mark}<td>{note}</td>"
            f"<td>{embedded_png(pics.get('montage'), 'montage', zoom=True)}</td>"
            f"<td>{embedded_png(pics.get('saliency'), 'saliency', zoom=True)}</td></tr>"
        )
    classified = sum(1 for r in rows if r.get("prob_abnormal"))
    abnormal = sum(1 for r in rows if r.get("label") == "abnormal")
    failed = sum(1 for r in rows if r.get("error"))
    banner = (
        '<p class="banner">The model was trained on generated scans (app.data synth), not on real '
        "CT: its output on real scans means little.</p>"
        if generated
        else ""
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ctclassify report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 6px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f0f3f7; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
td.abnormal {{ color: #b00020; font-weight: 600; }}
td.normal {{ color: #1b5e20; font-weight: 600; }}
tr.error td {{ background: #fdecea; }}
tr.warn td {{ background: #fff8e1; }}
.banner {{ background: #b00020; color: white; padding: 0.6em; font-weight: 600; }}
td.path {{ min-width: 14em; max-width: 24em; overflow-wrap: anywhere; }}
td.path small {{ font-family: monospace; color: #555; }}
td.failed {{ color: white; background: #b00020 !important; font-weight: 600; }}
img {{ max-width: 360px; cursor: zoom-in; }}
img:focus {{ max-width: 95vw; width: 1400px; cursor: zoom-out; position: relative; z-index: 1;
  box-shadow: 0 0 1em #0006; background: white; }}
</style></head><body>
<h1>ctclassify: chest CT classification</h1>
{banner}
<p><b>Model:</b> {html.escape(model) or "not recorded"}<br><b>Date:</b> {html.escape(date)}</p>
<p>{len(rows)} inputs{f" under <code>{html.escape(base)}</code>" if base else ""}: {classified} classified ({abnormal} abnormal, {classified - abnormal} normal),
{failed} could not be classified. Research use only, not for diagnosis.</p>
<table><thead><tr><th>scan</th><th>P(abnormal)</th><th>label</th><th>warnings / error</th>
<th>montage</th><th>saliency</th></tr></thead><tbody>
{"".join(body)}
</tbody></table></body></html>
"""
    path = out_dir / REPORT_HTML
    atomic_write_text(path, page)
    return path


def _common_folder(paths: list[str]) -> str:
    """The folder every input lies under ("" when none is shared), said once above the table."""
    folders = [os.path.dirname(p.partition("#")[0]) for p in paths]
    try:
        return os.path.commonpath(folders) if folders else ""
    except ValueError:  # absolute and relative paths mixed
        return ""


def _path_cell(path: str, base: str) -> str:
    """The scan's name, its folder below ``base`` under it (a break allowed after each
    ``/``), the whole path as the cell's tooltip."""
    shown = os.path.relpath(path, base) if base else path
    folder, name = os.path.split(shown)
    where = html.escape(folder + "/").replace("/", "/<wbr>") if folder else ""
    return (
        f'<td class="path" title="{html.escape(path)}"><b>{html.escape(name)}</b>'
        f"{f'<br><small>{where}</small>' if where else ''}</td>"
    )
