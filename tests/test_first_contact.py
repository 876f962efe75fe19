"""What a new user meets in the outputs (issue 35): failed rows that say only why they failed,
pictures named as the README names them and saying what they show, a report that reads in a
browser, evaluation pictures and notes that do not mislead."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_CT, in_ci, require_shared, synth_dataset
from PIL import Image

from app.infer import main as infer_main
from app.runtime.writer import prediction_row

SHIPPED = Path(__file__).resolve().parents[1] / "nets" / "weights" / "generated.pt"


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "predictions.csv").open() as f:
        return {Path(r["path"]).name: r for r in csv.DictReader(f)}


def _title(png: Path) -> str:
    """What a picture says in its title (the PNG's Title text chunk holds it)."""
    return str(Image.open(png).info.get("Title", ""))


@pytest.fixture(scope="module")
def mixed(generated_model, tmp_path_factory) -> tuple[Path, Path, str]:
    """A model of generated scans on real CT, a non-HU file, an empty file, a DICOM series and
    two scans of one name in two folders; --report --saliency. Returns (scans, out, console)."""
    import contextlib
    import io

    real_ct = require_shared(REAL_CT)
    root = tmp_path_factory.mktemp("mixed")
    scans = root / "scans"
    (scans / "a").mkdir(parents=True)
    (scans / "b").mkdir()
    shutil.copy(real_ct / "cip_ct-64_chest.nii.gz", scans / "chest.nii.gz")
    shutil.copy(real_ct / "niivue-images_CT_AVM.nii.gz", scans / "avm.nii.gz")  # not HU
    (scans / "empty.nii.gz").write_bytes(b"")
    shutil.copytree(real_ct / "cip_ct-64_dicom", scans / "series")
    shutil.copy(real_ct / "cip_ct-64_chest_LAS.nii.gz", scans / "a" / "twin.nii.gz")
    shutil.copy(real_ct / "cip_ct-64_chest_LAS.nii.gz", scans / "b" / "twin.nii.gz")
    out = root / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = infer_main([str(scans), "--checkpoint", str(generated_model), "--output", str(out),
                           "--report", "--saliency", "--no-progress", "--device", "cpu"])  # fmt: skip
    assert code == 1
    return scans, out, printed.getvalue()


def test_a_failed_row_says_why_it_failed_and_nothing_else(mixed):
    """The model of generated scans warns on every real scan; a failed row carries its reason
    only (CSV, JSON, console), a classified one its warnings."""
    _, out, printed = mixed
    rows = _rows(out)
    for name in ("avm.nii.gz", "empty.nii.gz"):
        assert rows[name]["error"] and rows[name]["warnings"] == "", rows[name]
    assert "trained on generated scans" in rows["chest.nii.gz"]["warnings"]
    for row in json.loads((out / "predictions.json").read_text()):
        assert not (row["error"] and row["warnings"]), row
    assert "avm.nii.gz: error: not CT in Hounsfield units" in printed
    # the bundle's writer makes its rows with the same function
    row = prediction_row("x.nii.gz", None, None, ["a warning"], error="unreadable")
    assert row["warnings"] == "" and row["error"] == "unreadable"


def test_saliency_files_are_named_as_the_readme_says_for_every_scan(mixed):
    """OUT/saliency/NAME.png and NAME.nii.gz for each classified scan, a DICOM series included;
    two scans of one name in two folders keep apart (a hash of the path after those two)."""
    _, out, _ = mixed
    files = sorted(p.name for p in (out / "saliency").iterdir())
    for name in ("chest", "series"):
        assert f"{name}.png" in files and f"{name}.nii.gz" in files, files
    twins = [f for f in files if f.startswith("twin-") and f.endswith(".png")]
    assert len(twins) == 2, files
    assert not any(f.startswith(("avm", "empty")) for f in files)


def test_the_dicom_series_saliency_lies_on_the_series(mixed, real_ct):
    """The series' map is on its grid: the same map as the NIfTI file of the same array."""
    import nibabel as nib

    _, out, _ = mixed
    series, nifti = (nib.load(out / "saliency" / f"{n}.nii.gz") for n in ("series", "chest"))
    assert series.shape == nifti.shape == (64, 64, 79)
    assert np.allclose(series.affine, nifti.affine, atol=1e-3)
    assert np.abs(series.get_fdata() - nifti.get_fdata()).max() < 1e-4


def test_a_saliency_of_a_normal_result_says_what_it_shows_and_is_no_blue_wash(tmp_path, real_ct):
    """The shipped network calls the real chest CT normal (P(abnormal) about 0.002): its picture
    says the map is scaled by that probability and nothing raised it, and draws no colour over
    the scan (before: a uniform blue wash over every slice)."""
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(real_ct / "cip_ct-64_chest.nii.gz", scans / "chest.nii.gz")
    out = tmp_path / "out"
    args = [str(scans), "--checkpoint", str(SHIPPED), "--output", str(out), "--saliency",
            "--no-progress", "--device", "cpu"]  # fmt: skip
    assert infer_main(args) == 0
    assert _rows(out)["chest.nii.gz"]["label"] == "normal"
    png = out / "saliency" / "chest.png"
    assert "called normal" in _title(png) and "no region raised it" in _title(png)
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    blue = (rgb[..., 2] - rgb[..., 0] > 40).mean()  # jet's low end over grey
    assert blue < 0.03, f"{blue:.1%} of the picture is blue"


def test_report_montages_carry_the_scans_warnings(mixed):
    _, out, _ = mixed
    title = _title(out / "montages" / "chest.png")
    assert "P(abnormal)" in title and "warning: the model was trained on generated scans" in title


def _chromium() -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if in_ci():
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("Debian's chromium is not installed here (apt-get install chromium)")
    return chromium


def _rendered(page: Path, tmp_path: Path, script: str) -> str:
    """``page`` laid out by headless Chromium (1200 px wide) with ``script`` run after load; the
    DOM it leaves."""
    copy = tmp_path / "measured.html"
    copy.write_text(page.read_text().replace("</body>", f"<script>{script}</script></body>"))
    done = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900",
         "--virtual-time-budget=5000", "--dump-dom", copy.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return done.stdout


@pytest.mark.slow
def test_report_paths_read_in_a_browser_and_failed_rows_are_marked(mixed, tmp_path):
    """In Chromium, each scan's cell takes at most three lines (before: an absolute path broken
    letter by letter over ten); each failed row says "failed" in its label column."""
    _, out, _ = mixed
    script = (  # the lines of each scan's cell: the distinct tops of its text's boxes
        "document.body.setAttribute('data-lines', JSON.stringify([...document.querySelectorAll("
        "'td.path')].map(td => { const r = document.createRange(); r.selectNodeContents(td); "
        "return new Set([...r.getClientRects()].map(b => Math.round(b.top))).size; })));"
    )
    dom = _rendered(out / "report.html", tmp_path, script)
    marker = 'data-lines="'
    lines = json.loads(
        dom[dom.index(marker) + len(marker) :].split('"', 1)[0].replace("&quot;", '"')
    )
    assert len(lines) == 6 and max(lines) <= 3, lines
    page = (out / "report.html").read_text()
    assert page.count('<td class="failed">failed</td>') == 2


def test_the_roc_operating_point_is_drawn_whole_at_a_corner(tmp_path):
    """A perfect split puts the threshold's dot at (0, 1): all of it is drawn, not a quarter."""
    from app.evaluation.metrics import binary_metrics
    from app.evaluation.plots import plot_roc

    def red_pixels(probs: np.ndarray, labels: np.ndarray, name: str) -> int:
        m = binary_metrics(probs, labels, threshold=0.5, n_resamples=50)
        plot_roc(probs, labels, m, tmp_path / name)
        rgb = np.asarray(Image.open(tmp_path / name).convert("RGB")).astype(int)
        return int(((rgb[..., 0] > 180) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)).sum())

    labels = np.array([0] * 10 + [1] * 10)
    corner = red_pixels(np.r_[np.full(10, 0.1), np.full(10, 0.9)], labels, "corner.png")
    inside = red_pixels(
        np.r_[np.linspace(0.3, 0.7, 10), np.linspace(0.4, 0.8, 10)], labels, "in.png"
    )
    assert corner >= 0.8 * inside > 0, (corner, inside)


