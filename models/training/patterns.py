"""Simulated CT patterns of COVID-19 pneumonia on a real chest CT: named, seeded generators (numpy + SimpleITK).

The RSNA/Fleischner "typical appearance" and its course, each pattern a generator of a lesion *field* that
``render`` then draws into the CT:

- ``peripheral``: subpleural patches, wedge- or band-shaped against the pleura;
- ``multifocal``: several rounded GGOs in both lungs;
- ``diffuse``: confluent GGO filling large parts of a lung, dependent (posterior) and lower-zone predominant,
  sometimes with subpleural sparing, from a few per cent to over half a lung;
- ``crazy_paving``: GGO with thickened interlobular septa (a polygonal network of 1-2 mm lines, lobules of 8-20 mm)
  and finer intralobular lines;
- ``consolidation``: GGO around a consolidated core (the halo of a mixed lesion) or the reverse (a GGO centre
  in a ring of consolidation: the reverse halo / atoll sign).

How a pattern is drawn, and why (``render``):
- GGO is partial filling of the air spaces, so the added density is a fraction ``f`` of each voxel's air content:
  ``hu + f * max(-smooth(hu), 0)``. Parenchyma at -850 HU reaches the lesion's target (-750..-350 HU); a vessel
  (about 0 HU) is unchanged, so vessels stay visible through the haze, as on real scans.
- Everything added is smooth, then blurred with the background's own in-plane point-spread function
  (``Scanner.psf_mm``, measured from the noise's autocorrelation), and added to the original voxels, so the
  lesion keeps the background's own quantum noise and kernel: a sharp-kernel scan gets sharp-edged, noisy
  lesions, a soft-kernel one soft ones. Nothing is pasted; a network cannot find the insertion by its texture.
- A consolidated core replaces the smooth image (vessels obscured) with soft-tissue density while keeping the
  background's noise residual: ``core_hu + (hu - smooth(hu))``.
- Labels: 1 = ground glass, crazy-paving areas included (septa and all); a consolidated core (denser than about
  -300 HU, vessels obscured) is 0 and its ground-glass rim 1. Only lung fields, never airway lumen, never a solid
  nodule (``exclude``, with a 3 mm margin).

Train/evaluation split of the generator settings (``Draw``): every continuous parameter's range is cut into six
bands; training draws only from bands 0, 2, 4 and evaluation only from 1, 3, 5, and the seeds differ, so held-out
lesions come from settings training never drew: the score measures the patterns, not the simulator's habits.

Arrays are (z, y, x) as SimpleITK returns them; spacings are (x, y, z) mm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import simulate

PATTERNS = ("peripheral", "multifocal", "diffuse", "crazy_paving", "consolidation")
SPLITS = ("train", "eval")
_BANDS = 6
SHARP_WIDTH = 0.01  # a ramp this narrow (in the level function's units, about 1 % of the radius) is a step


# ----------------------------------------------------------------------------------------------- draws
class Draw:
    """Random draws for one generator call, restricted to the split's bands of each range (module docstring)."""

    def __init__(self, rng: np.random.Generator, split: str, sharp: float = 0.0) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.rng = rng
        self._bands = (0, 2, 4) if split == "train" else (1, 3, 5)
        self.sharp = sharp if split == "train" else 0.0

    def margin(self, width: float) -> float:
        """A lesion's ramp width: ``width``, or with probability ``sharp`` (training only) a step (``SHARP_WIDTH``).

        Why: every ramp drawn otherwise is 2-6 mm wide, and a network trained on them alone measured a hard-edged
        ball 5-8 % small (it left out the edge's partial-volume voxel, which the label holds). At 0 no random
        number is drawn, and the evaluation split never draws one, so its lesions are as they were."""
        if self.sharp > 0 and self.rng.random() < self.sharp:
            return SHARP_WIDTH
        return width

    def uniform(self, lo: float, hi: float) -> float:
        band = self._bands[int(self.rng.integers(len(self._bands)))]
        return lo + (band + float(self.rng.random())) * (hi - lo) / _BANDS

    def log_uniform(self, lo: float, hi: float) -> float:
        return float(np.exp(self.uniform(np.log(lo), np.log(hi))))

    def integer(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi] (inclusive), from the split's bands of that range."""
        return min(hi, int(np.floor(self.uniform(lo, hi + 1))))

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)


