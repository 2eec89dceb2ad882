"""Train the reference GGO SegResNet from scratch, export it to ONNX and evaluate it on held-out backgrounds.

    .venv/bin/python models/training/train.py --seed 0 --out models/training/runs/seed0 [--recipe v1|v2] [--install]

Steps: (0) recipe v2 (the default, issue 17) first runs recipe v1 from scratch into OUT/base (``--base-recipe``)
and starts from that network; (1) build (or load from models/training/.cache/) a pool of training volumes on the
model grid. Recipe v2: the five ``backgrounds.TRAIN`` each as they are and with simulated COVID-19 patterns
(``patterns.py``, training settings, 30 % of peripheral and multifocal lesions with a sharp margin), plus phantoms
with patterns. Recipe v1 (the shipped model's): lung1 with
ellipsoid GGOs under several seeds, one lesion-free copy, and phantoms. (2) train on random patches
(lesion-centred, hard-negative-centred and uniform) with AdamW and Dice + cross-entropy, a fixed number of
iterations, 2 threads, fixed seeds: phase 1 with BatchNorm on each batch's statistics, phase 2 (hard-negative
emphasis) with BatchNorm frozen to its running statistics, so the network is tuned on exactly the normalisation
inference uses (v2 runs phase 2 only, on its base's weights); (3) export ``model.onnx`` (NV_MODEL_INPUT /
NV_MODEL_OUTPUT, N,C,X,Y,Z, dynamic axes); (4) evaluate on backgrounds training never sees, writing
``metrics.json``: v2 with ``evaluate_patterns.py`` (lung2 and lidc_idri_0295, per pattern, with pictures), v1 with
``evaluate.py`` (lung2, issue 4's protocol).
``--install`` copies the ONNX file into the Triton model repository
(models/segmentation_ct_covid_lesion_v1/1/model.onnx).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))

import backgrounds
import common
import patterns
import simulate

POOL_VERSION = 2
N_REAL_V1 = 16  # recipe v1's lung1 copies with inserted GGO (its pool, also v2's rehearsal pool)
PHASE1_P_FG, PHASE1_P_HARD = 0.5, 0.2  # phase 1's shares of lesion- and hard-negative-centred patches
CACHE = Path(__file__).resolve().parent / ".cache"
# What each recipe sets where an option is not given. v1 is the shipped model's (trained on a CPU with bfloat16,
# whose float32 layout was "contiguous"). v2 (issue 17) first trains v1 from scratch (its base), then fine-tunes
# that network on the five training backgrounds with the COVID-19 patterns: v1's phase 2 again, on v2's pool.
# "v2-scratch" is the earlier v2, which trained on v2's pool from random weights (the model card's second to
# fourth tries); it is kept so that those runs can be repeated.
RECIPES: dict[str, dict[str, object]] = {
    "v1": {
        "base_recipe": "none",
        "iters": 8000,
        "finetune_iters": 2000,
        "phase1_precision": "fp32",
        "memory_format": "contiguous",
        "lesion_sampling": "voxel",
        "n_phantoms": 22,
        "finetune_p_fg": 0.4,
        "finetune_p_hard": 0.35,
        "finetune_p_clean": 0.0,
        "finetune_p_rehearse": 0.0,
        "sharp_margins": 0.0,
        "calibrate_fp_ml": 0.0,
        "consolidation_rule": True,
    },
    "v2": {
        "base_recipe": "v1",
        "iters": 0,
        "finetune_iters": 2000,
        "phase1_precision": "fp32",
        "memory_format": "channels_last",
        "lesion_sampling": "both",
        "n_phantoms": 6,
        "finetune_p_fg": 0.4,
        "finetune_p_hard": 0.35,
        "finetune_p_clean": 0.3,
        "finetune_p_rehearse": 0.0,
        "sharp_margins": 0.3,
        "calibrate_fp_ml": 5.0,
        "consolidation_rule": True,
    },
    "v2-scratch": {
        "base_recipe": "none",
        "iters": 4000,
        "finetune_iters": 1200,
        "phase1_precision": "fp32",
        "memory_format": "channels_last",
        "lesion_sampling": "both",
        "n_phantoms": 6,
        "finetune_p_fg": 0.3,
        "finetune_p_hard": 0.55,
        "finetune_p_clean": 0.3,
        "finetune_p_rehearse": 0.0,
        "sharp_margins": 0.0,
        "calibrate_fp_ml": 5.0,
        "consolidation_rule": True,
    },
}


# ----------------------------------------------------------------------------------------------- the pool
def _item(hu: np.ndarray, label: np.ndarray, hard: np.ndarray, spec, rng: np.random.Generator) -> dict:
    fg = np.argwhere(label > 0)
    hn = np.argwhere(hard & (label == 0))
    if len(fg) > 40000:
        fg = fg[rng.choice(len(fg), 40000, replace=False)]
    if len(hn) > 40000:
        hn = hn[rng.choice(len(hn), 40000, replace=False)]
    return {
        "image": common.normalise(hu, spec).astype(np.float16),
        "label": label.astype(np.uint8),
        "fg": fg.astype(np.int32),
        "hard": hn.astype(np.int32),
    }


def _hard_negatives(hu: np.ndarray, lung: np.ndarray, solid: np.ndarray, sp) -> np.ndarray:
    """Where false positives are likely: dense structures in or at the lungs (vessels, nodules, diaphragm)."""
    near = simulate.dilate_mm(lung, sp, 6.0)
    return (near & (hu > -600) & simulate.dilate_mm(lung, sp, 2.0)) | solid


def _cached_pool(cache: Path, count: int, build, log) -> list[dict]:  # type: ignore[no-untyped-def]
    """The pool cached in ``cache`` when it holds ``count`` volumes, else ``build()``'s, written there first."""
    files = sorted(cache.glob("*.npz")) if cache.is_dir() else []
    if len(files) == count:
        log(f"pool: loading {len(files)} volumes from {cache}")
        return [dict(np.load(f)) for f in files]
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pool = build()
    for i, it in enumerate(pool):
        np.savez(cache / f"{i:03d}.npz", **it)
    log(f"pool: built {len(pool)} volumes in {time.time() - t0:.0f} s -> {cache}")
    return pool  # type: ignore[no-any-return]


