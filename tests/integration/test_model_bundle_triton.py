"""The committed reference model served by a real tritonserver: the same file, shape (N, 2, X, Y, Z), finite
logits, softmax in [0, 1], and the same numbers as ONNX Runtime (tests/unit/test_model_bundle.py covers ONNX
Runtime alone)."""

from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import pytest

from inference.onnx_backend import OnnxRuntimeBackend
from inference.spec import InferenceSpec
from inference.triton_backend import TritonBackend
from inference.triton_server import ManagedTriton

pytestmark = pytest.mark.integration

COMMITTED = Path(__file__).resolve().parents[2] / "models" / "segmentation_ct_covid_lesion_v1" / "1" / "model.onnx"


def test_committed_model_through_triton(
    triton_server: ManagedTriton, inference_spec: InferenceSpec, model_repository: Path
) -> None:
    served = inference_spec.model.onnx_path(model_repository)
    assert COMMITTED.is_file() and filecmp.cmp(served, COMMITTED, shallow=False), "Triton must serve the committed file"
    batch = np.random.default_rng(5).random((2, 1, 64, 48, 16), dtype=np.float32)
    with TritonBackend(inference_spec, triton_server.grpc_url) as backend:
        backend.check()
        got = backend.infer(batch)
    assert got.shape == (2, 2, 64, 48, 16)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    e = np.exp(got - got.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    assert p.min() >= 0.0 and p.max() <= 1.0
    ort = OnnxRuntimeBackend(inference_spec, served)
    try:
        expected = ort.infer(batch)
    finally:
        ort.close()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
