"""Export a trained SegResNet to ONNX with the node's tensor names and layout, and check it against PyTorch.

.venv/bin/python models/training/export.py RUN_DIR/model.pt OUT.onnx [--norm batch|group]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

OPSET = 17


def export(net, path: Path, check_shape: tuple[int, int, int] = (224, 224, 32)) -> float:  # type: ignore[no-untyped-def]
    """Write ``path`` (opset 17, dynamic batch and spatial axes); returns max |onnx - torch| on a 1x1xXxYxZ input."""
    import onnxruntime as ort
    import torch

    spec = common.spec()
    net.eval()
    dummy = torch.zeros(1, 1, 64, 64, 16)
    axes = {0: "batch", 2: "x", 3: "y", 4: "z"}
    torch.onnx.export(
        net,
        (dummy,),
        str(path),
        input_names=[spec.model.input.name],
        output_names=[spec.model.output.name],
        dynamic_axes={spec.model.input.name: axes, spec.model.output.name: axes},
        opset_version=OPSET,
        dynamo=False,
    )
    x = np.random.default_rng(0).random((1, 1, *check_shape), dtype=np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run([spec.model.output.name], {spec.model.input.name: x})[0]
    err = float(np.abs(got - ref).max())
    # float32 summation order differs between the runtimes: small logit differences, same labels.
    agree = float((got.argmax(1) == ref.argmax(1)).mean()) if got.shape == ref.shape else 0.0
    if got.shape != ref.shape or err > 1e-2 or agree < 0.9999:
        raise RuntimeError(
            f"ONNX export differs from torch: shape {got.shape} vs {ref.shape}, max error {err}, labels agree {agree}"
        )
    size_mb = path.stat().st_size / 1e6
    print(
        f"exported {path} ({size_mb:.1f} MB): max |onnx - torch| = {err:.2e}, "
        f"max |logit| {np.abs(ref).max():.1f}, labels agree {agree:.6f}",
        flush=True,
    )
    return err


def main() -> int:
    import argparse

    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights", type=Path)
    ap.add_argument("onnx", type=Path)
    ap.add_argument("--norm", choices=common.NORMS, default="batch", help="as the weights were trained")
    ap.add_argument("--init-filters", type=int, choices=common.INIT_FILTERS, default=8, help="as trained")
    args = ap.parse_args()
    net = common.make_net(args.norm, args.init_filters)
    net.load_state_dict(torch.load(args.weights, map_location="cpu"))
    export(net, args.onnx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