# ----------------------------------------------------------------------------------------------- the background
@dataclass(frozen=True)
class Scanner:
    """The background's own noise and in-plane sharpness, measured in the lung parenchyma."""

    noise_hu: float
    psf_mm: float


@dataclass
class Context:
    """Everything about one background that every generator needs, computed once per volume."""

    hu: np.ndarray  # float32 (z, y, x)
    spacing_xyz: tuple[float, float, float]
    lung: np.ndarray  # bool lung fields
    allowed: np.ndarray  # lung, minus airway lumen and excluded (solid) masks
    centres: np.ndarray  # parenchyma where a lesion may be centred (N, 3) indices
    dist: np.ndarray  # float32 mm to the pleura (0 outside)
    smooth: np.ndarray  # float32 HU, noise removed (1 mm), vessels kept
    level: np.ndarray  # float32 HU, the local parenchymal level (vessels left out, 10 mm)
    posterior: np.ndarray  # float32 0 (anterior) .. 1 (posterior) within each lung
    inferior: np.ndarray  # float32 0 (apex) .. 1 (base) within the lungs
    side: np.ndarray  # int8: 0 outside, 1 right lung, 2 left lung (patient sides, LPS)
    scanner: Scanner

    @property
    def sp_zyx(self) -> np.ndarray:
        return np.array([self.spacing_xyz[2], self.spacing_xyz[1], self.spacing_xyz[0]], dtype=np.float64)


def measure_scanner(hu: np.ndarray, parenchyma: np.ndarray, spacing_xyz: tuple[float, float, float]) -> Scanner:
    """Noise (robust std of the high-pass residual) and the in-plane PSF from the residual's lag-1 correlation.

    For white noise blurred by a Gaussian of s pixels, neighbouring pixels correlate by exp(-1 / (4 s^2)): the
    kernel's sharpness is read off the noise it shaped.
    """
    res = hu - simulate.smooth_mm(hu, spacing_xyz, 1.5)
    inner = parenchyma.copy()
    inner[:, :, -1] = False
    a, b = res[inner], res[:, :, 1:][inner[:, :, :-1]]
    med = np.median(a)
    noise = float(1.4826 * np.median(np.abs(a - med)))
    rho = float(np.corrcoef(a, b)[0, 1]) if a.size > 100 else 0.3
    s_px = np.sqrt(-1.0 / (4.0 * np.log(rho))) if 0.01 < rho < 0.99 else 0.5
    return Scanner(noise_hu=noise, psf_mm=float(np.clip(s_px, 0.3, 1.5) * spacing_xyz[0]))


def _axis_sign(direction: tuple[float, ...], axis: int) -> float:
    """+1 when the array index along ``axis`` (0 z, 1 y, 2 x) runs along + of that LPS axis."""
    c = 2 - axis  # array axes are (z, y, x); the direction matrix's columns are the index axes (x, y, z)
    return 1.0 if float(np.asarray(direction, dtype=float).reshape(3, 3)[c, c]) >= 0 else -1.0