def test_a_calibration_bin_of_one_scan_is_drawn_apart_with_its_count(tmp_path):
    from app.evaluation.plots import CALIBRATION_MIN_SCANS, calibration_points

    probs = np.r_[np.full(20, 0.05), [0.55], np.full(20, 0.95)]
    labels = np.r_[np.zeros(20), [1], np.ones(20)]
    points = {p["bin"]: p for p in calibration_points(probs, labels)}
    assert points[5]["scans"] == 1 < CALIBRATION_MIN_SCANS  # drawn apart, "n=1" beside it
    assert points[0]["scans"] == points[9]["scans"] == 20


def test_evaluate_says_when_test_scans_are_unlike_the_training_scans(
    real_ct, generated_model, tmp_path, capsys
):
    """Real CT (4-mm slices) given to a model of generated 15-mm scans: app.evaluate says how
    many test scans have spacing far from the training scans' and are real CT, as app.infer
    says it per scan, on the console, in metrics.json and in the report."""
    from app.evaluate import main as evaluate_main

    data = tmp_path / "test"
    for label, names in (("CT-0", ("cip_ct-64_chest.nii.gz", "cip_ct-64_chest_LAS.nii.gz")),
                         ("CT-23", ("cip_ct-64_chest.nii.gz", "cip_ct-64_chest_LAS.nii.gz"))):  # fmt: skip
        (data / label).mkdir(parents=True)
        for i, name in enumerate(names):
            shutil.copy(real_ct / name, data / label / f"{label}-{i}.nii.gz")
    args = ["--data", str(data), "--checkpoint", str(generated_model), "--output",
            str(tmp_path / "E"), "--device", "cpu", "--no-progress", "--bootstrap", "100"]  # fmt: skip
    code = evaluate_main(args)
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0, captured.err
    assert "warning: 4 of 4 test scans have voxel spacing far from the training scans'" in printed
    assert "4 of 4 test scans are real CT given to a model trained on generated" in printed
    summary = json.loads((tmp_path / "E" / "metrics.json").read_text())
    assert summary["scan_warnings"]["far_spacing"] == 4
    page = (tmp_path / "E" / "report.html").read_text()
    assert "4 of these test scans are real CT" in page and "spacing far from" in page


