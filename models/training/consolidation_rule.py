"""Append issue 17's label definition of consolidation to an exported model, as operators of its own ONNX graph.

    .venv/bin/python models/training/consolidation_rule.py IN.onnx OUT.onnx [--kernel-mm 5.6] [--threshold-hu -300]

Issue 17 defines a consolidated core by its attenuation: denser than about -300 HU with the vessels obscured, it is
label 0, and only its ground-glass rim is 1. A network trained on the simulator learns this only as far as its
iterations allow (the shipped model never saw a core labelled 0 and marks them: consolidation Dice 0.751). This
step writes the definition into the model file itself, so the node's code and configuration stay as they are and
both backends serve it unchanged:

1. the window's intensity is averaged over 3 x 3 in-plane voxels (noise) and compared with ``threshold_hu``
   (mapped through the bundled spec's intensity window: the network's input is normalised HU);
2. that dense mask is opened in-plane (``kernel_mm``, about 5.6 mm at the 0.8 mm model grid): what survives is
   solid tissue at least that wide, a consolidated core, while vessels and septa thinner than the kernel, which
   stay ground glass where the haze surrounds them, are removed from the mask;
3. the ground-glass logit (channel 1) is lowered by ``PENALTY`` on what is left, so those voxels are background.

The graph gains 9 nodes: an AveragePool, a Greater, a Cast, two MaxPools with two Negs (an opening is an
erosion, -max(-x), then a dilation), a Mul and an Add: pooling and elementwise work on one channel, beside the
network's convolutions; ONNX Runtime's working set grows by about 32 MB at the bundled batch of 2 windows
(``bench/infer.py``). Only ONNX's standard operators (opset 17) are used, written with onnx.helper, because the
rule is fixed arithmetic with no weights to train.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

PENALTY = 30.0
"""Logits lowered on the dense cores: far beyond the network's own margin (|logit| rarely exceeds 15)."""
KERNEL_MM = 5.6
THRESHOLD_HU = -300.0


def append_rule(
    source: Path, target: Path, kernel_mm: float = KERNEL_MM, threshold_hu: float = THRESHOLD_HU
) -> dict[str, float | int]:
    """Write ``target``: ``source`` with the rule after its output (same input and output names and shapes)."""
    import onnx
    from onnx import TensorProto, helper

    spec = common.spec()
    layout = spec.model.input.layout
    if layout != "NCXYZ" or spec.model.output.layout != "NCXYZ" or spec.model.output_channels != 2:
        raise ValueError(f"the rule expects NCXYZ in and out with 2 channels, the spec says {layout}")
    window = spec.pre.intensity
    threshold = (threshold_hu - window.a_min) / (window.a_max - window.a_min) * (window.b_max - window.b_min)
    threshold += window.b_min
    sx, sy, _sz = spec.pre.spacing_mm
    kx, ky = (max(1, 2 * round(kernel_mm / s / 2 - 0.5) + 1) for s in (sx, sy))  # odd, about kernel_mm wide

    model = onnx.load(str(source))
    graph = model.graph
    if any(init.name == "rule_threshold" for init in graph.initializer):
        raise ValueError(f"{source} already ends in the consolidation rule")
    in_name, out_name = graph.input[0].name, graph.output[0].name
    raw = out_name + "_network"
    for node in graph.node:
        node.output[:] = [raw if o == out_name else o for o in node.output]

    def pool(op: str, x: str, y: str, k: tuple[int, int, int], **kw: int) -> onnx.NodeProto:
        pads = [v // 2 for v in k] * 2
        return helper.make_node(op, [x], [y], kernel_shape=list(k), pads=pads, strides=[1, 1, 1], **kw)

    opening = (kx, ky, 1)
    nodes = [
        pool("AveragePool", in_name, "rule_mean", (3, 3, 1), count_include_pad=0),
        helper.make_node("Greater", ["rule_mean", "rule_threshold"], ["rule_dense_b"]),
        helper.make_node("Cast", ["rule_dense_b"], ["rule_dense"], to=TensorProto.FLOAT),
        helper.make_node("Neg", ["rule_dense"], ["rule_neg"]),
        pool("MaxPool", "rule_neg", "rule_neg_max", opening),
        helper.make_node("Neg", ["rule_neg_max"], ["rule_eroded"]),
        pool("MaxPool", "rule_eroded", "rule_core", opening),
        helper.make_node("Mul", ["rule_core", "rule_penalty"], ["rule_delta"]),
        helper.make_node("Add", [raw, "rule_delta"], [out_name]),
    ]
    graph.node.extend(nodes)
    graph.initializer.extend(
        [
            helper.make_tensor("rule_threshold", TensorProto.FLOAT, [], [float(threshold)]),
            helper.make_tensor(
                "rule_penalty", TensorProto.FLOAT, [1, 2, 1, 1, 1], np.array([0.0, -PENALTY], np.float32).tolist()
            ),
        ]
    )
    model.doc_string = (
        f"{model.doc_string} Consolidation rule (issue 17): channel 1 lowered by {PENALTY} where the 3x3 mean is "
        f"above {threshold_hu} HU after an in-plane opening of {kx}x{ky} voxels."
    ).strip()
    onnx.checker.check_model(model)
    onnx.save(model, str(target))
    return {"kernel_voxels": kx, "threshold_normalised": round(float(threshold), 6), "penalty": PENALTY}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path)
    ap.add_argument("target", type=Path)
    ap.add_argument("--kernel-mm", type=float, default=KERNEL_MM)
    ap.add_argument("--threshold-hu", type=float, default=THRESHOLD_HU)
    args = ap.parse_args()
    print(append_rule(args.source, args.target, args.kernel_mm, args.threshold_hu))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
