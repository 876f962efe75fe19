"""Scans from a generator that shares no code with ``app.data.synth``: a check on overfitting to it.

    python -m testdata.foreign_scans OUT --per-class 60 --seed 0 [--confounded]

The pretrained network and the recipe were chosen on the project's own generator; a recipe tuned
to one generator can fail on another. This one is written apart from it, on purpose different in
every choice it makes: RAS storage (not LAS), uint16 with a -1024 intercept (not int16), 2.5-mm
pixels and 6-mm slices on a 128x128x48 grid, lungs as z-tapered superellipses, a heart, ribs as
dots, findings as thresholded smoothed noise inside an ellipsoid (small, faint ground-glass
patches, about -600 HU at their centre, soft edges), no consolidation. ``--confounded [S]`` (strength S, 0..1; alone 1) adds what
defeats a lung histogram: gravity-dependent density (up to +250 HU posteriorly, per scan, either
class), many blurred vessels (partial volume at their edges falls in the ground-glass range),
expiration (the whole lung +0..+150 HU) and blur.

Writes ``OUT/CT-0`` (normal), ``OUT/CT-23`` (abnormal) and ``OUT/masks`` (each abnormal scan's
lesion mask, for ``studies/pointing.py``).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
from scipy import ndimage

from testdata.writer import generator_parser, write_labelled

SHAPE = (128, 128, 48)
SPACING = (2.5, 2.5, 6.0)


def _body(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (HU volume without findings, lung mask, posterior coordinate in [0, 1])."""
    nx, ny, nz = SHAPE
    x = (np.arange(nx) - nx / 2 + 0.5)[:, None, None] * SPACING[0]
    y = (np.arange(ny) - ny / 2 + 0.5)[None, :, None] * SPACING[1]
    z = np.linspace(0.0, 1.0, nz)[None, None, :]
    vol = np.full(SHAPE, -1000.0, np.float32)
    # RAS: x grows to the left of the patient, y anterior; the body is wider than deep
    ax, ay = rng.uniform(135, 155), rng.uniform(95, 115)
    body = (x / ax) ** 2 + (y / ay) ** 2 <= 1.0
    fat = (x / (ax - 12)) ** 2 + (y / (ay - 10)) ** 2 > 1.0
    vol[np.broadcast_to(body, SHAPE)] = 45.0
    vol[np.broadcast_to(body & fat, SHAPE)] = -95.0
    taper = np.clip(np.sin(np.pi * (0.12 + 0.85 * z)), 0.15, 1.0)  # apex and base smaller
    lungs = np.zeros(SHAPE, bool)
    for side in (-1, 1):
        cx, cy = side * rng.uniform(52, 62), rng.uniform(-12, -2)
        rx, ry = rng.uniform(36, 44) * taper, rng.uniform(62, 74) * taper
        p = rng.uniform(2.2, 3.0)  # superellipse exponent
        lungs |= (np.abs((x - cx) / rx) ** p + np.abs((y - cy) / ry) ** p) <= 1.0
    heart = ((x - 12) / 48) ** 2 + ((y - 18) / 40) ** 2 + ((z - 0.25) / 0.3) ** 2 <= 1.0
    lungs &= ~np.broadcast_to(heart, SHAPE)
    vol[lungs] = rng.uniform(-880, -830)
    vol[np.broadcast_to(heart, SHAPE) & np.broadcast_to(body, SHAPE)] = 38.0
    spine = (x / 16) ** 2 + ((y + ay - 30) / 16) ** 2 <= 1.0
    vol[np.broadcast_to(spine, SHAPE)] = 420.0
    for angle in np.linspace(0.2, np.pi - 0.2, 9):  # ribs: dense dots just inside the fat
        for s in (-1, 1):
            rx_, ry_ = (
                (ax - 16) * np.cos(angle) * s,
                (ay - 14) * np.sin(angle) * rng.choice([-1, 1]),
            )
            vol[np.broadcast_to(((x - rx_) ** 2 + (y - ry_) ** 2) <= 36, SHAPE)] = 650.0
    post = np.broadcast_to(np.clip((-y + 80) / 160, 0, 1), SHAPE).astype(np.float32)
    return vol, lungs, post


def _lesion(rng: np.random.Generator, lungs: np.ndarray) -> np.ndarray:
    """A soft lesion weight (0..1) at a random lung voxel."""
    idx = np.argwhere(ndimage.binary_erosion(lungs, iterations=2))
    c = idx[rng.integers(len(idx))]
    r_mm = rng.uniform(8, 16)
    r = np.array([r_mm / SPACING[0], r_mm / SPACING[1], max(r_mm / SPACING[2], 1.0)])
    lo = np.maximum(c - np.ceil(2 * r).astype(int), 0)
    hi = np.minimum(c + np.ceil(2 * r).astype(int) + 1, SHAPE)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    grid = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij")
    ell = sum(((g - cc) / rr) ** 2 for g, cc, rr in zip(grid, c, r, strict=True))
    noise = ndimage.gaussian_filter(rng.standard_normal(ell.shape), 1.2)
    shape = (noise > -0.15) & (ell <= 1.0)
    w = np.zeros(SHAPE, np.float32)
    w[sl] = ndimage.gaussian_filter(shape.astype(np.float32), 0.8)
    return w * lungs