def build_pool(seed: int, n_per_background: int, n_phantoms: int, log, sharp: float = 0.0) -> tuple[list[dict], int]:  # type: ignore[no-untyped-def]
    """The training pool on the model grid: for each of ``backgrounds.TRAIN`` one lesion-free copy and
    ``n_per_background`` copies with simulated COVID-19 patterns (``patterns``, training settings), then procedural
    phantoms with patterns too. Returns (pool, count of real items - 1): the real items come first, for
    ``sample_batch``'s ``p_real``. The held-out backgrounds (``backgrounds.HELDOUT``) are never loaded."""
    spec = common.spec()
    sp = tuple(float(v) for v in spec.pre.spacing_mm)
    n_real_items = len(backgrounds.TRAIN) * (n_per_background + 1)
    cache = CACHE / f"pool_v{POOL_VERSION}_seed{seed}_b{n_per_background}_p{n_phantoms}"
    if sharp > 0:
        cache = cache.with_name(f"{cache.name}_sharp{sharp:g}")
    build = lambda: _pool_v2(seed, n_per_background, n_phantoms, spec, sp, log, sharp)  # noqa: E731
    return _cached_pool(cache, n_real_items + n_phantoms, build, log), n_real_items - 1


def _pool_v2(seed: int, n_per_background: int, n_phantoms: int, spec, sp, log, sharp: float) -> list[dict]:  # type: ignore[no-untyped-def]
    t0 = time.time()
    rng = np.random.default_rng([seed, 1])
    pool: list[dict] = []
    k = 0
    for name in backgrounds.TRAIN:
        bg = backgrounds.load(name)
        img_m = common.to_model_grid(bg.image, spec)
        solid = common.with_array(bg.solid.astype(np.float32), bg.image)
        solid_m = sitk.GetArrayFromImage(common.to_model_grid(solid, spec, True)) > 0.5
        hu = sitk.GetArrayFromImage(img_m)
        ctx = patterns.context(hu, sp, img_m.GetDirection(), exclude=solid_m)
        hard = _hard_negatives(hu, ctx.lung, solid_m, sp)
        pool.append(_item(hu, np.zeros(hu.shape, np.uint8), hard, spec, rng))  # lesion-free copy
        for _ in range(n_per_background):
            chosen = _patterns_for(k, rng)
            k += 1
            ins = patterns.insert(ctx, chosen, rng, "train", float(rng.uniform(0.5, 1.5)), sharp)
            pool.append(_item(ins.hu, ins.label, hard | ins.core, spec, rng))
        log(f"pool: {name} done ({len(pool)} volumes, {time.time() - t0:.0f} s)")
    for _ in range(n_phantoms):
        vol, nod = simulate.make_phantom(rng, sp)
        ctx = patterns.context(vol, sp, exclude=nod)
        ins = patterns.insert(ctx, _patterns_for(k, rng), rng, "train", float(rng.uniform(0.5, 1.5)), sharp)
        k += 1
        pool.append(_item(ins.hu, ins.label, _hard_negatives(vol, ctx.lung, nod, sp) | ins.core, spec, rng))
    return pool


def _patterns_for(k: int, rng: np.random.Generator) -> tuple[str, ...]:
    """Every pattern in turn, so each is drawn as often; 40 % of volumes get a second one (mixed disease)."""
    first = patterns.PATTERNS[k % len(patterns.PATTERNS)]
    if rng.random() < 0.4:
        second = patterns.PATTERNS[int(rng.integers(len(patterns.PATTERNS)))]
        return tuple(dict.fromkeys((first, second)))
    return (first,)


def build_pool_v1(seed: int, n_real: int, n_phantoms: int, log) -> list[dict]:  # type: ignore[no-untyped-def]
    """Model v1's pool (the shipped model's): lung1 with ellipsoid GGOs (``simulate.insert_ggo``), a lesion-free
    copy, and phantoms; reproduces the committed model with ``--recipe v1``."""
    spec = common.spec()
    sp = tuple(float(v) for v in spec.pre.spacing_mm)
    cache = CACHE / f"pool_v1_seed{seed}_r{n_real}_p{n_phantoms}"
    return _cached_pool(cache, n_real + 1 + n_phantoms, lambda: _pool_v1(seed, n_real, n_phantoms, spec, sp), log)


