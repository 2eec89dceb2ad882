"""ONNX Runtime backend: runs the exported model, and refuses a model that does not match the spec."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from inference.errors import ModelMismatch
from inference.onnx_backend import OnnxRuntimeBackend
from inference.spec import InferenceSpec

torch = pytest.importorskip("torch")


def _onnx(repo: Path, spec: InferenceSpec) -> Path:
    return spec.model.onnx_path(repo)


def test_runs_the_model(model_repository: Path, inference_spec: InferenceSpec) -> None:
    backend = OnnxRuntimeBackend(inference_spec, _onnx(model_repository, inference_spec), intra_op_threads=1)
    backend.check()
    out = backend.infer(np.zeros((2, 1, 32, 24, 16), dtype=np.float32))
    assert out.shape == (2, 2, 32, 24, 16) and out.dtype == np.float32
    backend.close()
    backend.close()


def test_missing_model_names_the_path(tmp_path: Path, inference_spec: InferenceSpec) -> None:
    path = tmp_path / "nope" / "model.onnx"
    with pytest.raises(ModelMismatch) as exc:
        OnnxRuntimeBackend(inference_spec, path).check()
    assert str(path) in str(exc.value) and "not found" in str(exc.value)


def test_corrupt_model(tmp_path: Path, inference_spec: InferenceSpec) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not a protobuf")
    with pytest.raises(ModelMismatch, match="cannot load ONNX model"):
        OnnxRuntimeBackend(inference_spec, path).check()


def _with(spec: InferenceSpec, **model: object) -> InferenceSpec:
    return dataclasses.replace(spec, model=dataclasses.replace(spec.model, **model))  # type: ignore[arg-type]


def test_wrong_input_name(model_repository: Path, inference_spec: InferenceSpec) -> None:
    spec = _with(inference_spec, input=dataclasses.replace(inference_spec.model.input, name="INPUT__0"))
    with pytest.raises(ModelMismatch, match="no input 'INPUT__0' \\(it has NV_MODEL_INPUT\\)"):
        OnnxRuntimeBackend(spec, _onnx(model_repository, inference_spec)).check()


def test_wrong_output_name(model_repository: Path, inference_spec: InferenceSpec) -> None:
    spec = _with(inference_spec, output=dataclasses.replace(inference_spec.model.output, name="OUT"))
    with pytest.raises(ModelMismatch, match="no output 'OUT'"):
        OnnxRuntimeBackend(spec, _onnx(model_repository, inference_spec)).check()


def test_wrong_datatype(model_repository: Path, inference_spec: InferenceSpec) -> None:
    spec = _with(inference_spec, input=dataclasses.replace(inference_spec.model.input, datatype="FP16"))
    with pytest.raises(ModelMismatch, match="tensor\\(float\\), the spec says FP16"):
        OnnxRuntimeBackend(spec, _onnx(model_repository, inference_spec)).check()


def test_wrong_channel_count(model_repository: Path, inference_spec: InferenceSpec) -> None:
    spec = _with(inference_spec, output_channels=3)
    with pytest.raises(ModelMismatch, match="has 2 channels, the spec says 3"):
        OnnxRuntimeBackend(spec, _onnx(model_repository, inference_spec)).check()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_wrong_rank(tmp_path: Path, inference_spec: InferenceSpec) -> None:
    net = torch.nn.Conv2d(1, 2, 3, padding=1)
    path = tmp_path / "model2d.onnx"
    torch.onnx.export(
        net,
        (torch.zeros(1, 1, 8, 8),),
        str(path),
        input_names=["NV_MODEL_INPUT"],
        output_names=["NV_MODEL_OUTPUT"],
        opset_version=17,
        dynamo=False,
    )
    with pytest.raises(ModelMismatch, match="rank 4"):
        OnnxRuntimeBackend(inference_spec, path).check()
