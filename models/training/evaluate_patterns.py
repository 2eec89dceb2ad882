"""Evaluate a model on the CT patterns of COVID-19 pneumonia, on held-out real backgrounds, through the node's pipeline.

    .venv/bin/python models/training/evaluate_patterns.py MODEL.onnx [--out metrics.json] [--cases 2]
        [--patterns consolidation,...] [--windows all]   # a subset; the whole grid instead of the window skip

For each held-out background (``backgrounds.HELDOUT``: lung2 and lidc_idri_0295, which no training step sees) and
each pattern of ``patterns.PATTERNS``, ``--cases`` volumes are drawn with the *evaluation* settings
(``patterns.Draw``: the bands of every parameter range that training never drew; seeds
``(EVAL_SEED, pattern, background, case)``), inserted on the background's own grid, and segmented by
``inference.pipeline.segment`` with the bundled spec (lung-fields step and its window skip on), exactly as the node
runs. Metrics on the CT's own grid:

- per pattern and background: Dice of each region >= 10 mm (equivalent-sphere diameter; ``regions``: the truth's
  connected pieces, joined across gaps of up to 3 mm; ``evaluate.lesion_metrics``), its mean and 5th percentile,
  sensitivity, the same over plain connected components (``components``) and per lung (``lungs``: each lung's
  involvement as one region, the measure for ``diffuse``, see ``CRITERION``); each case's involved volume
  (predicted GGO inside the lungs) against the truth, as a relative error (the volume criterion for ``diffuse``);
- false positives: predicted GGO volume on each held-out background as it is;
- solid nodules: on every background as it is, each solid nodule (a component of ``backgrounds.Background.solid``:
  lung1/lung2's labels, the LIDC readers' contours) and the fraction of its voxels marked GGO.
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

import backgrounds
import common
import patterns
import simulate
from evaluate import lesion_metrics

from inference.onnx_backend import OnnxRuntimeBackend
from inference.pipeline import segment

EVAL_SEED = 3000
# Which summary each pattern's Dice target (>= 0.80) is read from. A diffuse, confluent opacity is one finding per
# lung ("confluent ground glass of both lower lobes"), so its region is the lung's involvement. Its connected pieces
# are not separate findings: the posterior costophrenic recesses, cut from the rest of the lung by the diaphragm's
# dome on 5 mm slices, make islands of 10-16 mm, and each would weigh as much as a lobe. Their figures stay in
# ``regions``/``components`` beside it.
CRITERION = {"diffuse": "lungs"}


class Segmenter:
    """One ONNX Runtime session for every volume of an evaluation (the node's backend and pipeline)."""

    def __init__(self, onnx_path: Path, threads: int = 2, windows: str | None = None) -> None:
        """``windows``: the spec's ``inferer.windows`` instead of the bundled one (``all``: the whole grid)."""
        self.spec = common.spec()
        if windows is not None:
            self.spec = dataclasses.replace(self.spec, inferer=dataclasses.replace(self.spec.inferer, windows=windows))
        self.backend = OnnxRuntimeBackend(self.spec, onnx_path, intra_op_threads=threads)

    def __call__(self, img: sitk.Image) -> np.ndarray:
        return sitk.GetArrayFromImage(segment(img, self.spec, self.backend).label) > 0

    def close(self) -> None:
        self.backend.close()


def _outline(mask: np.ndarray) -> np.ndarray:
    """The border of a 2-D mask, two pixels wide (it stays visible once the picture is scaled down)."""
    inner = mask.copy()
    for axis in (0, 1):
        for shift in (1, -1, 2, -2):
            inner &= np.roll(mask, shift, axis=axis)
    return mask & ~inner


def save_figure(path: Path, hu: np.ndarray, lung: np.ndarray, truth: np.ndarray, pred: np.ndarray, title: str) -> None:
    """A PNG of the slice with the most ground glass: the CT (lung window) beside the same slice with the truth
    outlined in green and the prediction in red, cropped to the lungs."""
    from PIL import Image, ImageDraw

    z = int(np.argmax(truth.sum(axis=(1, 2))))
    ct = np.clip((hu[z] + 1350.0) / 1500.0 * 255.0, 0, 255).astype(np.uint8)
    ys, xs = np.nonzero(lung.any(axis=0))
    crop = (
        slice(max(0, int(ys.min()) - 12), int(ys.max()) + 12),
        slice(max(0, int(xs.min()) - 12), int(xs.max()) + 12),
    )
    grey = np.stack([ct] * 3, axis=-1)
    marked = grey.copy()
    marked[_outline(truth[z])] = (0, 220, 0)
    marked[_outline(pred[z])] = (255, 40, 40)
    both = np.concatenate([grey[crop], marked[crop]], axis=1)
    img = Image.fromarray(both)
    img = img.resize((img.width * 400 // img.height, 400), Image.Resampling.LANCZOS)
    framed = Image.new("RGB", (img.width, img.height + 18))
    framed.paste(img, (0, 18))
    ImageDraw.Draw(framed).text((6, 3), f"{title}: truth green, prediction red (slice {z})", fill=(255, 255, 255))
    img = framed
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)


def regions(gt: np.ndarray, spacing_xyz) -> np.ndarray:
    """The truth's regions: its voxels labelled by the connected components of the truth grown by 1.5 mm, so
    pieces of one opacity that airways, excluded nodules or sparing cut apart by up to 3 mm are one region.

    Why not plain connected components: a lobe-filling GGO cut by airway lumen (never labelled) falls into dozens
    of fragments, and each fragment's Dice then counts the prediction filling the next fragment as a false
    positive; the figure would measure the cutting, not the segmentation. Both are reported
    (``components`` holds the plain per-component figures)."""
    grown = simulate.dilate_mm(gt, spacing_xyz, 1.5)
    return (simulate.components(grown) * gt).astype(np.int32)


def lung_regions(gt: np.ndarray, side: np.ndarray) -> np.ndarray:
    """The truth's voxels labelled by lung (``patterns.Context.side``: 1 right, 2 left), one region per lung."""
    return (gt * side).astype(np.int32)


def _summary(rows: list[dict]) -> dict:
    big = [r for r in rows if r["diameter_mm"] >= 10.0]
    dice = np.array([r["dice"] for r in big]) if big else np.array([np.nan])
    return {
        "regions_ge_10mm": len(big),
        "dice_mean": round(float(np.mean(dice)), 4),
        "dice_p5": round(float(np.percentile(dice, 5)), 4),
        "dice_median": round(float(np.median(dice)), 4),
        "sensitivity": round(float(np.mean([r["detected"] for r in big])), 4) if big else float("nan"),
    }


def evaluate_patterns(
    onnx_path: Path,
    cases: int = 2,
    log=print,  # type: ignore[no-untyped-def]
    heldout: tuple[str, ...] = backgrounds.HELDOUT,
    clean: tuple[str, ...] = backgrounds.NAMES,
    threads: int = 2,
    figures: Path | None = None,
    only: tuple[str, ...] = patterns.PATTERNS,
    windows: str | None = None,
) -> dict:
    """The metrics of the module docstring; ``clean``: the backgrounds segmented as they are (false positives,
    solid nodules); ``figures``: a folder for one picture per pattern and background (``save_figure``, the first
    case); ``only``: a subset of the patterns (each keeps its own seeds); ``windows``: ``Segmenter``'s."""
    t0 = time.time()
    seg = Segmenter(onnx_path, threads, windows)
    per: dict[str, dict] = {}
    try:
        for b_index, name in enumerate(heldout):
            bg = backgrounds.load(name)
            hu = sitk.GetArrayFromImage(bg.image)
            sp = bg.image.GetSpacing()
            ctx = patterns.context(hu, sp, bg.image.GetDirection(), exclude=bg.solid)
            vox_ml = float(np.prod(sp)) / 1000.0
            for p_index, pattern in enumerate(patterns.PATTERNS):
                if pattern not in only:
                    continue
                rows: list[dict] = []
                parts: list[dict] = []
                lungs: list[dict] = []
                volumes = []
                for k in range(cases):
                    rng = np.random.default_rng([EVAL_SEED, p_index, b_index, k])
                    ins = patterns.insert(ctx, (pattern,), rng, "eval")
                    pred = seg(common.with_array(ins.hu, bg.image))
                    gt = ins.label > 0
                    rows += lesion_metrics(gt, pred, sp, regions(gt, sp))
                    parts += lesion_metrics(gt, pred, sp)
                    lungs += lesion_metrics(gt, pred, sp, lung_regions(gt, ctx.side))
                    truth_ml = float(gt.sum()) * vox_ml
                    pred_ml = float((pred & ctx.lung).sum()) * vox_ml
                    volumes.append(
                        {
                            "truth_ml": round(truth_ml, 2),
                            "pred_ml": round(pred_ml, 2),
                            "relative_error": round((pred_ml - truth_ml) / truth_ml, 4) if truth_ml else None,
                            "involvement_pct": round(100.0 * float(gt.sum()) / max(1, int(ctx.lung.sum())), 2),
                            "voxel_dice": round(2.0 * float((gt & pred).sum()) / max(1, int(gt.sum() + pred.sum())), 4),
                        }
                    )
                    log(f"{name} {pattern} case {k}: {volumes[-1]}")
                    if figures is not None and k == 0:
                        save_figure(figures / f"{pattern}_{name}.png", ins.hu, ctx.lung, gt, pred, f"{pattern}, {name}")
                entry = _summary(rows) | {
                    "components": _summary(parts),
                    "lungs": _summary(lungs)
                    | {"dice_all": [round(r["dice"], 4) for r in lungs if r["diameter_mm"] >= 10.0]},
                    "cases": volumes,
                    "dice_all": [round(r["dice"], 4) for r in rows if r["diameter_mm"] >= 10.0],
                }
                per.setdefault(pattern, {})[name] = entry
                log(f"{name} {pattern}: {_summary(rows)}")
        by_pattern = {}
        for pattern, entries in per.items():
            dice = np.array([d for e in entries.values() for d in e["dice_all"]] or [np.nan])
            errors = [
                abs(c["relative_error"])
                for e in entries.values()
                for c in e["cases"]
                if c["relative_error"] is not None
            ]
            per_lung = np.array([d for e in entries.values() for d in e["lungs"]["dice_all"]] or [np.nan])
            by_pattern[pattern] = {
                "regions_ge_10mm": int(np.isfinite(dice).sum()),
                "dice_mean": round(float(np.mean(dice)), 4),
                "dice_p5": round(float(np.percentile(dice, 5)), 4),
                "lungs": int(np.isfinite(per_lung).sum()),
                "dice_mean_per_lung": round(float(np.mean(per_lung)), 4),
                "dice_p5_per_lung": round(float(np.percentile(per_lung, 5)), 4),
                "criterion": CRITERION.get(pattern, "regions"),
                "max_abs_volume_error": round(max(errors), 4) if errors else None,
            }
        as_is: dict[str, dict] = {}
        for name in clean:
            bg = backgrounds.load(name)
            pred = seg(bg.image)
            v = float(np.prod(bg.image.GetSpacing())) / 1000.0
            cc = simulate.components(bg.solid) if bg.solid.any() else np.zeros(bg.solid.shape, np.int32)
            fractions = []
            for k in range(1, int(cc.max()) + 1):
                comp = cc == k
                fractions.append(round(float((pred & comp).sum()) / max(1, int(comp.sum())), 4))
            as_is[name] = {
                "heldout": name in heldout,
                "fp_volume_ml": round(float(pred.sum()) * v, 3),
                "solid_nodules": len(fractions),
                "solid_max_fraction_marked": max(fractions) if fractions else 0.0,
            }
            log(f"clean {name}: {as_is[name]}")
    finally:
        seg.close()
    m = {
        "protocol": "patterns v1: evaluation bands, seeds (3000, pattern, background, case), bundled spec",
        "heldout_backgrounds": list(heldout),
        "cases_per_pattern_and_background": cases,
        "by_pattern": by_pattern,
        "by_pattern_and_background": per,
        "clean_volumes": as_is,
        "eval_seconds": round(time.time() - t0, 1),
    }
    log("by pattern " + json.dumps(by_pattern))
    return m


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--cases", type=int, default=2)
    ap.add_argument("--figures", type=Path, default=None, help="a folder for one PNG per pattern and background")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime and SimpleITK threads")
    ap.add_argument("--no-solids", action="store_true", help="clean volumes of the held-out backgrounds only")
    ap.add_argument("--patterns", default=",".join(patterns.PATTERNS), help="a comma-separated subset, same seeds")
    ap.add_argument(
        "--windows", choices=("all", "lung_fields"), default=None, help="the sliding windows (default: the spec's)"
    )
    args = ap.parse_args()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    clean = backgrounds.HELDOUT if args.no_solids else backgrounds.NAMES
    only = tuple(args.patterns.split(","))
    if unknown := set(only) - set(patterns.PATTERNS):
        ap.error(f"--patterns: unknown {sorted(unknown)}; known: {', '.join(patterns.PATTERNS)}")
    m = evaluate_patterns(
        args.onnx, args.cases, clean=clean, threads=args.threads, figures=args.figures, only=only, windows=args.windows
    )
    if args.out:
        args.out.write_text(json.dumps(m, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