def context(
    hu: np.ndarray,
    spacing_xyz: tuple[float, float, float],
    direction: tuple[float, ...] = (1, 0, 0, 0, 1, 0, 0, 0, 1),
    exclude: np.ndarray | None = None,
    lung: np.ndarray | None = None,
) -> Context:
    """Precompute a background (``hu`` float (z,y,x)); ``exclude``: solid nodules that stay label 0, untouched."""
    hu = hu.astype(np.float32)
    sp = tuple(float(v) for v in spacing_xyz)
    if lung is None:
        lung = simulate.lung_mask(hu, sp)
    excl = np.zeros(hu.shape, bool)
    if exclude is not None and exclude.any():
        excl = simulate.dilate_mm(exclude, sp, 3.0)
    sm15 = simulate.smooth_mm(hu, sp, 1.5)
    airway = (sm15 < -950) & lung
    allowed = lung & ~airway & ~excl
    dist = simulate.inside_distance_mm(lung, sp)
    parenchyma = allowed & (sm15 < -650)
    centres = np.argwhere(parenchyma & (dist >= 2.0) & ~simulate.dilate_mm(excl, sp, 5.0))
    m = parenchyma.astype(np.float32)
    num = simulate.smooth_mm(np.where(parenchyma, hu, 0.0).astype(np.float32), sp, 10.0)
    den = simulate.smooth_mm(m, sp, 10.0)
    level = np.where(den > 1e-3, num / np.maximum(den, 1e-3), -850.0).astype(np.float32)
    level = np.clip(level, -950.0, -650.0)
    # patient sides and zones, from the lung mask itself (LPS: +x left, +y posterior, +z superior)
    posterior = np.zeros(hu.shape, np.float32)
    inferior = np.zeros(hu.shape, np.float32)
    side = np.zeros(hu.shape, np.int8)
    if lung.any():
        xs = np.flatnonzero(lung.any(axis=(0, 1)))
        mid = 0.5 * (xs[0] + xs[-1])
        xx = np.arange(hu.shape[2])
        left_is_high = _axis_sign(direction, 2) > 0
        left = (xx > mid) if left_is_high else (xx < mid)
        side[lung & left[None, None, :]] = 2
        side[lung & ~left[None, None, :]] = 1
        zs = np.flatnonzero(lung.any(axis=(1, 2)))
        z = (np.arange(hu.shape[0]) - zs[0]) / max(1, zs[-1] - zs[0])
        if _axis_sign(direction, 0) > 0:  # index up = superior: the base is low index
            z = 1.0 - z
        inferior[:] = np.clip(z, 0, 1)[:, None, None].astype(np.float32)
        for s in (1, 2):
            ys = np.flatnonzero((side == s).any(axis=(0, 2)))
            if len(ys) == 0:
                continue
            y = (np.arange(hu.shape[1]) - ys[0]) / max(1, ys[-1] - ys[0])
            if _axis_sign(direction, 1) < 0:
                y = 1.0 - y
            posterior[side == s] = np.broadcast_to(np.clip(y, 0, 1)[None, :, None], hu.shape)[side == s]
    return Context(
        hu=hu,
        spacing_xyz=sp,  # type: ignore[arg-type]
        lung=lung,
        allowed=allowed,
        centres=centres,
        dist=dist,
        smooth=simulate.smooth_mm(hu, sp, 1.0),
        level=level,
        posterior=posterior,
        inferior=inferior,
        side=side,
        scanner=measure_scanner(hu, parenchyma & (dist > 3.0), sp),
    )


# ----------------------------------------------------------------------------------------------- lesion fields
@dataclass
class Field:
    """What a generator asks ``render`` to draw, full-volume (z, y, x): ground-glass occupancy ``w`` (0..1, label
    where >= 0.5), its target HU, consolidation occupancy ``core`` and HU, and septal-line density ``septa``
    (0..1, in HU by ``septa_hu``)."""

    w: np.ndarray
    target: np.ndarray
    core: np.ndarray
    core_hu: np.ndarray
    septa: np.ndarray
    regions: list[str] = field(default_factory=list)

    @classmethod
    def empty(cls, shape: tuple[int, ...]) -> Field:
        z = np.zeros(shape, np.float32)
        return cls(z, np.full(shape, -600.0, np.float32), z.copy(), np.zeros(shape, np.float32), z.copy())

    def merge(self, other: Field) -> None:
        take = other.w > self.w
        self.target[take] = other.target[take]
        np.maximum(self.w, other.w, out=self.w)
        take = other.core > self.core
        self.core_hu[take] = other.core_hu[take]
        np.maximum(self.core, other.core, out=self.core)
        np.maximum(self.septa, other.septa, out=self.septa)
        self.regions += other.regions


def _ramp(f: np.ndarray, width: float) -> np.ndarray:
    """Occupancy 0..1 from a level function (> 0 inside): 0.5 exactly on the border, ``width`` wide."""
    return np.clip(0.5 + f / width, 0.0, 1.0).astype(np.float32)


def _box(ctx: Context, centre: np.ndarray, half_mm: float) -> tuple[tuple[slice, ...], list[np.ndarray]]:
    half = np.ceil(half_mm / ctx.sp_zyx).astype(int)
    lo = np.maximum(centre - half, 0)
    hi = np.minimum(centre + half + 1, ctx.hu.shape)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    grids = np.meshgrid(*[(np.arange(lo[k], hi[k]) - centre[k]) * ctx.sp_zyx[k] for k in range(3)], indexing="ij")
    return sl, grids


