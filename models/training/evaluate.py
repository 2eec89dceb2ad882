"""Evaluate an exported model on the held-out real background (lung2), at the node's inference conditions.

    .venv/bin/python models/training/evaluate.py MODEL.onnx [--out metrics.json]

Each volume goes through the node's own pipeline (``inference.pipeline.segment`` on
``inference.onnx_backend.OnnxRuntimeBackend``: resample to the model grid, intensity window, sliding window
224x224x32 with overlap 0.25 and Gaussian blending, argmax, labels back onto the original grid), and the metrics
are computed on the original grid of the CT.

- Inserted lesions: ``--insertions`` copies of lung2, each with ``--lesions`` primary GGOs (plus confluent
  satellites) from seeds (1000, k) that training never used. A lesion is a connected component (26-connected) of
  the inserted label; its size is the equivalent-sphere diameter (6 V / pi)^(1/3). Per-lesion Dice is computed in
  the lesion's bounding box grown by 5 mm in-plane and one slice, with voxels of other lesions left out; a lesion
  is detected when at least 10 % of its voxels are predicted.
- False positives: the predicted GGO volume (mL) on lung2 as it is (no lesion inserted), and on lung1 as it is;
  with the spec's post-transforms (the node's answer) and without the lung-fields step (the network's own).
- Solid lesions (``*_label.nrrd``, not GGO): predicted GGO voxels inside them, for lung1 and lung2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import simulate

from inference.onnx_backend import OnnxRuntimeBackend
from inference.pipeline import segment

EVAL_SEED = 1000


def segment_volume(img: sitk.Image, onnx_path: Path, threads: int = 2, lung_fields: bool = True) -> np.ndarray:
    """The node's pipeline on an HU image; returns the label array (z,y,x) on the image's own grid.

    ``lung_fields=False`` drops the spec's lung-fields post-transform: the network's own answer.
    """
    spec = common.spec()
    if not lung_fields:
        spec = dataclasses.replace(spec, post=dataclasses.replace(spec.post, lung_fields=None))
    backend = OnnxRuntimeBackend(spec, onnx_path, intra_op_threads=threads)
    try:
        res = segment(img, spec, backend)
    finally:
        backend.close()
    return sitk.GetArrayFromImage(res.label) > 0


def lesion_metrics(gt: np.ndarray, pred: np.ndarray, spacing_xyz, labels: np.ndarray | None = None) -> list[dict]:
    """Dice and detection per lesion: a 26-connected component of ``gt``, or per region of ``labels`` (an integer
    labelling of ``gt``'s voxels, 0 elsewhere) when given."""
    cc = simulate.components(gt) if labels is None else labels
    vox = float(np.prod(spacing_xyz))
    margin = (1, int(np.ceil(5.0 / spacing_xyz[1])), int(np.ceil(5.0 / spacing_xyz[0])))
    out = []
    for k in range(1, int(cc.max()) + 1):
        comp = cc == k
        idx = np.argwhere(comp)
        if len(idx) == 0:
            continue
        lo = np.maximum(idx.min(0) - margin, 0)
        hi = np.minimum(idx.max(0) + np.array(margin) + 1, gt.shape)
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        g = comp[sl]
        p = pred[sl] & ~((cc[sl] > 0) & ~g)
        inter = int((g & p).sum())
        n_g, n_p = int(g.sum()), int(p.sum())
        vol = n_g * vox
        out.append(
            {
                "volume_ml": vol / 1000.0,
                "diameter_mm": (6.0 * vol / np.pi) ** (1.0 / 3.0),
                "dice": 2.0 * inter / (n_g + n_p) if n_g + n_p else 1.0,
                "detected": inter >= 0.1 * n_g,
            }
        )
    return out


def evaluate(
    onnx_path: Path, insertions: int = 5, lesions: int = 12, log=print, without_lung_fields: bool = True
) -> dict:  # type: ignore[no-untyped-def]
    t0 = time.time()
    img, solid = common.load_real(common.HELDOUT_BACKGROUND)
    sp = img.GetSpacing()
    vox_ml = float(np.prod(sp)) / 1000.0
    hu = sitk.GetArrayFromImage(img)
    lung = simulate.lung_mask(hu, sp)
    rows: list[dict] = []
    inter = union = 0
    fp_components = 0
    for k in range(insertions):
        rng = np.random.default_rng([EVAL_SEED, k])
        hu2, lab, _les = simulate.insert_ggo(hu, sp, rng, lesions, exclude=solid, lung=lung)
        pred = segment_volume(common.with_array(hu2.astype(np.float32), img), onnx_path)
        gt = lab > 0
        rows += lesion_metrics(gt, pred, sp)
        inter += int((gt & pred).sum())
        union += int(gt.sum() + pred.sum())
        pcc = simulate.components(pred)
        hit = set(np.unique(pcc[gt]).tolist())
        fp_components += len(set(range(1, int(pcc.max()) + 1)) - hit)
        log(f"eval insertion {k}: {int(gt.sum())} GT voxels, solid overlap {int((pred & solid).sum())} voxels")
    big = [r for r in rows if r["diameter_mm"] >= 10.0]
    small = [r for r in rows if r["diameter_mm"] < 10.0]
    dice_big = np.array([r["dice"] for r in big]) if big else np.array([np.nan])

    clean = {}
    for name in (common.HELDOUT_BACKGROUND, common.TRAIN_BACKGROUND):
        im, sol = common.load_real(name)
        pred = segment_volume(im, onnx_path)
        # The network's own answer without the lung-fields step (a report figure; the suite skips it for time).
        raw = segment_volume(im, onnx_path, lung_fields=False) if without_lung_fields else None
        v = float(np.prod(im.GetSpacing())) / 1000.0
        clean[name] = {
            "fp_volume_ml": round(float(pred.sum()) * v, 3),
            "fp_volume_ml_without_lung_fields": None if raw is None else round(float(raw.sum()) * v, 3),
            "solid_lesion_ml": round(float(sol.sum()) * v, 3),
            "solid_lesion_voxels_marked_ggo": int((pred & sol).sum()),
            "solid_lesion_fraction_marked_ggo": round(float((pred & sol).sum()) / max(1, int(sol.sum())), 5),
        }
        log(f"eval {name} as is: {clean[name]}")
    m = {
        "heldout_background": common.HELDOUT_BACKGROUND,
        "insertions": insertions,
        "lesions_total": len(rows),
        "lesions_ge_10mm": len(big),
        "dice_ge_10mm_mean": round(float(np.mean(dice_big)), 4),
        "dice_ge_10mm_p5": round(float(np.percentile(dice_big, 5)), 4),
        "dice_ge_10mm_median": round(float(np.median(dice_big)), 4),
        "sensitivity_ge_10mm": round(float(np.mean([r["detected"] for r in big])) if big else float("nan"), 4),
        "sensitivity_lt_10mm": round(float(np.mean([r["detected"] for r in small])) if small else float("nan"), 4),
        "dice_lt_10mm_mean": round(float(np.mean([r["dice"] for r in small])) if small else float("nan"), 4),
        "voxel_dice_all_insertions": round(2.0 * inter / union, 4) if union else 1.0,
        "fp_components_in_insertions": fp_components,
        "fp_volume_ml_lesion_free_heldout": clean[common.HELDOUT_BACKGROUND]["fp_volume_ml"],
        "fp_volume_ml_lesion_free_heldout_without_lung_fields": clean[common.HELDOUT_BACKGROUND][
            "fp_volume_ml_without_lung_fields"
        ],
        "clean_volumes": clean,
        "voxel_ml_heldout": vox_ml,
        "eval_seconds": round(time.time() - t0, 1),
    }
    log("metrics " + json.dumps({k: v for k, v in m.items() if k != "clean_volumes"}))
    return m


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--insertions", type=int, default=5)
    ap.add_argument("--lesions", type=int, default=12)
    args = ap.parse_args()
    m = evaluate(args.onnx, args.insertions, args.lesions)
    if args.out:
        args.out.write_text(json.dumps(m, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