def _pool_v1(seed: int, n_real: int, n_phantoms: int, spec, sp) -> list[dict]:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng([seed, 1])
    pool: list[dict] = []
    img, solid = common.load_real(common.TRAIN_BACKGROUND)
    img_m = common.to_model_grid(img, spec)
    solid_m = sitk.GetArrayFromImage(common.to_model_grid(common.with_array(solid.astype(np.float32), img), spec, True))
    solid_m = solid_m > 0.5
    hu = sitk.GetArrayFromImage(img_m)
    lung = simulate.lung_mask(hu, sp)
    hard = _hard_negatives(hu, lung, solid_m, sp)
    pool.append(_item(hu, np.zeros(hu.shape, np.uint8), hard, spec, rng))  # lesion-free copy
    for _ in range(n_real):
        hu2, lab, _les = simulate.insert_ggo(hu, sp, rng, int(rng.integers(3, 13)), exclude=solid_m, lung=lung)
        pool.append(_item(hu2, lab, hard, spec, rng))
    for k in range(n_phantoms):
        vol, nod = simulate.make_phantom(rng, sp)
        plung = simulate.lung_mask(vol, sp)
        n = 0 if k % 8 == 7 else int(rng.integers(2, 11))
        hu2, lab, _les = simulate.insert_ggo(vol, sp, rng, n, exclude=nod, lung=plung)
        pool.append(_item(hu2, lab, _hard_negatives(vol, plung, nod, sp), spec, rng))
    return pool


def index_lesions(pool: list[dict], min_voxels: int = 20, per_lesion: int = 2000) -> None:
    """Add ``it["lesions"]`` to every pool volume: the voxel coordinates of each labelled lesion (26-connected
    component of at least ``min_voxels``, at most ``per_lesion`` coordinates kept), for lesion-balanced sampling.

    Why: centring patches on a random GGO voxel picks a 50 mm lesion 1000 times as often as a 5 mm one, while the
    held-out metric averages over lesions; the small ones, which the network missed, were nearly never the centre
    of a patch. Derived from the labels at load time, so the pool cache stays as it is.
    """
    rng = np.random.default_rng(0)
    for it in pool:
        lab = it["label"]
        cc = simulate.components(lab > 0)
        sizes = np.bincount(cc.ravel())
        lesions = []
        for k in np.flatnonzero(sizes >= min_voxels):
            if k == 0:
                continue
            idx = np.argwhere(cc == k)
            if len(idx) > per_lesion:
                idx = idx[rng.choice(len(idx), per_lesion, replace=False)]
            lesions.append(idx.astype(np.int32))
        it["lesions"] = lesions


def index_clean(pool: list[dict], n_real: int, spacing_mm: tuple[float, ...]) -> list[int]:
    """The lesion-free copies of the real backgrounds (indices into ``pool``), each given ``it["dense_lung"]``:
    the coordinates of its lung voxels of -800..-500 HU (1.5 mm smoothed), the normal density that looks most
    like faint ground glass: dependent lung, partial volume at the pleura, around vessels.

    Why: the diffuse pattern is drawn dependent and lower-zone predominant, as COVID-19 is, and a normal lung is
    densest there too; a network that sees faint posterior haze labelled 1 in most copies and the normal dependent
    lung in few marks the latter (8 mL on clean scans). Derived at load time, so the pool cache stays as it is."""
    clean = []
    for i, it in enumerate(pool[: n_real + 1]):
        if len(it["fg"]):
            continue
        hu = it["image"].astype(np.float32) * 1500.0 - 1000.0  # common.normalise's [-1000, 500] -> [0, 1], undone
        sm = simulate.smooth_mm(hu, spacing_mm, 1.5)
        lung = simulate.lung_mask(hu, spacing_mm)
        it["dense_lung"] = np.argwhere(lung & (sm > -800.0) & (sm < -500.0)).astype(np.int32)
        if len(it["dense_lung"]):
            clean.append(i)
    return clean


# ----------------------------------------------------------------------------------------------- patches
def _crop(arr: np.ndarray, centre: np.ndarray, size_zyx: tuple[int, int, int], dtype) -> np.ndarray:  # type: ignore[no-untyped-def]
    """``size_zyx`` voxels of ``arr`` centred on ``centre``, zero outside (0.0 = the inferer's padding value)."""
    lo = centre - np.array(size_zyx) // 2
    out = np.zeros(size_zyx, dtype)
    src = tuple(slice(max(0, lo[k]), min(arr.shape[k], lo[k] + size_zyx[k])) for k in range(3))
    dst = tuple(slice(s.start - lo[k], s.stop - lo[k]) for k, s in enumerate(src))
    out[dst] = arr[src]
    return out