def _blob(ctx: Context, d: Draw, centre: np.ndarray, radius: float, elong: float, rough: float) -> tuple:
    """Level function of a perturbed ellipsoid around ``centre`` (mm offsets), in its box: (slices, f)."""
    sl, grids = _box(ctx, centre, 1.6 * radius + 6.0)
    shape = grids[0].shape
    pts = np.stack([g.ravel() for g in grids], axis=0)
    rot = simulate._random_rotation(d.rng)
    axes = np.array([d.uniform(1.0 / elong, elong) for _ in range(3)]) * radius
    q = (rot @ pts) / axes[:, None]
    dist = np.sqrt((q**2).sum(axis=0)).reshape(shape)
    noise = simulate.smooth_noise(shape, ctx.spacing_xyz, max(1.5, 0.3 * radius), d.rng) if min(shape) > 1 else 0.0
    return sl, (1.0 - dist + rough * noise).astype(np.float32)


def _texture(ctx: Context, d: Draw, shape: tuple[int, ...], target: float) -> np.ndarray:
    """The lesion's own heterogeneity: smooth (2-4 mm) variation of the target, 20-60 HU."""
    tex = simulate.smooth_noise(shape, ctx.spacing_xyz, d.uniform(2.0, 4.0), d.rng) if min(shape) > 1 else 0.0
    return (target + d.uniform(20.0, 60.0) * tex).astype(np.float32)


