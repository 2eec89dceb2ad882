"""Ground-glass opacity (GGO) simulator and procedural chest phantoms, numpy + SimpleITK only.

Arrays are numpy (z, y, x) as SimpleITK returns them; spacings passed here are (x, y, z) in mm, as in
config_inference.json, and converted where needed. Everything is driven by a ``numpy.random.Generator`` so a seed
reproduces a volume bit for bit.

How a GGO is made (``insert_ggo``):
- lung fields: HU < -400, connected components not touching the in-plane border (that is the air outside the body),
  components >= 20 mL, closed and hole-filled per slice so vessels inside the lung belong to it;
- centre: inside the lung parenchyma (not in airways, vessels or near an excluded mask such as a solid lesion),
  75 % subpleural (<= 15 mm from the lung border);
- shape: an ellipsoid (random axes 0.6-1.4, random rotation) whose level set is perturbed by smoothed noise:
  field f = 1 - d + 0.35 * noise, label = f > 0, so margins are irregular; 25 % of lesions get 1-3 satellites that
  merge into confluent patches;
- intensity: a soft ramp w = clip((f + m) / 2m, 0, 1) (0.5 exactly on the label border, ramp about 4 mm wide)
  times an amplitude that brings the local parenchyma to a target of -750 to -300 HU, added to the original HU
  (so vessels stay visible through the haze, brighter than before); overlapping lesions combine by maximum;
- the label is exactly the inserted region, inside the lung fields only, airway lumen and excluded masks removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

LUNG_HU = -850.0


# ----------------------------------------------------------------------------------------------- helpers
def _img(arr: np.ndarray, spacing_xyz: tuple[float, float, float]) -> sitk.Image:
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing([float(s) for s in spacing_xyz])
    return im


def smooth_noise(shape_zyx: tuple[int, ...], spacing_xyz, sigma_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian white noise smoothed with a Gaussian of ``sigma_mm`` (FFT, periodic), rescaled to std 1."""
    n = rng.standard_normal(shape_zyx).astype(np.float32)
    sp_zyx = (spacing_xyz[2], spacing_xyz[1], spacing_xyz[0])
    f = np.fft.rfftn(n)
    for ax, (size, sp) in enumerate(zip(shape_zyx, sp_zyx, strict=True)):
        freq = np.fft.rfftfreq(size, d=sp) if ax == len(shape_zyx) - 1 else np.fft.fftfreq(size, d=sp)
        g = np.exp(-2.0 * (np.pi * sigma_mm * freq) ** 2)
        shp = [1] * len(shape_zyx)
        shp[ax] = g.size
        f *= g.reshape(shp)
    out = np.fft.irfftn(f, s=shape_zyx).astype(np.float32)
    sd = float(out.std())
    return out / sd if sd > 0 else out


def blur_xy(arr: np.ndarray) -> np.ndarray:
    """A [1,2,1]/4 blur in x and y (a crude in-plane point-spread function)."""
    a = arr
    a = 0.25 * np.roll(a, 1, axis=2) + 0.5 * a + 0.25 * np.roll(a, -1, axis=2)
    a = 0.25 * np.roll(a, 1, axis=1) + 0.5 * a + 0.25 * np.roll(a, -1, axis=1)
    return a


def components(mask: np.ndarray) -> np.ndarray:
    """26-connected components of a boolean array (z,y,x): 0 background, 1..n one label per component."""
    return sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True))


def lung_mask(hu: np.ndarray, spacing_xyz) -> np.ndarray:
    """Lung fields (bool, z,y,x): low-HU components inside the body, closed and hole-filled slice by slice."""
    air = _img((hu < -400).astype(np.uint8), spacing_xyz)
    cc = sitk.ConnectedComponent(air, True)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(cc)
    nz, ny, nx = hu.shape
    voxel_ml = float(np.prod(spacing_xyz)) / 1000.0
    keep = []
    for lab in stats.GetLabels():
        x0, y0, _z0, sx, sy, _sz = stats.GetBoundingBox(lab)
        touches = x0 == 0 or y0 == 0 or x0 + sx >= nx or y0 + sy >= ny
        if not touches and stats.GetNumberOfPixels(lab) * voxel_ml >= 20.0:
            keep.append(lab)
    cc_arr = sitk.GetArrayFromImage(cc)
    mask = np.isin(cc_arr, keep) if keep else np.zeros(hu.shape, bool)
    out = np.zeros_like(mask)
    for z in range(nz):
        if not mask[z].any():
            continue
        s = sitk.GetImageFromArray(mask[z].astype(np.uint8))
        s = sitk.BinaryMorphologicalClosing(s, [2, 2])
        s = sitk.BinaryFillhole(s)
        out[z] = sitk.GetArrayFromImage(s).astype(bool)
    return out


