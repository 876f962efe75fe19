"""A generated MosMed-like chest CT dataset: the default data of the demo, tests and benchmarks.

Scans have MosMedData's geometry (int16 HU, 512x512 in-plane, 30-70 slices of 8 mm, LAS storage)
and a simple chest anatomy: air, fat, soft tissue, two lungs with vessels and an
inspiration-dependent density, spine, ribs and scanner noise. Abnormal scans add ground-glass
opacities and some consolidation, mostly peripheral and bilateral. ``difficulty`` in [0, 1]
makes the findings smaller and fainter; at the default, the mean lung density alone separates
the classes only partly, so a model has to learn where the opacities are.
"""

from __future__ import annotations

import gzip
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from app.cli import config_values
from app.runtime.scanqc import GENERATED_DESCRIP, is_generated  # noqa: F401  (one place: the bundle checks it too)

CLASS_FOLDERS = {0: "CT-0", 1: "CT-23"}
SLICE_MM = 8.0
#: MosMedData's severity categories: grade -> (folder, share of the lung involved, low to high)
SEVERITY_GRADES = {
    0: ("CT-0", (0.0, 0.0)),
    1: ("CT-1", (0.02, 0.25)),
    2: ("CT-2", (0.25, 0.50)),
    3: ("CT-3", (0.50, 0.75)),
    4: ("CT-4", (0.75, 0.95)),
}


