"""ONNX Runtime in-process backend: the same ONNX file Triton serves, for machines without Triton."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from inference.errors import BackendUnavailable, ModelMismatch
from inference.spec import InferenceSpec

_ORT_TYPES = {"FP32": "tensor(float)", "FP16": "tensor(float16)"}
_NP_TYPES = {"FP32": np.float32, "FP16": np.float16}


class OnnxRuntimeBackend:
    """Runs ``model_path`` with ONNX Runtime on the CPU. The session is created on first use (or by check())."""

    name = "onnxruntime"
    max_in_flight = 1
    """One session already uses every core; concurrent runs would only contend."""

    def __init__(self, spec: InferenceSpec, model_path: Path, intra_op_threads: int = 0) -> None:
        self.spec = spec
        self.model_path = Path(model_path)
        self.intra_op_threads = intra_op_threads
        self._session: Any = None
        self._lock = threading.Lock()
        self._checked = False

    def _open(self) -> Any:
        with self._lock:
            if self._session is not None:
                return self._session
            try:
                import onnxruntime as ort
            except ImportError as exc:  # pragma: no cover - a declared dependency
                raise BackendUnavailable(f"onnxruntime: cannot import the runtime: {exc}") from exc
            if not self.model_path.is_file():
                raise ModelMismatch(f"{self.model_path}: model file not found")
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            # The memory-pattern planner grows the arena again on the second run of a shape (about +300 MB for two
            # 224 x 224 x 32 windows) for no measurable speed; without it the working set is stable after one run.
            options.enable_mem_pattern = False
            if self.intra_op_threads > 0:
                options.intra_op_num_threads = self.intra_op_threads
            options.log_severity_level = 3
            try:
                self._session = ort.InferenceSession(
                    str(self.model_path), sess_options=options, providers=["CPUExecutionProvider"]
                )
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ModelMismatch(f"{self.model_path}: cannot load ONNX model: {first}") from exc
            return self._session

    def check(self) -> None:
        session = self._open()
        where = f"{self.model_path}"
        model = self.spec.model
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        if model.input.name not in inputs:
            raise ModelMismatch(
                f"{where}: model has no input {model.input.name!r} (it has {', '.join(sorted(inputs)) or 'none'})"
            )
        if model.output.name not in outputs:
            raise ModelMismatch(
                f"{where}: model has no output {model.output.name!r} (it has {', '.join(sorted(outputs)) or 'none'})"
            )
        for role, arg, tensor in (
            ("input", inputs[model.input.name], model.input),
            ("output", outputs[model.output.name], model.output),
        ):
            if len(arg.shape) != 5:
                raise ModelMismatch(
                    f"{where}: {role} {arg.name!r} has rank {len(arg.shape)} (shape {arg.shape}), "
                    f"the spec's layout {tensor.layout} needs rank 5"
                )
            if arg.type != _ORT_TYPES[tensor.datatype]:
                raise ModelMismatch(f"{where}: {role} {arg.name!r} is {arg.type}, the spec says {tensor.datatype}")
        in_channels = inputs[model.input.name].shape[1]
        if isinstance(in_channels, int) and in_channels != 1:
            raise ModelMismatch(f"{where}: input {model.input.name!r} has {in_channels} channels, expected 1 (CT)")
        out_channels = outputs[model.output.name].shape[1]
        if isinstance(out_channels, int) and out_channels != model.output_channels:
            raise ModelMismatch(
                f"{where}: output {model.output.name!r} has {out_channels} channels, "
                f"the spec says {model.output_channels}"
            )
        self._checked = True

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if not self._checked:
            self.check()
        model = self.spec.model
        feed = batch.astype(_NP_TYPES[model.input.datatype], copy=False)
        try:
            (out,) = self._session.run([model.output.name], {model.input.name: np.ascontiguousarray(feed)})
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelMismatch(
                f"{self.model_path}: inference on a batch of shape {tuple(batch.shape)} failed: {first}"
            ) from exc
        result: npt.NDArray[np.float32] = np.asarray(out).astype(np.float32, copy=False)
        return result

    def close(self) -> None:
        with self._lock:
            self._session = None
            self._checked = False