def inside_distance_mm(mask: np.ndarray, spacing_xyz) -> np.ndarray:
    """Distance (mm) from each voxel inside ``mask`` to the mask border (0 outside)."""
    d = sitk.SignedMaurerDistanceMap(
        _img(mask.astype(np.uint8), spacing_xyz), insideIsPositive=True, squaredDistance=False, useImageSpacing=True
    )
    return np.clip(sitk.GetArrayFromImage(d), 0, None).astype(np.float32)


def dilate_mm(mask: np.ndarray, spacing_xyz, mm: float) -> np.ndarray:
    if not mask.any() or mm <= 0:
        return mask.copy()
    d = sitk.SignedMaurerDistanceMap(
        _img(mask.astype(np.uint8), spacing_xyz), insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    return sitk.GetArrayFromImage(d) <= mm


def smooth_mm(arr: np.ndarray, spacing_xyz, sigma_mm: float) -> np.ndarray:
    im = sitk.SmoothingRecursiveGaussian(_img(arr.astype(np.float32), spacing_xyz), sigma_mm)
    return sitk.GetArrayFromImage(im)


# ----------------------------------------------------------------------------------------------- GGO insertion
@dataclass
class Lesion:
    center_zyx: tuple[int, int, int]
    diameter_mm: float
    target_hu: float
    subpleural: bool


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    a, b, c, d = q
    return np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
        ]
    )


def insert_ggo(
    hu: np.ndarray,
    spacing_xyz: tuple[float, float, float],
    rng: np.random.Generator,
    n_lesions: int,
    exclude: np.ndarray | None = None,
    diameter_mm: tuple[float, float] = (5.0, 50.0),
    lung: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, list[Lesion]]:
    """Insert ``n_lesions`` primary GGOs (plus confluent satellites) into ``hu`` (z,y,x).

    Returns (new HU as float32, label uint8 with 1 = GGO, the lesions placed). ``exclude`` (e.g. a solid lesion)
    stays label 0 and untouched, with a 3 mm margin.
    """
    hu = hu.astype(np.float32)
    if lung is None:
        lung = lung_mask(hu, spacing_xyz)
    sp_zyx = np.array([spacing_xyz[2], spacing_xyz[1], spacing_xyz[0]], dtype=np.float64)
    excl = dilate_mm(exclude, spacing_xyz, 3.0) if exclude is not None and exclude.any() else np.zeros(hu.shape, bool)
    sm = smooth_mm(hu, spacing_xyz, 1.5)
    airway = (sm < -950) & lung
    allowed = lung & ~airway & ~excl
    dist = inside_distance_mm(lung, spacing_xyz)
    core = allowed & (sm < -600) & (dist >= 2.0) & ~dilate_mm(excl, spacing_xyz, 5.0)
    sub = np.argwhere(core & (dist <= 15.0))
    deep = np.argwhere(core & (dist > 15.0))
    delta = np.zeros(hu.shape, np.float32)
    label = np.zeros(hu.shape, bool)
    lesions: list[Lesion] = []
    if len(sub) + len(deep) == 0:
        return hu, label.astype(np.uint8), lesions
    lung_soft = smooth_mm(lung.astype(np.float32), spacing_xyz, 0.8)

    def place(center: np.ndarray, diam: float, target: float, subpleural: bool) -> None:
        r = diam / 2.0
        half = np.ceil((1.6 * r + 6.0) / sp_zyx).astype(int)
        lo = np.maximum(center - half, 0)
        hi = np.minimum(center + half + 1, hu.shape)
        if np.any(hi - lo < 1):
            return
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        shape = tuple(int(v) for v in hi - lo)
        grids = np.meshgrid(*[(np.arange(lo[k], hi[k]) - center[k]) * sp_zyx[k] for k in range(3)], indexing="ij")
        pts = np.stack([g.ravel() for g in grids], axis=0)  # 3 x N, mm, (z,y,x)
        rot = _random_rotation(rng)
        axes = rng.uniform(0.6, 1.4, size=3) * r
        q = (rot @ pts) / axes[:, None]
        d = np.sqrt((q**2).sum(axis=0)).reshape(shape)
        noise = smooth_noise(shape, spacing_xyz, max(1.5, 0.3 * r), rng) if min(shape) > 1 else np.zeros(shape)
        f = 1.0 - d + 0.35 * noise.astype(np.float32)
        m = float(np.clip(2.0 / r, 0.05, 0.35))
        w = np.clip((f + m) / (2 * m), 0.0, 1.0)
        ok = allowed[sl]
        par = hu[sl][ok & (sm[sl] < -600)]
        bg = float(np.median(par)) if par.size else LUNG_HU
        amp = max(target - bg, 80.0)
        tex = smooth_noise(shape, spacing_xyz, 1.2, rng) if min(shape) > 1 else np.zeros(shape)
        dl = (w * amp * (1.0 + 0.12 * tex) * lung_soft[sl] * ok).astype(np.float32)
        delta[sl] = np.maximum(delta[sl], dl)
        label[sl] |= (f > 0) & ok
        lesions.append(Lesion(tuple(int(c) for c in center), diam, target, subpleural))  # type: ignore[arg-type]

    lo_d, hi_d = diameter_mm
    for _ in range(n_lesions):
        subpleural = len(deep) == 0 or (len(sub) > 0 and rng.random() < 0.75)
        pool = sub if subpleural else deep
        c = pool[rng.integers(len(pool))]
        diam = float(np.exp(rng.uniform(np.log(lo_d), np.log(hi_d))))
        target = float(rng.uniform(-750.0, -300.0))
        place(c, diam, target, subpleural)
        if rng.random() < 0.25:  # confluent satellites
            for _s in range(int(rng.integers(1, 4))):
                off = rng.normal(0, 0.6 * diam / 2.0, size=3) / sp_zyx
                c2 = np.clip(np.round(c + off).astype(int), 0, np.array(hu.shape) - 1)
                if allowed[tuple(c2)]:
                    d2 = diam * float(rng.uniform(0.5, 1.0))  # drawn before the target: keeps the seeded stream
                    t2 = float(np.clip(target + rng.normal(0, 60), -750, -300))
                    place(c2, d2, t2, subpleural)
    label &= allowed
    return hu + delta, label.astype(np.uint8), lesions


