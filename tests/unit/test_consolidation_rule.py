"""The consolidation rule appended to an exported model (models/training/consolidation_rule.py, issue 17's label
definition: a consolidated core denser than -300 HU is background), on a stand-in network whose logits are known."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TRAINING = Path(__file__).resolve().parents[2] / "models" / "training"


def _rule():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(TRAINING))
    try:
        import consolidation_rule
    finally:
        sys.path.remove(str(TRAINING))
    return consolidation_rule


def _stand_in(path: Path) -> None:
    """A 'network' whose logits are (0, 1) everywhere: every voxel ground glass, by a margin of 1."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("NV_MODEL_INPUT", TensorProto.FLOAT, ["batch", 1, "x", "y", "z"])
    y = helper.make_tensor_value_info("NV_MODEL_OUTPUT", TensorProto.FLOAT, ["batch", 2, "x", "y", "z"])
    nodes = [
        helper.make_node("Mul", ["NV_MODEL_INPUT", "zero"], ["zeros"]),
        helper.make_node("Add", ["zeros", "one"], ["ones"]),
        helper.make_node("Concat", ["zeros", "ones"], ["NV_MODEL_OUTPUT"], axis=1),
    ]
    inits = [
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "stand_in", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    onnx.save(model, str(path))


def _hu(value: float) -> float:
    return (value + 1000.0) / 1500.0  # the bundled spec's window, -1000..500 HU -> 0..1


def test_a_dense_core_is_background_and_vessels_and_septa_are_not(tmp_path: Path) -> None:
    rule = _rule()
    _stand_in(tmp_path / "net.onnx")
    info = rule.append_rule(tmp_path / "net.onnx", tmp_path / "ruled.onnx")
    assert info["kernel_voxels"] == 7  # 5.6 mm at 0.8 mm
    x = np.full((1, 1, 64, 64, 8), _hu(-650.0), np.float32)  # ground glass
    x[0, 0, 10:30, 10:30, 2:6] = _hu(0.0)  # a 16 mm consolidated core
    x[0, 0, 40:43, 5:60, :] = _hu(40.0)  # a 2.4 mm vessel through the haze
    x[0, 0, 50, 5:60, :] = _hu(-100.0)  # a 0.8 mm septum
    sess = ort.InferenceSession(str(tmp_path / "ruled.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"NV_MODEL_INPUT": x})[0]
    assert out.shape == (1, 2, 64, 64, 8)
    np.testing.assert_array_equal(out[:, 0], 0.0)  # background logit untouched
    ggo = out[0, 1] > out[0, 0]
    core = ggo[10:30, 10:30, 2:6]
    assert core.sum() == 4 * 4  # the core is background but for its four corners (their 3 x 3 mean is haze)
    assert ggo[40:43].all() and ggo[50].all()  # vessel and septum stay ground glass
    assert ggo.sum() == ggo.size - 20 * 20 * 4 + 4 * 4  # and nothing else changed
    with pytest.raises(ValueError, match="already"):
        rule.append_rule(tmp_path / "ruled.onnx", tmp_path / "twice.onnx")