def _pick(ctx: Context, d: Draw, where: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray | None:
    c = ctx.centres
    if where is not None and len(c):
        c = c[where(c)]
    if len(c) == 0:
        return None
    return c[int(d.rng.integers(len(c)))]


def _local(ctx: Context, d: Draw, out: Field, sl: tuple[slice, ...], w: np.ndarray, target: float) -> None:
    take = w > out.w[sl]
    out.target[sl][take] = _texture(ctx, d, w.shape, target)[take]
    np.maximum(out.w[sl], w, out=out.w[sl])


def _ggo_target(d: Draw) -> float:
    """Centred near the -590..-630 HU medians measured on real COVID-19 scans (p10-p90 about -720..-405)."""
    return d.uniform(-730.0, -420.0)


def peripheral(ctx: Context, d: Draw, scale: float = 1.0) -> Field:
    """Subpleural patches: blobs anchored on the pleura, cut to a subpleural band 8-25 mm deep."""
    out = Field.empty(ctx.hu.shape)
    for _ in range(max(1, round(d.integer(1, 6) * scale))):
        c = _pick(ctx, d, lambda c: ctx.dist[tuple(c.T)] <= 6.0)
        if c is None:
            break
        radius = d.uniform(10.0, 40.0)
        sl, f = _blob(ctx, d, c, radius, 1.4, 0.35)
        depth = d.uniform(8.0, 25.0)
        f = np.minimum(f, (depth - ctx.dist[sl]) / depth)
        _local(ctx, d, out, sl, _ramp(f, d.margin(d.uniform(0.08, 0.3))), _ggo_target(d))
        out.regions.append("peripheral")
    return out


def multifocal(ctx: Context, d: Draw, scale: float = 1.0) -> Field:
    """Several rounded GGOs (10-40 mm, a few smaller), half of them subpleural, in both lungs."""
    out = Field.empty(ctx.hu.shape)
    for _ in range(max(2, round(d.integer(3, 12) * scale))):
        sub = d.chance(0.5)
        c = _pick(ctx, d, (lambda c: ctx.dist[tuple(c.T)] <= 15.0) if sub else None)
        if c is None:
            break
        radius = d.log_uniform(3.0, 20.0)
        sl, f = _blob(ctx, d, c, radius, 1.2, 0.15)
        _local(ctx, d, out, sl, _ramp(f, d.margin(max(0.08, 2.0 / radius))), _ggo_target(d))
        out.regions.append("multifocal")
    return out


def _diffuse_level(ctx: Context, d: Draw, fraction: float) -> np.ndarray:
    """A level function over the lungs whose positive part covers ``fraction`` of the chosen lung(s), weighted to
    posterior and lower zones, with smooth irregular borders (a 12-25 mm noise field)."""
    noise = simulate.smooth_noise(ctx.hu.shape, ctx.spacing_xyz, d.uniform(12.0, 25.0), d.rng)
    g = d.uniform(0.6, 1.6) * ctx.posterior + d.uniform(0.3, 1.2) * ctx.inferior + d.uniform(0.3, 0.8) * noise
    sides = (1, 2) if d.chance(0.8) else ((1,) if d.chance(0.5) else (2,))
    chosen = ctx.allowed & np.isin(ctx.side, sides)
    if not chosen.any():
        return np.full(ctx.hu.shape, -1.0, np.float32)
    thr = float(np.quantile(g[chosen], 1.0 - fraction))
    f = np.where(chosen, g - thr, -1.0)
    return f.astype(np.float32)


def diffuse(ctx: Context, d: Draw, scale: float = 1.0) -> Field:
    """Confluent GGO over 8-60 % of the lung(s), dependent and lower-zone predominant; 35 % with subpleural
    sparing (2-6 mm)."""
    out = Field.empty(ctx.hu.shape)
    f = _diffuse_level(ctx, d, min(0.7, d.uniform(0.08, 0.6) * scale))
    if d.chance(0.35):
        f = np.minimum(f, (ctx.dist - d.uniform(2.0, 6.0)) / 10.0)
    out.w = _ramp(f, d.uniform(0.02, 0.08))
    out.target = _texture(ctx, d, ctx.hu.shape, _ggo_target(d))
    out.regions.append("diffuse")
    return out


def _septal_lines(ctx: Context, d: Draw, idx: np.ndarray, cell_mm: float, thick_mm: float) -> np.ndarray:
    """Line density (0..1) at the voxels ``idx`` (N, 3) of a polygonal network: the borders of the Voronoi cells of
    seeds jittered on a ``cell_mm`` lattice, ``thick_mm`` thick, averaged over three depths of each slice (its
    partial volume). Only the given voxels are computed: a dense grid over a whole lung would take minutes."""
    lo = idx.min(0)
    n = np.ceil((idx.max(0) - lo + 1) * ctx.sp_zyx / cell_mm).astype(int) + 3
    jitter = d.rng.uniform(0.1, 0.9, size=(*n, 3))
    seeds = (np.stack(np.meshgrid(*[np.arange(k) - 1.0 for k in n], indexing="ij"), -1) + jitter) * cell_mm
    acc = np.zeros(len(idx), np.float32)
    base = ((idx - lo) + 0.5) * ctx.sp_zyx
    for dz in (-1 / 3, 0.0, 1 / 3):
        p = base + np.array([dz * ctx.sp_zyx[0], 0.0, 0.0])
        cell = np.floor(p / cell_mm).astype(int) + 1
        d1 = np.full(len(p), np.inf, np.float32)
        d2 = np.full(len(p), np.inf, np.float32)
        for off in np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3):
            c = np.clip(cell + off, 0, n - 1)
            dd = np.sqrt(((p - seeds[c[:, 0], c[:, 1], c[:, 2]]) ** 2).sum(-1)).astype(np.float32)
            d2 = np.where(dd < d1, d1, np.minimum(d2, dd))
            d1 = np.minimum(d1, dd)
        acc += np.clip(1.0 - (d2 - d1) / thick_mm, 0.0, 1.0) / 3.0
    return acc


def crazy_paving(ctx: Context, d: Draw, scale: float = 1.0) -> Field:
    """GGO (a diffuse region or subpleural patches) with interlobular septa (lobules 8-20 mm, lines 1-2 mm) and
    finer intralobular lines; the whole area is label 1."""
    out = diffuse(ctx, d, 0.5 * scale) if d.chance(0.5) else peripheral(ctx, d, scale)
    out.regions = ["crazy_paving"] * len(out.regions)
    inside = out.w > 0
    if not inside.any():
        return out
    idx = np.argwhere(inside)
    cell = d.uniform(8.0, 20.0)
    lines = _septal_lines(ctx, d, idx, cell, d.uniform(1.0, 2.0))
    fine = _septal_lines(ctx, d, idx, cell / 3.0, d.uniform(0.6, 1.0))
    out.septa[inside] = np.maximum(lines, d.uniform(0.3, 0.5) * fine) * out.w[inside]
    out.target = np.minimum(out.target, -450.0)  # the lines carry the density; the haze itself stays faint
    return out