# ----------------------------------------------------------------------------------------------- phantoms
def _paint_balls(
    arr: np.ndarray,
    sp_zyx: np.ndarray,
    centers_mm: np.ndarray,
    radii_mm: np.ndarray,
    value: float,
    where: np.ndarray | None = None,
) -> None:
    """Set ``arr`` to ``value`` inside balls (centres in mm, z,y,x), optionally only where ``where`` is True."""
    for c, r in zip(centers_mm, radii_mm, strict=True):
        lo = np.maximum(np.floor((c - r) / sp_zyx).astype(int), 0)
        hi = np.minimum(np.ceil((c + r) / sp_zyx).astype(int) + 1, arr.shape)
        if np.any(hi <= lo):
            continue
        zz, yy, xx = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        d2 = ((zz * sp_zyx[0] - c[0]) ** 2) + ((yy * sp_zyx[1] - c[1]) ** 2) + ((xx * sp_zyx[2] - c[2]) ** 2)
        m = d2 <= r * r
        sl = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        if where is not None:
            m = m & where[sl]
        arr[sl][m] = value


def _tree(
    rng: np.random.Generator,
    start: np.ndarray,
    direction: np.ndarray,
    radius: float,
    min_radius: float,
    inside,
    depth: int = 0,
    max_depth: int = 7,
) -> list[tuple[np.ndarray, float]]:
    """A branching random walk (vessel or airway tree): list of (centre mm, radius mm) samples."""
    out: list[tuple[np.ndarray, float]] = []
    p = start.astype(float).copy()
    d = direction / np.linalg.norm(direction)
    length = float(rng.uniform(25, 60)) * (radius / 4.0) ** 0.5 + 10.0
    step = max(0.4, radius * 0.5)
    n = int(length / step)
    entered = depth > 0
    for _ in range(n + (0 if entered else int(40 / step))):
        d = d + rng.normal(0, 0.08, 3)
        d /= np.linalg.norm(d)
        p = p + d * step
        if not inside(p):
            if entered:
                return out
            continue
        entered = True
        out.append((p.copy(), radius))
    if not entered:
        return out
    if depth >= max_depth or radius * 0.75 < min_radius:
        return out
    for _k in range(2):
        nd = d + rng.normal(0, 0.55, 3)
        out += _tree(rng, p, nd, radius * float(rng.uniform(0.65, 0.85)), min_radius, inside, depth + 1, max_depth)
    return out