def _similarity(x: np.ndarray, y: np.ndarray, out_zyx: tuple[int, int, int], angle: float, scale: float):  # type: ignore[no-untyped-def]
    """Rotate and zoom a crop in-plane about its centre (x linear, y nearest) onto an ``out_zyx`` grid.

    The real training background is one patient; an in-plane rotation (+-20 degrees) and zoom (0.85-1.2) turn it
    into many chest sizes and vessel orientations. z (5 mm) is never resampled.
    """
    tr = sitk.AffineTransform(3)
    c, s = np.cos(angle) / scale, np.sin(angle) / scale  # output -> input: rotate and shrink by 1/scale
    tr.SetMatrix([c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0])
    centre_in = [(x.shape[2] - 1) / 2.0, (x.shape[1] - 1) / 2.0, (x.shape[0] - 1) / 2.0]
    tr.SetCenter(centre_in)
    origin = [
        centre_in[0] - (out_zyx[2] - 1) / 2.0,
        centre_in[1] - (out_zyx[1] - 1) / 2.0,
        centre_in[2] - (out_zyx[0] - 1) / 2.0,
    ]
    size = [out_zyx[2], out_zyx[1], out_zyx[0]]
    identity = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]

    def warp(arr: np.ndarray, interp: int, pixel: int) -> np.ndarray:
        out = sitk.Resample(sitk.GetImageFromArray(arr), size, tr, interp, origin, [1.0] * 3, identity, 0.0, pixel)
        return sitk.GetArrayFromImage(out)

    return warp(x, sitk.sitkLinear, sitk.sitkFloat32), warp(y, sitk.sitkNearestNeighbor, sitk.sitkUInt8)


