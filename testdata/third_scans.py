"""A third generator, for tests only: shares no code with ``app.data.synth`` or
``testdata/foreign_scans.py`` and differs from both in what it draws and how it stores it.

    python -m testdata.third_scans OUT --per-class 30 --seed 0 [--confounded [S]]

Written after the recipe and its pretraining were chosen, and used for nothing but tests: a
recipe that improved on the foreign generator because that generator informed it shows here
whether the gain was general. LPS storage (``diag(-2.2, -2.2, 5)``), int16 HU, 2.2-mm pixels
and 5-mm slices on a 144x144x44 grid; the body's outline and each lung's drawn by low-order
Fourier radii, a diaphragm dome, a mediastinum with an aorta, a vertebra and a table under the
patient; lung texture (smooth noise); vessel trees of straight tapering cylinders with
partial-volume edges in every scan (4-8 trees, 4 generations); findings as clusters of 3-8 Gaussian puffs, most of them
within 15 mm of the pleura, added (+120..+260 HU at their densest) with a reticular texture on
some; correlated noise. ``--confounded [S]`` (strength S, 0..1; alone 1) adds, in both classes:
gravity-dependent density decaying from the lung's posterior edge (up to +300 HU), thin
plate-like dense bands at the bases, more vessel trees, expiration (+0..+120 HU) and blur.

Writes ``OUT/CT-0`` (normal), ``OUT/CT-23`` (abnormal) and ``OUT/masks`` (lesion masks, on
the scan's grid, for ``studies/pointing.py``).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
from scipy import ndimage

from testdata.writer import generator_parser, write_labelled

SHAPE = (144, 144, 44)
SPACING = (2.2, 2.2, 5.0)


def _radius(rng: np.random.Generator, theta: np.ndarray, base: float, wobble: float) -> np.ndarray:
    r = np.full_like(theta, base)
    for k in (2, 3, 4):
        r += base * wobble / k * rng.uniform(-1, 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return r


def _grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patient coordinates in mm: x to the patient's left, y posterior (LPS), z superior."""
    nx, ny, nz = SHAPE
    x = (np.arange(nx) - nx / 2 + 0.5) * SPACING[0]
    y = (np.arange(ny) - ny / 2 + 0.5) * SPACING[1]
    z = np.arange(nz) * SPACING[2]
    return x[:, None, None], y[None, :, None], z[None, None, :]