@dataclass(frozen=True)
class SynthScan:
    """One generated scan: HU volume (x=R->L, y=P->A, z=I->S), its affine, its lung mask and
    its lesion mask (where findings were drawn at half strength or more; empty when normal)."""

    volume: np.ndarray
    affine: np.ndarray
    lung_mask: np.ndarray
    label: int
    lesion_mask: np.ndarray | None = None


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], coarse: int, sigma: float
) -> np.ndarray:
    """Smooth 2D noise of unit spread, made at 1/``coarse`` resolution and upsampled."""
    small = (max(shape[0] // coarse, 4), max(shape[1] // coarse, 4))
    field = ndimage.gaussian_filter(rng.standard_normal(small), sigma)
    field /= field.std() + 1e-6
    return ndimage.zoom(field, (shape[0] / small[0], shape[1] / small[1]), order=1)[
        : shape[0], : shape[1]
    ]


def _ellipse(
    u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float
) -> np.ndarray:
    """Normalised elliptic radius: < 1 inside the ellipse."""
    return np.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2)


def synth_defaults() -> dict[str, Any]:
    """The generator's defaults (``configs/synth.yaml``): ``per_class``, ``seed``,
    ``difficulty``, ``confounders``, ``shift``, ``hila``, ``trees``."""

    return dict(config_values("synth.yaml")["synth"])


def generate_scan(
    label: int,
    seed: int,
    shape: tuple[int, int, int] | None = None,
    difficulty: float | None = None,
    confounders: float = 0.0,
    shift: float = 0.0,
    hila: float = 0.0,
    trees: float = 0.0,
    burden: float | None = None,
) -> SynthScan:
    """Generate one scan, deterministic in (``label``, ``seed``, ``shape``, ``difficulty``,
    ``confounders``, ``shift``, ``hila``, ``trees``, ``burden``).

    Args:
        label: 0 normal, 1 abnormal (viral-pneumonia-like findings).
        seed: seed of this scan.
        shape: (x, y, z) voxels; ``None`` draws MosMed's 512x512 with 30-70 slices.
        difficulty: 0 gives large, dense findings; 1 gives few, small, faint ones
            (``None``: :func:`synth_defaults`).
        confounders: 0 (none) to 1: what makes lung density mislead in real CT, in both
            classes alike: denser dependent (posterior) lung, expiration (a denser lung
            overall), more and larger vessels, and scanner blur (partial volume). Drawn from a
            random stream of its own: at 0 the scans are those of earlier versions.
        shift: 0 (none) to 1: a shifted domain, for testing on what neither pretraining nor
            the recipe's choice saw: elongated lesions (up to 2x longer, 1.5x narrower), 30%
            less lesion contrast against the lung, up to 2x the scanner noise. Draws nothing
            from the random streams: the same seed gives the same anatomy and lesion places.
        hila: 0 (none) to 1: hilar vessels in both classes, as real CT has them (dense,
            tapering branches fanning out from each lung's medial side into its inner half),
            which a model trained without them takes for findings.
            Drawn from a random stream of its own: at 0 the scans are those of earlier versions.
        trees: 0 (none) to 1: vessel trees in both classes, as real lungs have them: 3D
            branching tubes from each hilum outwards, tapering, with partial volume at their
            edges (soft-tissue density at the core, lung-to-ground-glass values at the rim: a
            histogram cannot tell them from faint findings), up to ``trees`` x 6 trees per
            lung (each of up to 15 branches). Drawn from a random stream of its own: at 0 the scans are those of earlier
            versions.
        burden: for an abnormal scan, the share of the lung involved (0 to 1), drawn as patchy
            ground glass over exactly that share of the lung's voxels (:func:`_add_involvement`)
            instead of the separate lesions; ``None``: the lesions (the binary data set's).
    """
    if difficulty is None:
        difficulty = float(synth_defaults()["difficulty"])
    rng = np.random.default_rng([seed, label])
    if shape is None:
        shape = (512, 512, int(rng.integers(30, 71)))
    nx, ny, nz = shape
    pixel_mm = float(rng.uniform(0.6, 0.9)) * 512 / nx
    # In-plane coordinates normalised to the field of view: u runs R->L, v runs P->A.
    u, v = np.meshgrid(np.linspace(-1, 1, nx), np.linspace(-1, 1, ny), indexing="ij")
    z_mm = (np.arange(nz) - (nz - 1) / 2) * SLICE_MM * (30 / nz if nz < 30 else 1.0)
    body = _draw_anatomy(rng)
    body["noise_hu"] *= 1.0 + shift
    body["shift"] = shift
    body["hila"] = (
        _draw_hila(np.random.default_rng([seed, label, 0x41A]), body, hila) if hila else []
    )
    lesions = _draw_lesions(rng, difficulty, body) if label == 1 and burden is None else []
    blur = _add_confounders(np.random.default_rng([seed, label, 0xC0F]), body, confounders)
    volume, lung_mask, lesion_mask = _draw_slices(rng, shape, u, v, z_mm, body, lesions)
    if burden and label == 1:  # a stream of its own, as the confounders'
        _add_involvement(np.random.default_rng([seed, label, 0xB0D]), volume, lung_mask,
                         lesion_mask, float(burden), difficulty, body)  # fmt: skip
    if trees > 0:
        streams = np.random.default_rng([seed, label, 0x7EE])
        slice_mm = SLICE_MM if nz >= 30 else SLICE_MM * 30 / nz
        _add_vessel_trees(streams, volume, lung_mask, (pixel_mm, pixel_mm, slice_mm), trees,
                          body["noise_hu"])  # fmt: skip
    if blur > 0:  # partial volume: the scanner's point spread, in plane and across slices
        from scipy import ndimage

        volume = ndimage.gaussian_filter(volume, sigma=(blur, blur, blur / 2))
    volume = np.clip(np.rint(volume), -1024, 3071).astype(np.int16)
    slice_mm = SLICE_MM if nz >= 30 else SLICE_MM * 30 / nz
    affine = np.diag([-pixel_mm, pixel_mm, slice_mm, 1.0])  # LAS: x toward Left
    affine[:3, 3] = [pixel_mm * (nx - 1) / 2, -pixel_mm * (ny - 1) / 2, float(z_mm[0])]
    return SynthScan(
        volume=volume, affine=affine, lung_mask=lung_mask, label=label, lesion_mask=lesion_mask
    )


def _draw_slices(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    u: np.ndarray,
    v: np.ndarray,
    z_mm: np.ndarray,
    body: dict[str, Any],
    lesions: list[dict[str, Any]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(HU volume with noise, lung mask, lesion mask), slice by slice."""
    nx, ny, _ = shape
    volume = np.empty(shape, dtype=np.float32)
    lung_mask = np.zeros(shape, dtype=bool)
    lesion_mask = np.zeros(shape, dtype=bool)
    for iz, z in enumerate(z_mm):
        sl = _chest_wall_slice(u, v, float(z), body)
        in_lungs = np.zeros((nx, ny), dtype=bool)
        if body["lung_bottom"] < z < body["lung_top"]:
            sl, in_lungs = _add_lungs(rng, sl, u, v, float(z), body, lesions, lesion_mask[:, :, iz])
        lung_mask[:, :, iz] = in_lungs
        sl += rng.normal(0, body["noise_hu"], size=sl.shape).astype(np.float32)
        volume[:, :, iz] = sl
    return volume, lung_mask, lesion_mask


def _add_confounders(rng: np.random.Generator, body: dict[str, Any], strength: float) -> float:
    """Make ``body``'s lungs denser posteriorly and overall and its vessels stronger, by
    ``strength`` (0..1) of the maximum; returns the scanner blur (voxels) to apply."""
    if strength <= 0:
        return 0.0
    body["gravity_hu"] += rng.uniform(0, 250) * strength
    body["inspiration_hu"] += rng.uniform(0, 200) * strength
    body["vessel_boost"] = rng.uniform(0.2, 0.6) * strength
    return float(rng.uniform(0.3, 1.2) * strength)


def _draw_anatomy(rng: np.random.Generator) -> dict[str, Any]:
    """Body outline, fat, lung extent and density, noise, and the two lungs' shapes."""
    body: dict[str, Any] = {"cu": rng.normal(0, 0.03), "cv": rng.normal(-0.05, 0.03)}
    body["ru"], body["rv"] = rng.uniform(0.72, 0.88), rng.uniform(0.50, 0.62)
    body["fat"] = rng.uniform(0.04, 0.09)
    body["lung_top"] = rng.uniform(100, 150) + rng.normal(0, 20)
    body["lung_bottom"] = body["lung_top"] - rng.uniform(220, 290)
    body["inspiration_hu"] = -850 + rng.normal(0, 40)
    body["gravity_hu"] = rng.uniform(0, 70)  # dependent (posterior) lung is denser
    body["noise_hu"] = rng.uniform(12, 25)
    lungs: list[dict[str, Any]] = []
    for side in (-1, 1):  # right lung at u < 0 (R->L axis), left lung at u > 0
        lungs.append(
            {
                "cu": body["cu"] + side * rng.uniform(0.36, 0.44) * body["ru"],
                "cv": body["cv"] + rng.uniform(-0.02, 0.06),
                "ru": rng.uniform(0.30, 0.36) * body["ru"] * (1.05 if side < 0 else 0.95),
                "rv": rng.uniform(0.68, 0.80) * body["rv"],
                "harm": rng.normal(0, 0.04, size=(3, 2)),
            }
        )
    body["lungs"] = lungs
    return body


def _add_vessel_trees(
    rng: np.random.Generator,
    volume: np.ndarray,
    lungs: np.ndarray,
    spacing: tuple[float, float, float],
    amount: float,
    noise_hu: float,
) -> None:
    """Branching vessel trees inside ``lungs`` (in place): each tree starts on a lung's medial
    side at mid-height and grows outwards in 3D, splitting into thinner branches (radius 1.5-4
    mm at the root, x0.7 per generation, 4 generations); a voxel's share of vessel is the
    fraction of it inside the tube (a one-voxel ramp at the rim: partial volume)."""

    if not lungs.any():
        return
    step = np.array(spacing, dtype=float)
    centres: list[list[tuple[np.ndarray, float]]] = [[], [], [], []]  # per generation
    coords = np.argwhere(lungs)
    mid_x = volume.shape[0] / 2
    for side in (coords[:, 0] < mid_x, coords[:, 0] >= mid_x):
        lung = coords[side]
        if len(lung) == 0:
            continue
        for _ in range(int(round(amount * rng.integers(2, 7)))):
            # a medial point at mid-height: near the lung's centre of mass, towards the midline
            medial = lung[np.argsort(np.abs(lung[:, 0] - mid_x))[: max(len(lung) // 20, 1)]]
            start = medial[rng.integers(len(medial))].astype(float)
            away = np.sign(lung[:, 0].mean() - mid_x) or 1.0
            direction = np.array([away, rng.uniform(-0.8, 0.8), rng.uniform(-0.6, 0.6)])
            radius = rng.uniform(1.5, 4.0)
            todo = [(start, direction, radius, 0)]
            while todo:
                point, heading, r, generation = todo.pop()
                length_mm = rng.uniform(30, 70) * 0.75**generation
                heading = heading / np.linalg.norm(heading * step)  # one mm per unit, per axis
                for t in np.arange(0.0, length_mm, min(step) / 2):
                    p = point + heading * t
                    centres[generation].append((p, r * (1 - 0.3 * t / length_mm)))
                end = point + heading * length_mm
                if generation < len(centres) - 1:
                    for _ in range(2):
                        bend = heading * step + rng.normal(0, 0.6, 3)
                        todo.append((end, bend / step, r * 0.7, generation + 1))
    share = np.zeros(volume.shape, dtype=np.float32)
    for points in centres:
        if not points:
            continue
        line = np.zeros(volume.shape, dtype=bool)
        radii = np.zeros(volume.shape, dtype=np.float32)
        for centre, rad in points:
            i = tuple(np.round(centre).astype(int))
            if all(0 <= a < n for a, n in zip(i, volume.shape, strict=True)) and rad > radii[i]:
                line[i] = True
                radii[i] = rad
        if not line.any():
            continue
        dist, nearest = ndimage.distance_transform_edt(~line, sampling=step, return_indices=True)
        r_near = radii[tuple(nearest)]
        share = np.maximum(share, np.clip((r_near - dist) / min(step) + 0.5, 0, 1))
    share *= lungs
    texture = rng.normal(0, noise_hu, volume.shape).astype(np.float32)
    volume += share * (rng.uniform(20, 60) + texture - volume)


def _draw_hila(rng: np.random.Generator, body: dict[str, Any], size: float) -> list[dict[str, Any]]:
    """Hilar vessels of both lungs: dense branches fanning out from each lung's medial side."""
    vessels: list[dict[str, Any]] = []
    middle = (body["lung_top"] + body["lung_bottom"]) / 2
    height = body["lung_top"] - body["lung_bottom"]
    for side in (0, 1):
        medial = 0.0 if side == 0 else np.pi  # the right lung (u < 0) faces +u, the left -u
        for _ in range(int(rng.integers(4, 9))):
            vessels.append(
                {
                    "lung": side,
                    "start": medial + rng.uniform(-0.5, 0.5),  # where it leaves the hilum
                    "heading": medial + np.pi + rng.uniform(-1.1, 1.1),  # into the lung
                    "length": rng.uniform(0.25, 0.6),  # fraction of the lung radius
                    "z": middle + rng.uniform(-0.2, 0.2) * height,
                    "rz": rng.uniform(25, 70),
                    "width": rng.uniform(0.012, 0.03) * size,
                }
            )
    return vessels


def _draw_lesions(
    rng: np.random.Generator, difficulty: float, body: dict[str, Any]
) -> list[dict[str, Any]]:
    """Ground-glass opacities (some with a consolidated core), mostly peripheral and bilateral."""
    lesions: list[dict[str, Any]] = []
    extent = rng.uniform(0.0, 1.0) ** (0.5 + difficulty)
    count = 2 + int(round(extent * (12 - 6 * difficulty))) + int(rng.integers(0, 3))
    for k in range(count):
        side = k % 2 if rng.uniform() < 0.8 else int(rng.integers(0, 2))  # mostly bilateral
        lesions.append(
            {
                "lung": side,
                "angle": rng.uniform(0, 2 * np.pi),
                "depth": rng.uniform(0.55, 0.95),  # fraction of the lung radius: peripheral
                "z": rng.uniform(body["lung_bottom"] + 30, body["lung_top"] - 30),
                "r": rng.uniform(0.08, 0.17) * (1.4 - 0.8 * difficulty) * (0.7 + extent),
                "rz": rng.uniform(16, 40) * (0.7 + extent),
                "hu": rng.uniform(-700, -300) + 150 * difficulty * rng.uniform(-1, 0),
                "solid": rng.uniform() < 0.35 * (1 - 0.5 * difficulty) + 0.3 * extent,
            }
        )
    return lesions


def _add_involvement(
    rng: np.random.Generator,
    volume: np.ndarray,
    lung_mask: np.ndarray,
    lesion_mask: np.ndarray,
    burden: float,
    difficulty: float,
    body: dict[str, Any],
) -> None:
    """Ground glass over ``burden`` of the lung's voxels (in place): where a smooth random field
    (patches about a fifth of the field of view wide, more at the lung's back and periphery, as
    COVID-19 involvement) is above its ``1 - burden`` quantile over the lung, with soft edges
    and the scanner's noise; those voxels are marked in ``lesion_mask``. ``difficulty`` makes
    the ground glass fainter."""
    lung_voxels = int(lung_mask.sum())
    if not lung_voxels or burden <= 0:
        return
    nx, ny, nz = volume.shape
    noise = rng.standard_normal(volume.shape).astype(np.float32)
    field = ndimage.gaussian_filter(noise, sigma=(nx / 12, ny / 12, max(nz / 10, 1.0)))
    field /= float(field[lung_mask].std()) or 1.0
    v = np.linspace(-1, 1, ny)[None, :, None]  # P->A: the back first
    field += 0.6 * np.clip(-v, 0, 1) + 0.4 * ndimage.gaussian_filter(
        (~lung_mask).astype(np.float32), sigma=(nx / 30, ny / 30, 0)
    )
    cut = float(np.quantile(field[lung_mask], 1.0 - min(burden, 1.0)))
    weight = np.clip((field - cut) / 0.3 + 0.5, 0.0, 1.0) * lung_mask
    hu = rng.uniform(-650, -350) + 150 * difficulty * rng.uniform(-1, 0)
    texture = rng.normal(0, body["noise_hu"], size=volume.shape).astype(np.float32)
    volume *= 1 - weight
    volume += weight * (hu + texture)
    lesion_mask |= lung_mask & (field >= cut)


def _chest_wall_slice(u: np.ndarray, v: np.ndarray, z: float, body: dict[str, Any]) -> np.ndarray:
    """Air, subcutaneous fat, muscle and mediastinum, ribs and spine of one axial slice."""
    cu, cv, ru_body, rv_body, fat = body["cu"], body["cv"], body["ru"], body["rv"], body["fat"]
    r_body = _ellipse(u, v, cu, cv, ru_body, rv_body)
    sl = np.full(u.shape, -1000.0, dtype=np.float32)
    sl[r_body < 1] = -100.0  # subcutaneous fat
    sl[r_body < 1 - fat] = 40.0  # muscle and mediastinum
    # ribs: bright ovals just inside the fat, crossing the plane every few slices
    for rib in range(12):
        ang = np.pi * (rib / 11.0) * 1.6 - 0.3 * np.pi + np.pi  # lateral and posterior arc
        phase = (z / 25.0 + rib * 0.37) % 1.0
        if phase < 0.45:
            ru = cu + (1 - fat * 1.6) * ru_body * np.cos(ang)
            rv = cv + (1 - fat * 1.6) * rv_body * np.sin(ang)
            sl[_ellipse(u, v, ru, rv, 0.035, 0.02) < 1] = 700.0
    # spine: vertebral body with cortex, posterior midline
    sp_u, sp_v = cu, cv - 0.72 * rv_body
    r_sp = _ellipse(u, v, sp_u, sp_v, 0.09, 0.08)
    sl[r_sp < 1] = 800.0
    sl[r_sp < 0.8] = 250.0
    sl[_ellipse(u, v, sp_u, sp_v - 0.12, 0.03, 0.05) < 1] = 600.0
    return sl


def _add_lungs(
    rng: np.random.Generator,
    sl: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    z: float,
    body: dict[str, Any],
    lesions: list[dict[str, Any]],
    lesion_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The lungs of one slice (with vessels, without the heart), and the lesions crossing it;
    returns the slice and the lung mask; marks the lesions in ``lesion_mask`` (in place)."""
    nx, ny = u.shape
    lungs = body["lungs"]
    theta = np.arctan2(v, u)
    in_lungs = np.zeros((nx, ny), dtype=bool)
    t = (z - body["lung_bottom"]) / (body["lung_top"] - body["lung_bottom"])
    # cross-section grows from the diaphragm dome, then narrows to the apex
    scale = np.sqrt(np.clip(np.sin(np.pi * min(0.5 + 0.5 * t, 1.0) * 0.999), 0, 1))
    scale *= np.clip(t * 4, 0.35, 1.0)
    for lung in lungs:
        harm = lung["harm"]
        wobble = 1 + sum(
            harm[k, 0] * np.cos((k + 2) * theta) + harm[k, 1] * np.sin((k + 2) * theta)
            for k in range(3)
        )
        r = _ellipse(u, v, lung["cu"], lung["cv"], lung["ru"] * scale, lung["rv"] * scale)
        in_lungs |= r < wobble
    heart = _ellipse(
        u, v, body["cu"] + 0.1, body["cv"] + 0.3 * body["rv"], 0.2 + 0.1 * (t < 0.5), 0.22
    )
    if t < 0.75:
        in_lungs &= heart > 1
    density = body["inspiration_hu"] + body["gravity_hu"] * np.clip((0.3 - v) / 0.9, 0, 1)
    lung_sl = density + 8 * _smooth_noise(rng, (nx, ny), 16, 1.5)
    # vessels: small bright blobs, denser towards the hila
    field = _smooth_noise(rng, (nx, ny), 6, 0.8)
    hilum = np.minimum(
        _ellipse(u, v, lungs[0]["cu"] + 0.1, body["cv"], 0.5, 0.5),
        _ellipse(u, v, lungs[1]["cu"] - 0.1, body["cv"], 0.5, 0.5),
    )
    vessels = field > 1.4 - body.get("vessel_boost", 0.0) + 0.8 * np.clip(hilum, 0, 1.5)
    lung_sl = np.where(vessels, 30.0, lung_sl)
    lung_sl = _add_hilar_vessels(lung_sl, u, v, z, scale, body)
    sl = np.where(in_lungs, lung_sl, sl)
    sl = _add_lesions(rng, sl, u, v, z, scale, body, lesions, in_lungs, lesion_mask)
    return sl, in_lungs


def _add_hilar_vessels(
    lung_sl: np.ndarray, u: np.ndarray, v: np.ndarray, z: float, scale: float, body: dict[str, Any]
) -> np.ndarray:
    """``body``'s hilar vessels crossing slice ``z`` (tapering bright branches); no draws."""
    lungs = body["lungs"]
    for ves in body.get("hila", []):
        dz = (z - ves["z"]) / ves["rz"]
        if abs(dz) >= 1:
            continue
        lung = lungs[ves["lung"]]
        ru, rv = lung["ru"] * scale, lung["rv"] * scale
        su = lung["cu"] + 0.85 * ru * np.cos(ves["start"])
        sv = lung["cv"] + 0.85 * rv * np.sin(ves["start"])
        du = ves["length"] * ru * np.cos(ves["heading"])
        dv = ves["length"] * rv * np.sin(ves["heading"])
        along = np.clip(((u - su) * du + (v - sv) * dv) / (du**2 + dv**2 + 1e-12), 0, 1)
        gap = np.hypot(u - su - along * du, v - sv - along * dv)
        width = ves["width"] * (1.4 - 0.8 * along) * np.sqrt(1 - dz**2)  # tapering
        lung_sl = np.where(gap < width, 40.0, lung_sl)
    return lung_sl


def _add_lesions(
    rng: np.random.Generator,
    sl: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    z: float,
    scale: float,
    body: dict[str, Any],
    lesions: list[dict[str, Any]],
    in_lungs: np.ndarray,
    lesion_mask: np.ndarray | None,
) -> np.ndarray:
    """The lesions crossing slice ``z``, drawn into ``sl`` inside the lungs; marks them in
    ``lesion_mask`` (in place)."""
    nx, ny = u.shape
    lungs = body["lungs"]
    for les in lesions:
        dz = (z - les["z"]) / les["rz"]
        if abs(dz) >= 1:
            continue
        lung = lungs[les["lung"]]
        cu = lung["cu"] + les["depth"] * lung["ru"] * scale * np.cos(les["angle"])
        cv = lung["cv"] + les["depth"] * lung["rv"] * scale * np.sin(les["angle"])
        rad = les["r"] * np.sqrt(1 - dz**2)
        shift = body.get("shift", 0.0)
        rr = _ellipse(
            u, v, cu, cv, rad / (1 + 0.5 * shift), rad * rng.uniform(0.7, 1.3) * (1 + shift)
        )
        blob = np.clip((1.0 - rr) * 4, 0, 1) * np.clip(
            0.85 + 0.25 * _smooth_noise(rng, (nx, ny), 12, 1), 0.4, 1
        )
        blob *= in_lungs
        if lesion_mask is not None:  # draws nothing from rng: the scans stay as they were
            lesion_mask |= blob >= 0.5
        lesion_hu = les["hu"]
        if shift:  # less contrast against this lung's density
            lesion_hu = body["inspiration_hu"] + (lesion_hu - body["inspiration_hu"]) * (
                1 - 0.3 * shift
            )
        sl = sl * (1 - blob) + lesion_hu * blob
        if les["solid"]:
            core = (rr < 0.45) & in_lungs
            sl = np.where(core, rng.uniform(-100, 50), sl)
    return sl


#: suffix of a scan being written: matches no scan pattern (and starts with a dot)
PARTIAL_SUFFIX = ".partial"


def _image(scan: SynthScan) -> nib.Nifti1Image:
    img = nib.Nifti1Image(scan.volume, scan.affine)
    img.set_qform(scan.affine, code=1)
    img.set_sform(scan.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = GENERATED_DESCRIP.encode()
    return img


def save_scan(scan: SynthScan, path: str | Path) -> None:
    """Write ``scan`` as int16 NIfTI with qform and sform set like MosMedData (code 1), atomically.

    The bytes go to a hidden ``.NAME.partial`` file first, renamed into place when complete: a
    kill mid-write leaves no file that a scan finder takes for a scan.
    """
    _save_atomically(_image(scan), Path(path))


def _save_atomically(image: nib.Nifti1Image, path: Path) -> None:

    data = image.to_bytes()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=1, mtime=0)
    tmp = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def scan_seed(seed: int, index: int) -> int:
    """Seed of the ``index``-th scan of a dataset made with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _graded(settings: dict[str, Any], grade: int, seed: int) -> dict[str, Any]:
    """``settings`` of one scan of severity ``grade``: its generator label (normal or not) and
    its share of lung involved, drawn within the grade's range from the scan's seed."""
    low, high = SEVERITY_GRADES[grade][1]
    burden = float(np.random.default_rng([seed, 0xB0D]).uniform(low, high)) if grade else 0.0
    return {**settings, "burden": burden, "label": min(grade, 1)}


def _write_one(job: tuple[Path, Path | None, int, int, dict[str, Any]]) -> int:
    """Generate and write one scan (and its lesion mask): a job of :func:`write_dataset`;
    returns the progress it makes (one scan)."""
    path, mask_path, label, seed, settings = job
    settings = dict(settings)
    scan = generate_scan(int(settings.pop("label", label)), seed, **settings)
    if not path.exists():
        save_scan(scan, path)
    if mask_path is not None:
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        assert scan.lesion_mask is not None
        _save_atomically(nib.Nifti1Image(scan.lesion_mask.astype(np.uint8), scan.affine), mask_path)
    return 1


def write_dataset(
    out: str | Path,
    per_class: int,
    shape: tuple[int, int, int] | None = None,
    seed: int = 0,
    difficulty: float | None = None,
    progress: bool | None = None,
    masks: bool = False,
    confounders: float = 0.0,
    shift: float = 0.0,
    hila: float = 0.0,
    trees: float = 0.0,
    workers: int = 1,
    severity: bool = False,
) -> list[dict[str, object]]:
    """Write ``per_class`` scans of each class to ``out/CT-0`` and ``out/CT-23`` (with
    ``masks``, each scan's lesion mask as uint8 NIfTI on its grid to ``out/masks/NAME``).
    With ``severity``, ``per_class`` scans of each of MosMedData's grades to ``out/CT-0`` ..
    ``out/CT-4`` instead (:data:`SEVERITY_GRADES`: the share of lung involved drawn uniformly
    within the grade's range), labelled with the grade.

    Returns the datalist (``image``, ``label``). Existing files of the same name are kept, so an
    interrupted run completes when run again; a ``.complete`` marker records the settings.
    ``difficulty`` ``None``: :func:`synth_defaults`'s. ``workers`` > 1 generates in that
    many processes (at most the CPU cores): each scan has its
    own seed, so the files are the same as with one. ``progress`` ``None``: a bar on a
    terminal only (none in a log or a notebook).
    """

    out = Path(out)
    folders = {k: name for k, (name, _) in SEVERITY_GRADES.items()} if severity else CLASS_FOLDERS
    for folder_name in (*folders.values(), "masks"):  # what a killed run left
        for stale in (
            *(out / folder_name).glob(f".*{PARTIAL_SUFFIX}"),
            *(out / folder_name).glob("*.tmp.nii.gz"),
        ):
            stale.unlink(missing_ok=True)
    settings = {
        "shape": shape,
        "difficulty": difficulty,
        "confounders": confounders,
        "shift": shift,
        "hila": hila,
        "trees": trees,
    }
    items: list[dict[str, object]] = []
    todo = []
    for i in range(per_class):
        for label in folders:
            folder = out / folders[label]
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"synth_{label}_{i:04d}.nii.gz"
            mask_path = out / "masks" / path.name if masks else None
            if not path.exists() or (mask_path is not None and not mask_path.exists()):
                job_seed = (
                    scan_seed(seed, i * len(folders) + label) if severity else scan_seed(seed, i)
                )
                todo.append((path, mask_path, label, job_seed,
                             _graded(settings, label, job_seed) if severity else settings))  # fmt: skip
            items.append({"image": str(path), "label": label})
    bar = tqdm(
        total=len(items), initial=len(items) - len(todo), desc=f"synth {out}", unit="scan",
        disable=not (sys.stderr.isatty() if progress is None else progress),
    )  # fmt: skip
    with bar:
        workers = min(workers, len(todo), os.cpu_count() or 1)
        if workers > 1:
            import multiprocessing

            context = multiprocessing.get_context("spawn")  # no fork of a process holding torch
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                for done in pool.map(_write_one, todo):
                    bar.update(done)
        else:
            for job in todo:
                bar.update(_write_one(job))
    return items
