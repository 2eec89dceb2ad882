"""The bundled reference model (models/segmentation_ct_covid_lesion_v1/1/model.onnx) and the GGO simulator used to
train it (models/training/simulate.py).

Through Triton the same file is exercised by the integration tests that start tritonserver; here it goes through
ONNX Runtime, directly and through the node's own backend.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from inference.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
ONNX = REPO / "models" / "segmentation_ct_covid_lesion_v1" / "1" / "model.onnx"
sys.path.insert(0, str(REPO / "models" / "training"))

import simulate  # noqa: E402


@pytest.fixture(scope="module")
def spec():  # type: ignore[no-untyped-def]
    return load_spec(REPO / "config" / "config_inference.json")


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_committed_model_is_small_and_named(spec) -> None:  # type: ignore[no-untyped-def]
    import onnx

    assert ONNX.is_file(), f"{ONNX} is missing"
    assert ONNX.stat().st_size <= 25 * 1024 * 1024
    model = onnx.load(str(ONNX))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in model.graph.input] == [spec.model.input.name]
    assert [o.name for o in model.graph.output] == [spec.model.output.name]
    # The label definition of consolidation ends the graph (models/training/consolidation_rule.py, MODEL_CARD.md).
    assert {"rule_threshold", "rule_penalty"} <= {i.name for i in model.graph.initializer}
    assert model.graph.node[-1].op_type == "Add" and model.graph.node[-1].output[0] == spec.model.output.name


@pytest.mark.parametrize("shape", [(1, 1, 224, 224, 32), (2, 1, 64, 48, 16)])
def test_committed_model_through_onnxruntime(spec, shape) -> None:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(ONNX), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    (y,) = sess.run([spec.model.output.name], {spec.model.input.name: x})
    assert y.shape == (shape[0], 2, *shape[2:])  # N, 2, X, Y, Z
    assert y.dtype == np.float32
    assert np.isfinite(y).all()
    p = _softmax(y)
    assert p.min() >= 0.0 and p.max() <= 1.0


def test_committed_model_through_node_backend(spec) -> None:  # type: ignore[no-untyped-def]
    from inference.onnx_backend import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(spec, ONNX, intra_op_threads=2)
    try:
        backend.check()
        y = backend.infer(np.zeros((1, 1, 96, 96, 16), np.float32))
    finally:
        backend.close()
    assert y.shape == (1, 2, 96, 96, 16)
    assert np.isfinite(y).all()
    # Air everywhere (normalised 0.0) is no ground glass.
    assert (y[:, 1] <= y[:, 0]).all()


def _toy_chest() -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """A tiny chest: air, a soft-tissue body, two lungs at -850 HU with a vessel, a solid nodule (z,y,x)."""
    sp = (1.6, 1.6, 5.0)
    z, y, x = np.ogrid[:12, :128, :128]
    hu = np.full((12, 128, 128), -1000.0, np.float32)
    hu[np.broadcast_to(((x - 64) / 58.0) ** 2 + ((y - 64) / 45.0) ** 2 <= 1, hu.shape)] = 40.0
    lungs = np.zeros(hu.shape, bool)
    for cx in (38, 90):
        lungs |= np.broadcast_to(((x - cx) / 20.0) ** 2 + ((y - 64) / 32.0) ** 2 <= 1, hu.shape) & (z >= 1) & (z <= 10)
    hu[lungs] = -850.0 + np.random.default_rng(0).normal(0, 15, int(lungs.sum()))
    hu[np.broadcast_to((x - 38) ** 2 + (y - 60) ** 2 <= 4, hu.shape) & lungs] = 40.0  # a vessel along z
    nodule = np.broadcast_to((x - 92) ** 2 + (y - 50) ** 2 <= 25, hu.shape) & (z >= 4) & (z <= 6)
    hu[nodule] = 30.0
    return hu, nodule.copy(), sp


def test_simulated_ggo_stays_in_the_lungs() -> None:
    hu, nodule, sp = _toy_chest()
    lung = simulate.lung_mask(hu, sp)
    assert lung.sum() > 0.9 * (hu < -400).sum() - (hu == -1000).sum()
    out, label, lesions = simulate.insert_ggo(hu, sp, np.random.default_rng(3), 6, exclude=nodule)
    assert lesions and label.any()
    assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}
    assert not (label.astype(bool) & ~lung).any(), "GGO label outside the lung fields"
    assert not (label.astype(bool) & nodule).any(), "solid nodule labelled as GGO"
    changed = np.abs(out - hu) > 1e-3
    assert not (changed & ~lung).any(), "HU changed outside the lungs"
    assert not (changed & nodule).any()
    assert (out >= hu - 1e-3).all(), "GGO only raises attenuation"
    ggo = label.astype(bool) & (hu < -600)
    assert -800.0 <= float(np.median(out[ggo])) <= -250.0
    again, label2, _ = simulate.insert_ggo(hu, sp, np.random.default_rng(3), 6, exclude=nodule)
    assert np.array_equal(again, out) and np.array_equal(label2, label)


def test_phantom_is_a_plausible_chest() -> None:
    vol, nodules = simulate.make_phantom(np.random.default_rng(0))
    assert vol.dtype == np.float32 and vol.ndim == 3
    assert vol.min() >= -1024.0 and vol.max() <= 3071.0
    lung = simulate.lung_mask(vol, (0.8, 0.8, 5.0))
    lung_ml = lung.sum() * 0.8 * 0.8 * 5.0 / 1000.0
    assert 500.0 < lung_ml < 8000.0
    assert -900.0 < float(np.median(vol[lung])) < -700.0
    assert not (nodules & (vol < -500)).any() or nodules.sum() > 0