def _vessels(rng: np.random.Generator, lungs: np.ndarray, n: int) -> np.ndarray:
    w = np.zeros(SHAPE, np.float32)
    idx = np.argwhere(lungs)
    for _ in range(n):
        p = idx[rng.integers(len(idx))].astype(float)
        d = rng.standard_normal(3)
        for _ in range(int(rng.integers(8, 30))):
            d = d + 0.4 * rng.standard_normal(3)
            d /= np.linalg.norm(d) + 1e-6
            p = p + d * np.array([1.5, 1.5, 0.6])
            i = np.round(p).astype(int)
            if np.any(i < 0) or np.any(i >= SHAPE):
                break
            w[tuple(i)] = 1.0
    w = ndimage.grey_dilation(w, size=(2, 2, 1))
    return ndimage.gaussian_filter(w, (0.9, 0.9, 0.4)) * lungs


CONFOUNDERS = ("dependent", "expiration", "vessels", "blur")


def scan(
    rng: np.random.Generator,
    abnormal: bool,
    confounded: float,
    contrast_only: bool = False,
    which: tuple[str, ...] = CONFOUNDERS,
) -> tuple[np.ndarray, np.ndarray]:
    """(HU volume, lesion mask); with ``contrast_only`` the findings' own contribution (HU added
    by them, blurred as the scan, before noise) in place of the volume. ``which``: the
    confounders drawn (their strengths are drawn either way; the vessels' paths only when they
    are drawn, so without them the findings fall elsewhere)."""
    vol, lungs, post = _body(rng)
    blur = 0.0
    if confounded:
        c = confounded
        dependent = lungs * (rng.uniform(0.2, 1.0) * 250.0 * c * post**1.5)
        expiration = lungs * rng.uniform(0, 150 * c)
        vessels = int(rng.integers(40, 120) * c)
        if "dependent" in which:
            vol += dependent
        if "expiration" in which:
            vol += expiration
        if "vessels" in which:
            v = _vessels(rng, lungs, vessels)
            vol = vol + v * (40.0 - vol) * 0.9
        blur = 0.4 * confounded if "blur" in which else 0.0
    mask = np.zeros(SHAPE, bool)
    before = vol.copy()
    if abnormal:
        for _ in range(int(rng.integers(2, 5))):
            w = _lesion(rng, lungs)
            hu = rng.uniform(-640, -560)
            vol = vol + w * (hu - vol).clip(min=0)
            mask |= w > 0.5
    if contrast_only:
        return ndimage.gaussian_filter(vol - before, 0.6 + blur), mask
    vol = ndimage.gaussian_filter(vol, 0.6 + blur)
    vol += rng.normal(0, rng.uniform(12, 25), SHAPE)
    return vol, mask


def visibility(seed: int, scans: int = 20) -> None:
    """Per confounder strength: how many voxels of an abnormal scan its findings raise by more
    than 100 HU (median, fewest, scans with under 20), and the median finding's peak contrast."""
    for strength in (0.0, 0.5, 1.0):
        counts, peaks = [], []
        for i in range(scans):
            contrast, _ = scan(np.random.default_rng([seed, 1, i, 7331]), True, strength, True)
            counts.append(int((contrast > 100).sum()))
            peaks.append(float(contrast.max()))
        print(
            f"strength {strength}: voxels over +100 HU median {np.median(counts):.0f}, fewest "
            f"{min(counts)}, {sum(c < 20 for c in counts)} of {scans} scans under 20; peak "
            f"contrast median {np.median(peaks):.0f} HU"
        )


def main(argv: list[str] | None = None) -> int:
    p = generator_parser(__doc__, per_class=60)
    p.add_argument(
        "--only",
        default=",".join(CONFOUNDERS),
        help="the confounders drawn, comma-separated (default: all): " + ", ".join(CONFOUNDERS),
    )
    p.add_argument(
        "--visibility",
        action="store_true",
        help="write nothing; print how visible the findings of the first 20 abnormal scans are "
        "at strengths 0, 0.5 and 1 (voxels more than 100 HU above their own lung)",
    )
    args = p.parse_args(argv)
    which = tuple(args.only.split(","))
    if not set(which) <= set(CONFOUNDERS):
        p.error(f"--only: choose from {', '.join(CONFOUNDERS)}")
    if args.visibility:
        visibility(args.seed)
        return 0
    written = write_labelled(
        args.out,
        args.per_class,
        lambda rng, abnormal: scan(rng, abnormal, args.confounded, which=which),
        _stored,
        [args.seed, 7331],
        f"f{args.seed}",
    )
    print(f"wrote {written} scans to {args.out}")
    return 0


def _stored(volume: np.ndarray) -> nib.Nifti1Image:
    """uint16 with a rescale slope and intercept (HU = stored - 1024), RAS."""
    img = nib.Nifti1Image(
        np.clip(np.round(volume + 1024), 0, 4095).astype(np.uint16), np.diag([*SPACING, 1.0])
    )
    img.header.set_slope_inter(1.0, -1024.0)
    return img


if __name__ == "__main__":
    raise SystemExit(main())