def test_evaluate_on_generated_scans_says_the_figures_describe_generated_scans(
    generated_model, tmp_path, capsys
):
    from app.evaluate import main as evaluate_main

    data = synth_dataset(tmp_path / "test", 3, (64, 64, 16), seed=77)
    args = ["--data", str(data), "--checkpoint", str(generated_model), "--output",
            str(tmp_path / "E"), "--device", "cpu", "--no-progress", "--bootstrap", "100"]  # fmt: skip
    assert evaluate_main(args) == 0, capsys.readouterr().err
    page = (tmp_path / "E" / "report.html").read_text()
    assert "these test scans are generated too" in page and "mean little" not in page
    assert "real CT given to" not in capsys.readouterr().out


def test_the_oblique_warning_is_on_the_console_line_as_in_the_csv(real_ct, tmp_path, capsys):
    """A scan whose affine is turned 20 degrees about the scanner's z axis: its console line
    carries every warning its row carries, the oblique one included."""
    import nibabel as nib

    img = nib.load(real_ct / "cip_ct-64_chest.nii.gz")
    turn = np.deg2rad(20)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]]
    scans = tmp_path / "scans"
    scans.mkdir()
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), rotation @ img.affine), scans / "o.nii.gz")
    out = tmp_path / "out"
    args = [str(scans), "--checkpoint", str(SHIPPED), "--output", str(out), "--no-progress",
            "--device", "cpu"]  # fmt: skip
    assert infer_main(args) == 0
    row = _rows(out)["o.nii.gz"]
    assert "oblique affine (20.0 degrees" in row["warnings"]
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(str(scans)))
    assert all(w in line for w in row["warnings"].split("; ")), (line, row["warnings"])