def _anatomy(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(HU volume without findings, lung mask)."""
    x, y, z = _grid()
    height = SHAPE[2] * SPACING[2]
    vol = np.full(SHAPE, -1010.0, np.float32)
    theta = np.arctan2(y, x)
    rr = np.hypot(x / 1.4, y)
    body_r = _radius(rng, theta, rng.uniform(105, 118), 0.08)
    body = np.broadcast_to(rr <= body_r, SHAPE)
    vol[body] = -110.0  # fat
    vol[np.broadcast_to(rr <= body_r - rng.uniform(8, 16), SHAPE)] = 50.0  # muscle
    table = (y > body_r.max() + 8) & (y < body_r.max() + 16) & (np.abs(x) < 170)
    vol[np.broadcast_to(table, SHAPE)] = 220.0
    lungs = np.zeros(SHAPE, bool)
    for side in (-1.0, 1.0):
        cx, cy = side * rng.uniform(64, 74), rng.uniform(-5, 8)
        th = np.arctan2(y - cy, x - cx)
        base = rng.uniform(52, 60)
        r = _radius(rng, th, base, 0.12)
        # apex narrow, widest two thirds down, then the diaphragm dome cuts it
        frac = z / height
        width = np.clip(np.sin(np.pi * np.clip(0.05 + 1.1 * (1 - frac) ** 0.8, 0, 1)), 0.2, 1)
        inside = np.hypot((x - cx) / 0.8, (y - cy) / 1.25) <= r * width
        dome = rng.uniform(0.12, 0.25) * height + 25 * np.exp(-(((x - side * 20) / 60) ** 2))
        lungs |= inside & (z > dome) & (frac < 0.97)
    medi = (np.abs(x) < rng.uniform(18, 26)) & (y < 45) & (y > -70)
    lungs &= ~np.broadcast_to(medi, SHAPE)
    vol[lungs] = rng.uniform(-885, -835)
    texture = ndimage.gaussian_filter(rng.standard_normal(SHAPE), (5, 5, 2))
    vol += lungs * texture / (texture.std() + 1e-6) * rng.uniform(8, 18)
    vol[np.broadcast_to(medi, SHAPE) & body & ~lungs] = 40.0
    aorta = np.hypot(x + 12, y - 20) <= 13
    vol[np.broadcast_to(aorta, SHAPE) & body] = 55.0
    vertebra = np.hypot(x, y - body_r.max() * 0.62) <= 17
    vol[np.broadcast_to(vertebra, SHAPE) & body] = 330.0
    return vol, lungs


def _cylinder(vol: np.ndarray, lungs: np.ndarray, a: np.ndarray, b: np.ndarray, r: float) -> None:
    """Add a cylinder of radius ``r`` from ``a`` to ``b`` (mm), with a 1-mm partial-volume edge, to
    the lungs of ``vol`` (in place)."""
    x, y, z = _grid()
    lo = np.minimum(a, b) - r - 2
    hi = np.maximum(a, b) + r + 2
    origin = np.array([x.min(), y.min(), z.min()])
    i0 = np.clip(np.floor((lo - origin) / SPACING).astype(int), 0, SHAPE)
    i1 = np.clip(np.ceil((hi - origin) / SPACING).astype(int) + 1, 0, SHAPE)
    if np.any(i1 <= i0):
        return
    sl = tuple(slice(p, q) for p, q in zip(i0, i1, strict=True))
    px, py, pz = x[sl[0]], y[:, sl[1]], z[:, :, sl[2]]
    d = b - a
    length2 = float(d @ d) + 1e-6
    t = np.clip(((px - a[0]) * d[0] + (py - a[1]) * d[1] + (pz - a[2]) * d[2]) / length2, 0, 1)
    dist = np.sqrt(
        (px - a[0] - t * d[0]) ** 2 + (py - a[1] - t * d[1]) ** 2 + (pz - a[2] - t * d[2]) ** 2
    )
    share = np.clip(r + 0.5 - dist, 0, 1) * lungs[sl]
    vol[sl] += share * (45.0 - vol[sl])


def _tree(rng: np.random.Generator, vol: np.ndarray, lungs: np.ndarray, start: np.ndarray) -> None:
    """A vessel tree growing laterally from ``start`` (mm): 4 generations of forking cylinders."""
    lateral = np.array([np.sign(start[0]) or 1.0, 0.0, 0.0])
    direction = lateral + rng.normal(0, 0.7, 3)
    stack = [(start, direction / np.linalg.norm(direction), rng.uniform(2.0, 3.5), 0)]
    while stack:
        p, d, r, gen = stack.pop()
        q = p + d * rng.uniform(12, 30)
        _cylinder(vol, lungs, p, q, r)
        if gen < 4:
            for _ in range(2):
                nd = d + rng.normal(0, 0.6, 3)
                stack.append((q, nd / np.linalg.norm(nd), r * 0.75, gen + 1))


def _mm(index: np.ndarray) -> np.ndarray:
    x, y, z = _grid()
    return np.array([x.ravel()[index[0]], y.ravel()[index[1]], z.ravel()[index[2]]])


def _finding(rng: np.random.Generator, lungs: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """A weight field (0..1): a cluster of Gaussian puffs, mostly near the pleura."""
    near = np.argwhere(lungs & (depth > 3) & (depth < 15))
    anywhere = np.argwhere(lungs & (depth > 3))
    pool = near if (len(near) and rng.random() < 0.7) else anywhere
    centre = _mm(pool[rng.integers(len(pool))])
    x, y, z = _grid()
    field = np.zeros(SHAPE, np.float32)
    for _ in range(int(rng.integers(3, 9))):
        c = centre + rng.normal(0, 6, 3) * np.array([1, 1, 0.6])
        s = rng.uniform(3, 7)
        field += np.exp(
            -((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s)
        ).astype(np.float32)
    field = np.clip(field, 0, 1)
    if rng.random() < 0.4:  # reticular ("crazy paving") texture
        band = ndimage.gaussian_filter(rng.standard_normal(SHAPE), 1.0) - ndimage.gaussian_filter(
            rng.standard_normal(SHAPE), 2.5
        )
        field *= np.clip(0.75 + 2.0 * band, 0.4, 1.0)
    return field * lungs


def scan(rng: np.random.Generator, abnormal: bool, s: float) -> tuple[np.ndarray, np.ndarray]:
    """(HU volume, lesion mask) of one scan; ``s``: the confounders' strength, 0..1."""
    vol, lungs = _anatomy(rng)
    x, y, z = _grid()
    depth = ndimage.distance_transform_edt(lungs, sampling=SPACING)
    # vessel trees from each lung's medial side
    idx = np.argwhere(lungs)
    for _ in range(int(rng.integers(4, 9) + rng.integers(0, 7) * s)):
        p = _mm(idx[rng.integers(len(idx))])
        p[0] = np.sign(p[0]) * (0.4 * abs(p[0]) + 15)  # near the hilum
        _tree(rng, vol, lungs, p)
    if s:
        # dependent density decays from each column's posterior lung edge
        ys = np.where(lungs, np.arange(SHAPE[1])[None, :, None], -1)
        back = ys.max(axis=1, keepdims=True)
        d_mm = (back - np.arange(SHAPE[1])[None, :, None]) * SPACING[1]
        vol += (
            lungs
            * s
            * rng.uniform(100, 300)
            * np.exp(-np.clip(d_mm, 0, None) / rng.uniform(10, 30))
        )
        vol += lungs * s * rng.uniform(0, 120)
        for _ in range(int(rng.integers(0, 4) * s + 0.5)):  # plate-like bands at the bases
            base = idx[idx[:, 2] < SHAPE[2] * 0.4]
            if not len(base):
                break
            c = _mm(base[rng.integers(len(base))])
            n = rng.standard_normal(3)
            n /= np.linalg.norm(n)
            plane = np.abs((x - c[0]) * n[0] + (y - c[1]) * n[1] + (z - c[2]) * n[2])
            disc = (plane < rng.uniform(1.0, 1.8)) & (
                np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) < rng.uniform(10, 22)
            )
            vol += lungs * disc * 250.0 * s
    mask = np.zeros(SHAPE, bool)
    if abnormal:
        for _ in range(int(rng.integers(1, 6))):
            w = _finding(rng, lungs, depth)
            vol += w * rng.uniform(120, 260)
            mask |= w > 0.35
    sigma = 0.5 + 0.7 * s
    vol = ndimage.gaussian_filter(vol, (sigma, sigma, sigma * 0.4))
    noise = ndimage.gaussian_filter(rng.standard_normal(SHAPE), 0.8)
    vol += noise / noise.std() * rng.uniform(10, 30)
    return vol, mask


def _stored(volume: np.ndarray) -> nib.Nifti1Image:
    """int16 HU in LPS: the array's first two axes run to the patient's left and back."""
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    return nib.Nifti1Image(np.clip(np.round(volume), -1024, 3071).astype(np.int16), affine)


def main(argv: list[str] | None = None) -> int:
    p = generator_parser(__doc__, per_class=30)
    args = p.parse_args(argv)
    written = write_labelled(
        args.out,
        args.per_class,
        lambda rng, abnormal: scan(rng, abnormal, args.confounded),
        _stored,
        [args.seed, 4242],
        f"t{args.seed}",
    )
    print(f"wrote {written} scans to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