def consolidation(ctx: Context, d: Draw, scale: float = 1.0) -> Field:
    """Mixed lesions (20-50 mm): a consolidated core in a ground-glass halo, or (reverse halo) a ground-glass
    centre in a ring of consolidation. The core (-150..+40 HU, vessels obscured) is label 0."""
    out = Field.empty(ctx.hu.shape)
    for _ in range(max(1, round(d.integer(1, 4) * scale))):
        c = _pick(ctx, d, lambda c: ctx.dist[tuple(c.T)] <= 20.0)
        if c is None:
            break
        radius = d.uniform(10.0, 25.0)
        sl, f = _blob(ctx, d, c, radius, 1.3, 0.2)
        width = max(0.08, 2.0 / radius)
        w = _ramp(f, width)
        if d.chance(0.7):  # halo: the inner part consolidated
            core = _ramp(f - d.uniform(0.3, 0.6), width)
        else:  # reverse halo: a ring of consolidation 3-8 mm wide at the border
            ring = d.uniform(3.0, 8.0) / radius
            core = np.minimum(w, _ramp(ring - f, width))
        core *= ctx.allowed[sl]
        _local(ctx, d, out, sl, w, _ggo_target(d))
        take = core > out.core[sl]
        out.core_hu[sl][take] = d.uniform(-150.0, 40.0)
        np.maximum(out.core[sl], core, out=out.core[sl])
        out.regions.append("consolidation")
    return out


GENERATORS: dict[str, Callable[[Context, Draw, float], Field]] = {
    "peripheral": peripheral,
    "multifocal": multifocal,
    "diffuse": diffuse,
    "crazy_paving": crazy_paving,
    "consolidation": consolidation,
}


# ----------------------------------------------------------------------------------------------- rendering
@dataclass(frozen=True)
class Insertion:
    hu: np.ndarray  # float32 (z, y, x)
    label: np.ndarray  # uint8, 1 = ground glass
    core: np.ndarray  # bool, consolidated (label 0)
    patterns: tuple[str, ...]


def render(ctx: Context, fld: Field, septa_hu: float = 300.0) -> Insertion:
    """Draw ``fld`` into the background (module docstring: air-fraction GGO, background's PSF and noise)."""
    w = fld.w * ctx.allowed
    air = np.maximum(-ctx.smooth, 0.0)  # HU below water: the air a voxel holds, x 1000
    f = np.clip((fld.target - ctx.level) / np.maximum(-ctx.level, 1.0), 0.02, 0.9)
    delta = w * f * air
    delta += fld.septa * ctx.allowed * septa_hu * np.clip(air / 850.0, 0.0, 1.0)
    core = fld.core * ctx.allowed
    base = ctx.smooth + delta
    delta += core * (fld.core_hu - base)  # replaces the smooth image; the noise residual stays
    psf = ctx.scanner.psf_mm
    if psf > 0:
        v = (psf / ctx.spacing_xyz[0]) ** 2, (psf / ctx.spacing_xyz[1]) ** 2
        img = sitk.GetImageFromArray(delta.astype(np.float32))
        delta = sitk.GetArrayFromImage(sitk.DiscreteGaussian(img, [v[0], v[1], 0.0], 16, 0.01, False))
    hu = (ctx.hu + delta).astype(np.float32)
    core_mask = core >= 0.5
    label = (w >= 0.5) & ctx.allowed & ~core_mask
    return Insertion(hu, label.astype(np.uint8), core_mask, tuple(dict.fromkeys(fld.regions)))


def insert(
    ctx: Context,
    patterns: tuple[str, ...],
    rng: np.random.Generator,
    split: str = "train",
    scale: float = 1.0,
    sharp: float = 0.0,
) -> Insertion:
    """One volume with the named patterns (one or several, merged) drawn from the split's settings; ``sharp``: the
    share of peripheral and multifocal lesions drawn with a step for a margin (``Draw.margin``, training only)."""
    d = Draw(rng, split, sharp)
    fld = Field.empty(ctx.hu.shape)
    for name in patterns:
        fld.merge(GENERATORS[name](ctx, d, scale))
    return render(ctx, fld)
