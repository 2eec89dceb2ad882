"""Calibrate a trained model's ground-glass decision on the clean *training* backgrounds, then bake it into the
network, so the node (which labels where the GGO logit exceeds the background's) needs no threshold of its own.

    .venv/bin/python models/training/calibrate.py RUN_DIR [--fp-ml 5.0]

Why: a network trained on simulated patterns that are dependent and lower-zone predominant, as COVID-19 is, marks
some of the normal dependent lung of a clean scan (7-9 mL where the issue allows 5). The logit margin at which it
calls ground glass is the one free choice left after training. ``choose_shift`` takes the smallest margin (on a
0.25 grid up to 3) at which every clean training background (``backgrounds.TRAIN``, never a held-out one)
is marked at most ``fp_ml``, through the node's own pipeline; ``bake_shift`` subtracts it from the GGO channel's
bias in the final 1x1x1 convolution, which moves the pipeline's blended logit difference by exactly that much
(the Gaussian blending weights sum to 1).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))

import backgrounds
import common

from inference.onnx_backend import OnnxRuntimeBackend
from inference.pipeline import segment

GRID = tuple(0.25 * k for k in range(13))  # 0 .. 3 logits


class _Shifted:
    """The backend with ``shift`` taken off the GGO logit of every window (what ``bake_shift`` makes permanent)."""

    def __init__(self, backend: OnnxRuntimeBackend, shift: float) -> None:
        self.backend = backend
        self.shift = shift
        self.max_in_flight = 1

    def infer(self, windows: np.ndarray) -> np.ndarray:
        out = np.array(self.backend.infer(windows))
        out[:, 1] -= self.shift
        return out


def false_positive_ml(onnx_path: Path, names: Sequence[str], shift: float, threads: int = 2) -> dict[str, float]:
    """mL marked on each named background as it is, with the GGO logit lowered by ``shift``."""
    spec = common.spec()
    backend = OnnxRuntimeBackend(spec, onnx_path, intra_op_threads=threads)
    try:
        out = {}
        for name in names:
            bg = backgrounds.load(name)
            label = sitk.GetArrayFromImage(segment(bg.image, spec, _Shifted(backend, shift)).label) > 0
            out[name] = round(float(label.sum()) * float(np.prod(bg.image.GetSpacing())) / 1000.0, 3)
        return out
    finally:
        backend.close()


def choose_shift(
    onnx_path: Path,
    names: Sequence[str],
    fp_ml: float,
    log: Callable[[str], None] = print,
    threads: int = 2,
) -> tuple[float, dict[str, float]]:
    """The smallest shift of ``GRID`` at which every background of ``names`` has at most ``fp_ml`` marked, by
    bisection (the marked volume only falls as the shift grows); the largest of the grid when none does."""
    lo, hi = -1, len(GRID) - 1  # GRID[hi] is the candidate; lo is known to fail (-1: nothing tried)
    seen: dict[int, dict[str, float]] = {}

    def ok(i: int) -> bool:
        seen[i] = false_positive_ml(onnx_path, names, GRID[i], threads)
        log(f"calibrate: shift {GRID[i]:.2f}: {seen[i]}")
        return max(seen[i].values()) <= fp_ml

    if ok(0):
        return 0.0, seen[0]
    lo = 0
    if not ok(hi):
        return GRID[hi], seen[hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return GRID[hi], seen[hi]


def bake_shift(net, shift: float) -> None:  # type: ignore[no-untyped-def]
    """Lower the GGO logit by ``shift`` in the network itself: the bias of its final two-channel convolution."""
    import torch

    final = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d) and m.out_channels == 2][-1]
    with torch.no_grad():
        final.bias[1] -= shift


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a training run's folder (model.pt, train_info.json)")
    ap.add_argument("--fp-ml", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import json

    import export
    import torch

    info = json.loads((args.run / "train_info.json").read_text())
    shift, fp = choose_shift(args.run / "model.onnx", backgrounds.TRAIN, args.fp_ml, threads=args.threads)
    net = common.make_net(info["norm"], info["init_filters"])
    net.load_state_dict(torch.load(args.run / "model.pt", map_location="cpu"))
    bake_shift(net, shift)
    torch.save(net.state_dict(), args.run / "model_calibrated.pt")
    export.export(net, args.run / "model_calibrated.onnx")
    (args.run / "calibration.json").write_text(json.dumps({"shift": shift, "fp_ml": fp, "limit_ml": args.fp_ml}))
    print(f"shift {shift}: {fp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