def _intensity(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scanner variation: gain/offset (about +-20 HU), sometimes a softer kernel, sometimes more noise."""
    if rng.random() < 0.25:  # softer reconstruction kernel: in-plane Gaussian, 0.3-0.8 voxel
        v = float(rng.uniform(0.3, 0.8)) ** 2
        x = sitk.GetArrayFromImage(sitk.DiscreteGaussian(sitk.GetImageFromArray(x), [v, v, 0.0], 8, 0.01, False))
    if rng.random() < 0.4:  # more quantum noise: 5-25 HU, slightly correlated in-plane
        sd = float(rng.uniform(5.0, 25.0)) / 1500.0
        n = rng.standard_normal(x.shape).astype(np.float32)
        n = simulate.blur_xy(n) / np.float32(0.6)
        x = x + np.float32(sd) * n
    return x * np.float32(rng.uniform(0.97, 1.03)) + np.float32(rng.uniform(-0.015, 0.015))


def lesion_weights(y: np.ndarray, ref_voxels: float, max_weight: float) -> np.ndarray:
    """Cross-entropy weights for a batch of labels ``y`` (N,1,X,Y,Z): 1 on background; on each lesion (26-connected
    component of the patch's label) of n voxels, sqrt(ref_voxels / n) clipped to [1, max_weight].

    Why: the held-out metric averages Dice over lesions, but a voxel-wise loss is a sum over voxels, in which a
    50 mm lesion outweighs a 10 mm one about a hundredfold; the network then misses 10 mm lesions that it sees. The
    weight lifts lesions smaller than ``ref_voxels`` towards equal say; the clip keeps sub-centimetre specks, which
    the metric leaves out, from dominating.
    """
    w = np.ones(y.shape, np.float32)
    for i in range(y.shape[0]):
        lab = y[i, 0] > 0
        if not lab.any():
            continue
        cc = simulate.components(lab)
        sizes = np.bincount(cc.ravel()).astype(np.float32)
        per = np.clip(np.sqrt(ref_voxels / np.maximum(sizes, 1.0)), 1.0, max_weight)
        per[0] = 1.0
        w[i, 0] = per[cc]
    return w


def sample_batch(  # type: ignore[no-untyped-def]
    pool: list[dict],
    rng: np.random.Generator,
    batch: int,
    patch_xyz: tuple[int, int, int],
    p_fg: float = 0.5,
    p_hard: float = 0.2,
    p_real: float | None = None,
    n_real: int = 0,
    p_spatial: float = 0.6,
    per_lesion: bool = False,
    p_clean: float = 0.0,
    clean: Sequence[int] = (),
    p_rehearse: float = 0.0,
    rehearsal: Sequence[dict] = (),
):
    """``p_clean``: the share of patches from the lesion-free real copies ``clean`` (``index_clean``), centred on
    their dense normal lung; ``p_rehearse``: the share drawn from a second pool, ``rehearsal`` (the base recipe's),
    with the same lesion / hard-negative / uniform centring. Either at 0 draws no random number for it, so runs
    without it are as before it existed."""
    pz = (patch_xyz[2], patch_xyz[1], patch_xyz[0])
    xs, ys = [], []
    for _ in range(batch):
        if p_rehearse > 0 and rehearsal and rng.random() < p_rehearse:
            it = rehearsal[int(rng.integers(len(rehearsal)))]
        elif p_clean > 0 and clean and rng.random() < p_clean:
            it = pool[clean[int(rng.integers(len(clean)))]]
        elif p_real is None:  # uniform over the pool
            it = pool[int(rng.integers(len(pool)))]
        elif rng.random() < p_real:  # the real background's copies come first in the pool
            it = pool[int(rng.integers(n_real + 1))]
        else:
            it = pool[n_real + 1 + int(rng.integers(len(pool) - n_real - 1))]
        img, lab = it["image"], it["label"]
        u = rng.random()
        near = None  # the points the patch is centred near (then jittered by up to a third of the patch)
        if "dense_lung" in it and p_clean > 0:
            near = it["dense_lung"]
        elif u < p_fg and per_lesion and it["lesions"]:  # a lesion uniformly, then a voxel of it
            near = it["lesions"][int(rng.integers(len(it["lesions"])))]
        elif u < p_fg and len(it["fg"]):
            near = it["fg"]
        elif u < p_fg + p_hard and len(it["hard"]):
            near = it["hard"]
        if near is not None:
            c = near[rng.integers(len(near))] + rng.integers(-np.array(pz) // 3, np.array(pz) // 3 + 1)
        else:
            c = np.array([rng.integers(0, s) for s in img.shape])
        if rng.random() < p_spatial:
            angle = float(rng.uniform(-np.pi / 9, np.pi / 9))
            scale = float(rng.uniform(0.85, 1.2))
            big = int(np.ceil(max(pz[1], pz[2]) * 1.45 / scale)) + 2
            x, y = _similarity(
                _crop(img, c, (pz[0], big, big), np.float32),
                _crop(lab, c, (pz[0], big, big), np.uint8),
                pz,
                angle,
                scale,
            )
        else:
            x, y = _crop(img, c, pz, np.float32), _crop(lab, c, pz, np.uint8)
        if rng.random() < 0.5:  # left-right flip
            x, y = x[:, :, ::-1], y[:, :, ::-1]
        x = _intensity(np.ascontiguousarray(x), rng)
        xs.append(x.transpose(2, 1, 0))  # (z,y,x) -> (x,y,z): NCXYZ
        ys.append(y.astype(np.int64).transpose(2, 1, 0))
    return np.ascontiguousarray(np.stack(xs)[:, None]), np.ascontiguousarray(np.stack(ys)[:, None])


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with every option left unset taken from its recipe (``RECIPES``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--iters",
        type=int,
        default=None,
        help="phase 1 iterations (8,000 v1, 4,000 v2-scratch; 0 v2, which starts from its base)",
    )
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--patch", type=int, nargs=3, default=(96, 96, 16), help="x y z voxels (multiples of 8)")
    ap.add_argument("--norm", choices=common.NORMS, default="batch", help="normalisation layers (common.make_net)")
    ap.add_argument(
        "--init-filters", type=int, choices=common.INIT_FILTERS, default=8, help="network width (common.make_net)"
    )
    ap.add_argument(
        "--final-iters", type=int, default=0, help="last iterations on inference-sized patches (for --norm group)"
    )
    ap.add_argument("--final-patch", type=int, nargs=3, default=(224, 224, 32), help="x y z voxels, batch 1")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument(
        "--phase1-precision",
        choices=("bf16", "fp32"),
        default=None,
        help="phase 1's forward pass: bfloat16 autocast (weights, optimiser and loss stay float32; about 1.4x faster "
        "on a CPU with AVX512-BF16) or float32 throughout. Phase 2 is always float32, as inference is.",
    )
    ap.add_argument(
        "--memory-format",
        choices=("channels_last", "contiguous"),
        default=None,
        help="tensor layout in training: channels_last_3d is about 1.45x faster on the CPU (same float32 maths, "
        "other summation order); 'contiguous' reproduces runs made before it existed",
    )
    ap.add_argument(
        "--finetune-iters",
        type=int,
        default=None,
        help="phase 2: hard-negative-heavy iterations (2,000 v1 and v2, 1,200 v2-scratch)",
    )
    ap.add_argument("--finetune-final-iters", type=int, default=0)
    ap.add_argument("--finetune-lr", type=float, default=5e-4)
    ap.add_argument(
        "--finetune-bn",
        choices=("frozen", "batch"),
        default="frozen",
        help="phase 2 BatchNorm: 'frozen' normalises with the running statistics, as inference does; 'batch' with "
        "each batch's own (the second model's recipe)",
    )
    ap.add_argument(
        "--bn-recalibrate",
        type=int,
        default=0,
        help="before a frozen phase 2: re-estimate the BatchNorm statistics over this many phase-1 batches (0: keep)",
    )
    ap.add_argument(
        "--finetune-fg-weight",
        type=float,
        default=1.0,
        help="phase 2: class weight of GGO against background in the loss (above 1 trades specificity for recall)",
    )
    ap.add_argument(
        "--finetune-p-fg",
        type=float,
        default=None,
        help="phase 2: share of lesion-centred patches (0.4 v1 and v2, 0.3 v2-scratch)",
    )
    ap.add_argument(
        "--finetune-p-hard",
        type=float,
        default=None,
        help="phase 2: share of hard-negative patches (0.35 v1 and v2, 0.55 v2-scratch)",
    )
    ap.add_argument(
        "--finetune-p-clean",
        type=float,
        default=None,
        help="phase 2: share of patches from the lesion-free real copies, centred on their dense normal lung "
        "(index_clean; 0 in v1, 0.3 in v2)",
    )
    ap.add_argument(
        "--finetune-p-rehearse",
        type=float,
        default=None,
        help="phase 2: share of patches from recipe v1's pool (lung1 with hard-edged ellipsoid GGOs whose vessels are "
        "inside the label, and phantoms), meant to keep what the base learned there (0 in every recipe: at 0.25 the "
        "v2 fine-tune measured the burden test's balls no better; model card, sixth try)",
    )
    ap.add_argument(
        "--lesion-sampling",
        choices=("voxel", "phase2", "both"),
        default=None,
        help="lesion-centred patches: centred on a random GGO voxel ('voxel': big lesions dominate) or on a random "
        "lesion (uniform over lesions, see index_lesions) in phase 2 only or in both phases",
    )
    ap.add_argument(
        "--lesion-weight-max",
        type=float,
        default=1.0,
        help="above 1: the cross-entropy weighs each lesion's voxels by sqrt(V20 / V) clipped to [1, this] (V20: a "
        "20 mm lesion's voxels; see lesion_weights), in both phases; 1 keeps MONAI's plain DiceCELoss",
    )
    ap.add_argument(
        "--phase1-weights",
        type=Path,
        default=None,
        help="skip phase 1 (and the recipe's base) and start phase 2 from these weights: a model_phase1.pt of the "
        "same seed, or a base run's model.pt (RUN/base/model.pt: the v2 fine-tune alone, without retraining v1)",
    )
    ap.add_argument(
        "--base-recipe",
        choices=("none", *RECIPES),
        default=None,
        help="first train this recipe from scratch (same seed and threads, no evaluation) into OUT/base, then start "
        "phase 2 from its weights instead of running phase 1; 'none' trains from random weights",
    )
    ap.add_argument(
        "--n-per-background",
        type=int,
        default=8,
        help="v2, v2-scratch: copies of each training background with patterns",
    )
    ap.add_argument(
        "--sharp-margins",
        type=float,
        default=None,
        help="v2, v2-scratch: share of the training pool's peripheral and multifocal lesions drawn with a step for a "
        "margin instead of a 2-6 mm ramp (patterns.Draw.margin; 0 keeps the pools made before it existed)",
    )
    ap.add_argument("--n-real", type=int, default=N_REAL_V1, help="v1: lung1 copies with inserted GGO")
    ap.add_argument("--n-phantoms", type=int, default=None, help="procedural phantoms (22 v1, 6 v2)")
    ap.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default="v2",
        help="v2 (issue 17): v1 from scratch, then fine-tuned on the five backgrounds with COVID-19 patterns; v1: the "
        "shipped model's recipe (lung1 with ellipsoid GGOs), which reproduces the committed network; v2-scratch: the "
        "five backgrounds from random weights (earlier runs). Options left unset take the recipe's values.",
    )
    ap.add_argument(
        "--calibrate-fp-ml",
        type=float,
        default=None,
        help="after training: lower the GGO logit until each clean training background has at most this many mL "
        "marked (calibrate.py; 0: no calibration, as v1; 5 in v2)",
    )
    ap.add_argument(
        "--consolidation-rule",
        type=lambda v: {"on": True, "off": False}[v],
        default=None,
        metavar="on|off",
        help="append the label definition of consolidation to the exported model (consolidation_rule.py; on in "
        "both recipes)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads (see README)")
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--install", action="store_true", help="copy model.onnx into the model repository")
    args = ap.parse_args(argv)
    if args.phase1_weights is not None and args.base_recipe is None:
        args.base_recipe = "none"  # given weights replace the recipe's base: one fine-tune from a base already trained
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.base_recipe == args.recipe:
        ap.error(f"--base-recipe {args.base_recipe} is the recipe itself")
    if args.base_recipe != "none" and args.phase1_weights is not None:
        ap.error("--base-recipe trains the weights that --phase1-weights would give: pass one of them")
    if args.base_recipe == "none" and args.phase1_weights is None and args.iters < 1:
        ap.error("no phase 1 iterations and no weights to start from: pass --iters, --base-recipe or --phase1-weights")
    if args.bn_recalibrate > 0 and args.finetune_bn != "frozen":
        ap.error("--bn-recalibrate re-estimates statistics for a frozen phase 2: it needs --finetune-bn frozen")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported now, not after training: an edit to the inference package during a run must not meet modules
    # loaded an hour earlier.
    import calibrate
    import consolidation_rule
    import evaluate
    import evaluate_patterns
    import export
    import torch
    from monai.losses import DiceCELoss, DiceLoss

    args.out.mkdir(parents=True, exist_ok=True)
    logf = (args.out / "train.log").open("a")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    t_base = 0.0
    if args.base_recipe != "none":  # the same as running the base recipe's own command first, then this one
        t0 = time.time()
        log(f"base: recipe {args.base_recipe}, from scratch, into {args.out / 'base'}")
        base_argv = ["--recipe", args.base_recipe, "--seed", str(args.seed), "--out", str(args.out / "base")]
        base_argv += ["--threads", str(args.threads), "--memory-format", args.memory_format, "--no-eval"]
        main(base_argv)
        args.phase1_weights = args.out / "base" / "model.pt"
        t_base = time.time() - t0
        log(f"base: done in {t_base / 60:.1f} min")

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.time()
    if args.recipe == "v1":
        pool = build_pool_v1(args.seed, args.n_real, args.n_phantoms, log)
    else:
        pool, args.n_real = build_pool(args.seed, args.n_per_background, args.n_phantoms, log, args.sharp_margins)
    clean: list[int] = []
    if args.finetune_p_clean > 0:
        clean = index_clean(pool, args.n_real, tuple(float(v) for v in common.spec().pre.spacing_mm))
        log(f"pool: {len(clean)} lesion-free real copies indexed for phase 2's normal-lung patches")
    rehearsal: list[dict] = []
    if args.finetune_p_rehearse > 0 and args.finetune_iters > 0:
        v1 = RECIPES["v1"]
        rehearsal = build_pool_v1(args.seed, N_REAL_V1, int(v1["n_phantoms"]), log)  # type: ignore[call-overload]
        log(f"pool: {len(rehearsal)} volumes of recipe v1's pool for phase 2's rehearsal patches")
    if args.lesion_sampling != "voxel":
        index_lesions(pool)
        index_lesions(rehearsal)
        log(f"pool: {sum(len(it['lesions']) for it in pool)} lesions indexed for lesion-balanced sampling")
    t_pool = time.time() - t_start

    net = common.make_net(args.norm, args.init_filters)
    layout = torch.channels_last_3d if args.memory_format == "channels_last" else torch.contiguous_format
    net = net.to(memory_format=layout)

    def forward(x: np.ndarray, bf16: bool = False):  # type: ignore[no-untyped-def]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(torch.from_numpy(x).contiguous(memory_format=layout))
        return out.float()

    vox_mm3 = float(np.prod(common.spec().pre.spacing_mm))
    ref_voxels = 4.0 / 3.0 * np.pi * 10.0**3 / vox_mm3  # a 20 mm sphere on the model grid

    def make_loss(fg_weight: float):  # type: ignore[no-untyped-def]
        """(logits, numpy labels) -> loss: MONAI's DiceCELoss (GGO class-weighted by ``fg_weight``), or with
        ``--lesion-weight-max`` above 1, Dice + cross-entropy weighted per lesion (``lesion_weights``)."""
        classes = torch.tensor([1.0, fg_weight])
        if args.lesion_weight_max <= 1.0:
            weight = None if fg_weight == 1.0 else classes
            dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, weight=weight)
            return lambda out, y: dice_ce(out, torch.from_numpy(y))
        dice_fn = DiceLoss(to_onehot_y=True, softmax=True, batch=True)

        def weighted(out, y: np.ndarray):  # type: ignore[no-untyped-def]
            w = torch.from_numpy(lesion_weights(y, ref_voxels, args.lesion_weight_max))[:, 0]
            ce = torch.nn.functional.cross_entropy(out, torch.from_numpy(y)[:, 0], weight=classes, reduction="none")
            return dice_fn(out, torch.from_numpy(y)) + (ce * w).mean()

        return weighted

    curve = (args.out / "loss.csv").open("w")
    curve.write("phase,iter,loss,lr,seconds\n")

    def run_phase(  # type: ignore[no-untyped-def]
        phase: int,
        iters: int,
        final_iters: int,
        lr: float,
        p_fg: float,
        p_hard: float,
        p_real=None,
        freeze_bn: bool = False,
        fg_weight: float = 1.0,
        bf16: bool = False,
        per_lesion: bool = False,
        p_clean: float = 0.0,
        p_rehearse: float = 0.0,
    ) -> float:
        lf = make_loss(fg_weight)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-5)
        warm = min(100, iters // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda i: (i + 1) / warm if i < warm else 0.5 * (1 + np.cos(np.pi * (i - warm) / max(1, iters - warm))),
        )
        rng = np.random.default_rng([args.seed, 2] if phase == 1 else [args.seed, 2, phase])
        t0 = time.time()
        run = 0.0
        net.train()
        if freeze_bn:  # the running statistics, as at inference; the affine parameters still learn
            for mod in net.modules():
                if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                    mod.eval()
        for it in range(1, iters + 1):
            final = it > iters - final_iters  # GroupNorm then sees inference-sized windows
            x, y = sample_batch(
                pool,
                rng,
                1 if final else args.batch,
                tuple(args.final_patch if final else args.patch),
                p_fg,
                p_hard,
                p_real,
                args.n_real,
                per_lesion=per_lesion,
                p_clean=p_clean,
                clean=clean,
                p_rehearse=p_rehearse,
                rehearsal=rehearsal,
            )
            loss = lf(forward(x, bf16), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            lv = loss.item()
            run = 0.98 * run + 0.02 * lv if it > 1 else lv
            if it % 25 == 0 or it == 1:
                el = time.time() - t0
                curve.write(f"{phase},{it},{lv:.5f},{sched.get_last_lr()[0]:.6g},{el:.1f}\n")
                curve.flush()
            if it % 100 == 0 or it == 1:
                el = time.time() - t0
                eta = (iters - it) * el / it / 60
                log(f"phase {phase} iter {it}/{iters} loss {run:.4f} {it / el:.2f} it/s eta {eta:.1f} min")
            if it % 500 == 0:
                torch.save(net.state_dict(), args.out / f"checkpoint{phase}.pt")
        t = time.time() - t0
        torch.save(net.state_dict(), args.out / f"model_phase{phase}.pt")
        log(f"phase {phase}: {iters} iterations in {t / 60:.1f} min ({iters / t:.2f} it/s)")
        return t

    def recalibrate_bn(n_batches: int) -> None:
        """Replace the running BatchNorm statistics (an exponential average of the last few noisy batches of two
        patches) by the plain average over ``n_batches`` phase-1 batches: the statistics a frozen phase 2 then
        trains against, and inference uses."""
        bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        rng = np.random.default_rng([args.seed, 3])
        net.train()
        t0 = time.time()
        with torch.no_grad():
            for _ in range(n_batches):
                x, _y = sample_batch(
                    pool,
                    rng,
                    args.batch,
                    tuple(args.patch),
                    PHASE1_P_FG,
                    PHASE1_P_HARD,
                    per_lesion=args.lesion_sampling == "both",
                )
                forward(x)
        for m in bns:
            m.momentum = 0.1
        log(f"BatchNorm statistics re-estimated over {n_batches} batches in {time.time() - t0:.0f} s")

    if args.phase1_weights is not None:  # phase 1 already run by this very command (same seed): reuse its weights
        net.load_state_dict(torch.load(args.phase1_weights, map_location="cpu"))
        t1 = 0.0
        log(f"phase 1: weights from {args.phase1_weights}")
    else:
        t1 = run_phase(
            1,
            args.iters,
            args.final_iters,
            args.lr,
            PHASE1_P_FG,
            PHASE1_P_HARD,
            bf16=args.phase1_precision == "bf16",
            per_lesion=args.lesion_sampling == "both",
        )
    t2 = 0.0
    if args.finetune_iters > 0 and args.bn_recalibrate > 0:
        recalibrate_bn(args.bn_recalibrate)
    if args.finetune_iters > 0:  # hard-negative emphasis: vessels, mediastinal border, solid lesions
        t2 = run_phase(
            2,
            args.finetune_iters,
            args.finetune_final_iters,
            args.finetune_lr,
            args.finetune_p_fg,
            args.finetune_p_hard,
            0.6,
            freeze_bn=args.finetune_bn == "frozen",
            fg_weight=args.finetune_fg_weight,
            per_lesion=args.lesion_sampling != "voxel",
            p_clean=args.finetune_p_clean,
            p_rehearse=args.finetune_p_rehearse,
        )
    t_train = t1 + t2
    torch.save(net.state_dict(), args.out / "model.pt")
    n_iters = args.iters + args.finetune_iters

    net.eval()
    net = net.to(memory_format=torch.contiguous_format)  # the exported graph and its check see plain tensors
    onnx_path = args.out / "model.onnx"

    def export_model() -> None:
        """The network, then (where the recipe says so) the consolidation rule after it: what the node serves,
        and what the calibration measures."""
        export.export(net, onnx_path)
        if args.consolidation_rule:
            consolidation_rule.append_rule(onnx_path, onnx_path)

    export_model()
    shift, calibration_fp = 0.0, None
    if args.calibrate_fp_ml > 0:
        t0 = time.time()
        shift, calibration_fp = calibrate.choose_shift(
            onnx_path, backgrounds.TRAIN, args.calibrate_fp_ml, log=log, threads=args.threads
        )
        calibrate.bake_shift(net, shift)
        torch.save(net.state_dict(), args.out / "model.pt")
        export_model()
        log(f"calibrated: GGO logit lowered by {shift} ({time.time() - t0:.0f} s): {calibration_fp}")
    info = {
        "recipe": args.recipe,
        "seed": args.seed,
        "norm": args.norm,
        "init_filters": args.init_filters,
        "iters": args.iters,
        "batch": args.batch,
        "patch_xyz": list(args.patch),
        "final_iters": args.final_iters,
        "final_patch_xyz": list(args.final_patch),
        "lr": args.lr,
        "phase1_precision": args.phase1_precision,
        "memory_format": args.memory_format,
        "threads": args.threads,
        "pool_volumes": len(pool),
        "pool_seconds": round(t_pool, 1),
        "finetune_iters": args.finetune_iters,
        "finetune_final_iters": args.finetune_final_iters,
        "finetune_lr": args.finetune_lr,
        "finetune_bn": args.finetune_bn,
        "finetune_p_fg": args.finetune_p_fg,
        "finetune_p_hard": args.finetune_p_hard,
        "finetune_p_clean": args.finetune_p_clean,
        "finetune_p_rehearse": args.finetune_p_rehearse,
        "sharp_margins": args.sharp_margins,
        "calibrate_fp_ml": args.calibrate_fp_ml,
        "calibration_shift": shift,
        "calibration_fp_ml": calibration_fp,
        "consolidation_rule": args.consolidation_rule,
        "bn_recalibrate": args.bn_recalibrate,
        "finetune_fg_weight": args.finetune_fg_weight,
        "lesion_sampling": args.lesion_sampling,
        "lesion_weight_max": args.lesion_weight_max,
        "phase1_seconds": round(t1, 1),
        "phase1_weights": str(args.phase1_weights) if args.phase1_weights else None,
        "base_recipe": args.base_recipe,
        "base_seconds": round(t_base, 1),
        "phase2_seconds": round(t2, 1),
        "train_seconds": round(t_train, 1),
        "its_per_second": round((n_iters if args.phase1_weights is None else args.finetune_iters) / t_train, 3),
        "torch": torch.__version__,
    }
    (args.out / "train_info.json").write_text(json.dumps(info, indent=2))
    if not args.no_eval:
        if args.recipe == "v1":
            metrics = evaluate.evaluate(onnx_path, log=log)
        else:
            metrics = evaluate_patterns.evaluate_patterns(onnx_path, log=log, figures=args.out / "figures")
        metrics["training"] = info
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if args.install:
        dest = common.REPO / "models" / "segmentation_ct_covid_lesion_v1" / "1" / "model.onnx"
        shutil.copyfile(onnx_path, dest)
        log(f"installed {dest}")
    log(f"total {(time.time() - t_start + t_base) / 60:.1f} min" + (" with the base" if t_base else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
