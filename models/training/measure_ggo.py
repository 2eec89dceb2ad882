"""Ground-glass statistics of a chest CT, measured the way the issue measured two real COVID-19 CTs.

It is the yardstick for the simulator: run it on a real COVID-19 CT (``covid_ct_ricord``, CC BY-NC: measured
here, never copied or trained on), on the clean backgrounds (their baseline: vessels and partial volume also fall
in the ground-glass HU band) and on simulated volumes, and compare:

- lung volume (mL), from ``simulate.lung_mask``, the simulator's own lung fields;
- ground-glass attenuation: voxels at -750..-300 HU inside the lungs, as % of lung volume; of those, % in the
  posterior half of each lung (LPS: +y is posterior; the lungs are split into sides at the mid x of the lung
  mask, each side into halves at its own y centroid), % within 15 mm of the pleura (distance inside the lung
  mask), % within 3 mm of the lung mask's border (rim partial volume, present in any lung), and their median,
  10th and 90th percentile HU. The lungs' own posterior and subpleural shares are printed too: a distribution
  that favours neither would match them, not 50 %;
- parenchyma noise: the robust std (1.4826 * MAD) of ``hu - gaussian(hu, 1.5 mm)`` over lung voxels below
  -800 HU away from vessels, airways and the pleura, and the lag-1 in-plane autocorrelation of that residual (a
  kernel-sharpness figure: a sharp kernel leaves nearly white noise, low correlation; a soft one a high one).
  Lag 1 is one pixel, so scans with different pixel sizes compare only roughly.

The issue reported, for two real COVID CTs: 9 % and 19 % of lung volume; 80-89 % posterior; 75-85 % within
15 mm of the pleura; median -590 and -630 HU, p10-p90 about -720 to -405 HU.

Usage: ``python models/training/measure_ggo.py [--backgrounds] [scan.nrrd ...]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))

import simulate

GGO_HU = (-750.0, -300.0)
SUBPLEURAL_MM = 15.0
SMOOTH_MM = 1.5
PARENCHYMA_HU = -800.0
AIR_HU = -1024.0


def _axis_sign(image: sitk.Image, axis: int) -> float:
    """+1 when array index ``axis`` (0 = x, 1 = y) runs along +LPS of the same axis, -1 when it runs against it.
    Only axial scans are meant here: the slice axes must be (anti)parallel to x and y."""
    d = np.array(image.GetDirection()).reshape(3, 3)
    c = d[axis, axis]
    if abs(abs(c) - 1.0) > 1e-3:
        raise ValueError(f"not an axial grid: direction {image.GetDirection()}")
    return float(np.sign(c))


def measure(image: sitk.Image, lung: np.ndarray | None = None) -> dict[str, float]:
    """Ground-glass and noise statistics of ``image`` (HU); ``lung`` (bool z,y,x) defaults to
    ``simulate.lung_mask``. Percentages are of lung volume (``ggo_pct``) or of the ground-glass voxels."""
    # Below -1024 HU is the padding outside the field of view of some scans, no tissue: floor it as air, so the
    # smoothing behind the noise figure does not mix -3024 HU into the lung edge.
    hu = np.maximum(sitk.GetArrayFromImage(image).astype(np.float32), AIR_HU)
    spacing = tuple(float(s) for s in image.GetSpacing())
    if lung is None:
        lung = simulate.lung_mask(hu, spacing)
    lung = lung.astype(bool)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    n_lung = int(lung.sum())
    out: dict[str, float] = {"lung_ml": n_lung * voxel_ml}
    if n_lung == 0:
        return out

    ggo = lung & (hu >= GGO_HU[0]) & (hu <= GGO_HU[1])
    n_ggo = int(ggo.sum())
    out["ggo_ml"] = n_ggo * voxel_ml
    out["ggo_pct"] = 100.0 * n_ggo / n_lung

    # posterior halves: sides split at the lung mask's mid x, each side at its own y centroid
    xx = np.nonzero(lung.any(axis=(0, 1)))[0]
    x_mid = 0.5 * (xx.min() + xx.max())
    ys = _axis_sign(image, 1)
    xs = _axis_sign(image, 0)
    cols = np.arange(hu.shape[2])
    rows = np.arange(hu.shape[1])
    posterior = np.zeros(hu.shape, bool)
    for name, side_cols in (("right", cols < x_mid), ("left", cols >= x_mid)):
        if xs < 0:  # index x against +x (patient left): the sides swap
            name = "left" if name == "right" else "right"
        on_side = lung & side_cols[None, None, :]
        if not on_side.any():
            continue
        y_c = float(np.nonzero(on_side)[1].mean())
        post_rows = (rows > y_c) if ys > 0 else (rows < y_c)
        post_side = on_side & post_rows[None, :, None]
        posterior |= post_side
        g_side = ggo & on_side
        out[f"post_{name}_pct"] = 100.0 * (g_side & post_side).sum() / max(int(g_side.sum()), 1)
    dist = simulate.inside_distance_mm(lung, spacing)
    subpleural = lung & (dist <= SUBPLEURAL_MM)
    out["lung_post_pct"] = 100.0 * (lung & posterior).sum() / n_lung
    out["lung_sub15_pct"] = 100.0 * subpleural.sum() / n_lung
    if n_ggo:
        v = hu[ggo]
        out["post_pct"] = 100.0 * (ggo & posterior).sum() / n_ggo
        out["sub15_pct"] = 100.0 * (ggo & subpleural).sum() / n_ggo
        # the lung mask's own rim: pleura, mediastinum and the closed-in vessel walls, partial volume at
        # -750..-300 HU in any lung; a large share here means the band counts edges more than haze
        out["rim3_pct"] = 100.0 * (ggo & (dist < 3.0)).sum() / n_ggo
        out["median_hu"], out["p10_hu"], out["p90_hu"] = (float(q) for q in np.percentile(v, [50, 10, 90]))

    # parenchyma noise: high-pass residual over plain lung, away from vessels (> -500 HU), airways (smoothed
    # < -950 HU) and the pleura, each by 2-3 mm, so edges do not pass for noise
    sm = simulate.smooth_mm(hu, spacing, SMOOTH_MM)
    res = hu - sm
    vessel = simulate.dilate_mm(lung & (hu > -500.0), spacing, 2.0)
    airway = simulate.dilate_mm(lung & (sm < -950.0), spacing, 2.0)
    sel = lung & (hu < PARENCHYMA_HU) & (dist >= 3.0) & ~vessel & ~airway
    if sel.sum() > 1000:
        r = res[sel]
        out["noise_hu"] = float(1.4826 * np.median(np.abs(r - np.median(r))))
        out["ac1"] = _lag1_autocorrelation(res, sel)
        out["noise_voxels"] = float(sel.sum())
    return out


def _lag1_autocorrelation(res: np.ndarray, sel: np.ndarray) -> float:
    """Pearson correlation of the residual with its x and y neighbours (one pixel), over pairs inside ``sel``."""
    a_parts, b_parts = [], []
    for axis in (1, 2):
        n = res.shape[axis]
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(0, n - 1)
        hi[axis] = slice(1, n)
        both = sel[tuple(lo)] & sel[tuple(hi)]
        a_parts.append(res[tuple(lo)][both])
        b_parts.append(res[tuple(hi)][both])
    a = np.concatenate(a_parts).astype(np.float64)
    b = np.concatenate(b_parts).astype(np.float64)
    a -= a.mean()
    b -= b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


COLUMNS = (
    ("lung_ml", "lung mL", "{:8.0f}"),
    ("ggo_pct", "GGO %", "{:6.1f}"),
    ("post_pct", "post %", "{:6.0f}"),
    ("post_right_pct", "R", "{:4.0f}"),
    ("post_left_pct", "L", "{:4.0f}"),
    ("lung_post_pct", "lung", "{:5.0f}"),
    ("sub15_pct", "<15mm %", "{:7.0f}"),
    ("lung_sub15_pct", "lung", "{:5.0f}"),
    ("rim3_pct", "<3mm %", "{:6.0f}"),
    ("median_hu", "median", "{:6.0f}"),
    ("p10_hu", "p10", "{:5.0f}"),
    ("p90_hu", "p90", "{:5.0f}"),
    ("noise_hu", "noise", "{:5.1f}"),
    ("ac1", "ac1", "{:5.2f}"),
)


def header() -> str:
    head = f"{'scan':16} " + " ".join(f"{label:>{len(fmt.format(0.0))}}" for _, label, fmt in COLUMNS)
    return head


def row(name: str, m: dict[str, float]) -> str:
    cells = []
    for key, _, fmt in COLUMNS:
        width = len(fmt.format(0.0))
        cells.append(fmt.format(m[key]) if key in m else f"{'-':>{width}}")
    return f"{name:16} " + " ".join(cells)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("paths", nargs="*", type=Path, help="CT volumes (NRRD or anything SimpleITK reads), HU")
    p.add_argument("--backgrounds", action="store_true", help="also measure the seven training backgrounds")
    args = p.parse_args(argv)
    print(header())
    for path in args.paths:
        print(row(path.stem[:16], measure(sitk.ReadImage(str(path), sitk.sitkFloat32))), flush=True)
    if args.backgrounds:
        import backgrounds

        for name in backgrounds.NAMES:
            print(row(name, measure(backgrounds.load(name).image)), flush=True)


if __name__ == "__main__":
    main()