def make_phantom(
    rng: np.random.Generator, spacing_xyz: tuple[float, float, float] = (0.8, 0.8, 5.0)
) -> tuple[np.ndarray, np.ndarray]:
    """A procedural chest CT (HU float32, z,y,x) on the given grid and its solid-nodule mask (hard negatives).

    Body ellipse with fat and muscle, two lungs (about -850 HU, a mild dependent gradient) shaped by a diaphragm
    dome, mediastinum with heart and aorta, branching vessels (bright tubes) and airways (dark lumen, soft-tissue
    wall), ribs and spine, 0-3 solid nodules; rendered at 4x finer z and averaged, so 5 mm slices carry real
    partial-volume effects (the diaphragm dome, vessels running through a slice), then blur and noise.
    """
    sup = 4
    nx = int(rng.integers(300, 400))
    ny = int(nx * rng.uniform(0.8, 0.95))
    nz = int(rng.integers(36, 60))
    sp = np.array([spacing_xyz[2] / sup, spacing_xyz[1], spacing_xyz[0]])
    shape = (nz * sup, ny, nx)
    ext = np.array(shape) * sp  # mm
    yc, xc = ext[1] / 2.0, ext[2] / 2.0
    vol = np.full(shape, -1000.0, np.float32)
    Z, Y, X = np.ogrid[: shape[0], : shape[1], : shape[2]]
    Zm, Ym, Xm = (Z + 0.5) * sp[0], (Y + 0.5) * sp[1], (X + 0.5) * sp[2]
    # body
    ax = xc * rng.uniform(0.78, 0.9)
    ay = yc * rng.uniform(0.62, 0.75)
    body_r = ((Xm - xc) / ax) ** 2 + ((Ym - yc) / ay) ** 2
    fat = rng.uniform(8, 20)
    body = np.broadcast_to(body_r <= 1.0, shape)
    vol[body] = -100.0 + rng.normal(0, 5)
    inner = ((Xm - xc) / (ax - fat)) ** 2 + ((Ym - yc) / (ay - fat)) ** 2 <= 1.0
    vol[np.broadcast_to(inner, shape)] = 45.0
    # lungs: per side, an ellipse whose size tapers to the apex (top, z high) and is cut by a diaphragm dome (bottom)
    lungs = np.zeros(shape, bool)
    wall = fat + rng.uniform(10, 18)
    z_apex = ext[0] * rng.uniform(1.0, 1.3)
    for side in (-1, 1):
        lx = (ax - wall) * rng.uniform(0.40, 0.47)
        ly = (ay - wall) * rng.uniform(0.80, 0.92)
        cx = xc + side * (ax - wall - lx) * rng.uniform(0.95, 1.0)
        cy = yc + rng.uniform(-0.05, 0.05) * ly
        taper = np.clip((z_apex - Zm) / (0.35 * ext[0]), 0.15, 1.0) ** 0.5
        inside = ((Xm - cx) / (lx * taper)) ** 2 + ((Ym - cy) / (ly * taper)) ** 2 <= 1.0
        dome_top = ext[0] * rng.uniform(0.15, 0.45)
        dome = dome_top - (((Xm - cx) / (lx * 1.3)) ** 2 + ((Ym - cy) / (ly * 1.3)) ** 2) * rng.uniform(25, 60)
        lungs |= inside & (Zm > dome)
    # mediastinum notch (heart) carved out of the lungs
    hx, hy = ax * rng.uniform(0.22, 0.3), ay * rng.uniform(0.3, 0.4)
    hcx, hcy = xc + rng.uniform(-0.05, 0.12) * ax, yc - ay * 0.15
    heart = (((Xm - hcx) / hx) ** 2 + ((Ym - hcy) / hy) ** 2 + ((Zm - ext[0] * 0.2) / (ext[0] * 0.55)) ** 2) <= 1.0
    lungs &= ~heart
    dep = (Ym - yc) / ay  # posterior is +y in LPS
    lung_val = LUNG_HU + rng.uniform(-40, 30) + rng.uniform(20, 70) * np.clip(dep, 0, 1)
    lung_val = lung_val + 12.0 * smooth_noise(shape, tuple(sp[::-1]), 4.0, rng)
    vol[lungs] = np.broadcast_to(lung_val, shape)[lungs]
    vol[heart & np.broadcast_to(inner, shape)] = 40.0
    # aorta and spine
    sp_cx, sp_cy = xc, yc + ay - fat - rng.uniform(22, 30)
    spine = ((Xm - sp_cx) / 18.0) ** 2 + ((Ym - sp_cy) / 15.0) ** 2
    vol[np.broadcast_to(spine <= 1.0, shape)] = 250.0
    vol[np.broadcast_to((spine <= 1.0) & (spine >= 0.7), shape)] = 700.0
    ao = ((Xm - (sp_cx + 20)) ** 2 + (Ym - (sp_cy - 28)) ** 2) <= 12.0**2
    vol[np.broadcast_to(ao, shape) & ~lungs] = 45.0
    # ribs: bright ovals on the chest wall every ~25 mm in z, shifting with z
    for zr in np.arange(rng.uniform(0, 20), ext[0], rng.uniform(18, 28)):
        for ang in np.linspace(0.2, 2 * np.pi - 0.2, int(rng.integers(10, 16)), endpoint=False):
            rx = xc + np.cos(ang) * (ax - fat * 0.5 - 6)
            ry = yc + np.sin(ang) * (ay - fat * 0.5 - 6)
            c = np.array([[zr + 6 * np.sin(ang), ry, rx]])
            _paint_balls(vol, sp, c, np.array([5.5]), 650.0)
            _paint_balls(vol, sp, c, np.array([3.5]), 250.0)
    lung_zyx = lungs

    def in_lung(p: np.ndarray) -> bool:
        i = np.floor(p / sp).astype(int)
        if np.any(i < 0) or np.any(i >= shape):
            return False
        return bool(lung_zyx[tuple(i)])

    # airways and vessels from each hilum
    hilum_z = ext[0] * rng.uniform(0.45, 0.75)
    for side in (-1, 1):
        h = np.array([hilum_z, hcy - 0.1 * ay, xc + side * ax * 0.22])
        for _k in range(int(rng.integers(2, 4))):  # airways: wall then lumen
            dirn = np.array([rng.uniform(-0.8, 0.5), rng.uniform(-0.6, 0.6), side * 1.0])
            pts = _tree(rng, h, dirn, float(rng.uniform(3.5, 5.0)), 1.2, in_lung, max_depth=4)
            if pts:
                c = np.array([p for p, _ in pts])
                r = np.array([q for _, q in pts])
                _paint_balls(vol, sp, c, r + 1.0, 20.0, where=lung_zyx)
                _paint_balls(vol, sp, c, r, -1000.0, where=lung_zyx)
        for _k in range(int(rng.integers(8, 14))):  # vessels
            dirn = np.array([rng.uniform(-1, 1), rng.uniform(-1, 1), side * rng.uniform(0.3, 1.2)])
            pts = _tree(rng, h, dirn, float(rng.uniform(3.0, 5.0)), 0.6, in_lung, max_depth=7)
            if pts:
                c = np.array([p for p, _ in pts])
                r = np.array([q for _, q in pts])
                _paint_balls(vol, sp, c, r, float(rng.uniform(20, 60)), where=lung_zyx)
    # solid nodules (label 0): soft-tissue balls, some touching the pleura
    nod = np.zeros(shape, bool)
    cand = np.argwhere(lung_zyx[:: sup * 2, ::8, ::8]) * np.array([sup * 2, 8, 8])
    for _k in range(int(rng.integers(0, 4))):
        if len(cand) == 0:
            break
        c = (cand[rng.integers(len(cand))] + 0.5) * sp
        r = float(rng.uniform(3, 15))
        tmp = np.zeros(shape, bool)
        _paint_balls(tmp, sp, c[None], np.array([r]), 1.0)
        tmp &= np.broadcast_to(body, shape)
        vol[tmp] = float(rng.uniform(0, 60))
        nod |= tmp
    # down to 5 mm slices (partial volume), in-plane blur, correlated noise
    vol = vol.reshape(nz, sup, ny, nx).mean(axis=1)
    nod = nod.reshape(nz, sup, ny, nx).mean(axis=1) >= 0.5
    vol = blur_xy(vol)
    sigma = float(rng.uniform(10, 35))
    noise = blur_xy(rng.standard_normal(vol.shape).astype(np.float32)) * (sigma / 0.6)
    vol = np.clip(vol + noise, -1024, 3071).astype(np.float32)
    return vol, nod
