"""Triton python-backend model: runs ``model.onnx`` (beside this file) with ONNX Runtime.

The tritonserver the node starts itself (``dicom-node triton``, from the nvidia-pytriton wheel) has only the
python backend, so this file is what serves the model there. A stock Triton container serves the same folder
with its onnxruntime backend instead (``--model-config-name=onnxruntime``, see ``../configs/onnxruntime.pbtxt``)
and never loads this file.

Tensor names and the ONNX file name come from ``config.pbtxt``; this file hard-codes none of them. The requests
of one ``execute`` call (the dynamic batcher hands over what queued while the model was busy) that share a
window shape are concatenated and run as one ONNX Runtime call.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _parameter(config: dict[str, Any], key: str, default: str) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return default if value in (None, "") else str(value)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.model_name = config["name"]
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        onnx_file = _parameter(config, "onnx_file", "model.onnx")
        path = os.path.join(args["model_repository"], args["model_version"], onnx_file)
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"{self.model_name}: ONNX file {path} not found")
        options = ort.SessionOptions()
        threads = int(_parameter(config, "intra_op_threads", "0"))
        if threads > 0:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            device = int(args.get("model_instance_device_id", "0"))
            providers = [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]  # type: ignore[list-item]
        self.session = ort.InferenceSession(path, sess_options=options, providers=providers)
        onnx_inputs = {i.name: i for i in self.session.get_inputs()}
        onnx_outputs = {o.name for o in self.session.get_outputs()}
        if self.input_name not in onnx_inputs or self.output_name not in onnx_outputs:
            raise pb_utils.TritonModelException(
                f"{self.model_name}: config.pbtxt names input {self.input_name!r} and output {self.output_name!r}, "
                f"but {path} has inputs {sorted(onnx_inputs)} and outputs {sorted(onnx_outputs)}"
            )
        batch_dim = onnx_inputs[self.input_name].shape[0]
        # An ONNX file exported with a fixed batch of 1 is run one window at a time.
        self.fixed_batch_one = batch_dim == 1

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self.fixed_batch_one and batch.shape[0] > 1:
            feeds = ({self.input_name: batch[k : k + 1]} for k in range(len(batch)))
            parts = [self.session.run([self.output_name], feed)[0] for feed in feeds]
            return np.concatenate(parts, axis=0)
        out: np.ndarray = self.session.run([self.output_name], {self.input_name: batch})[0]
        return out

    def execute(self, requests: list[Any]) -> list[Any]:
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        responses: list[Any] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, a in enumerate(arrays):
            groups.setdefault(tuple(a.shape[1:]), []).append(k)
        for members in groups.values():
            try:
                batch = arrays[members[0]] if len(members) == 1 else np.concatenate([arrays[k] for k in members])
                result = self._run(np.ascontiguousarray(batch, dtype=np.float32))
            except Exception as exc:  # every request of the group gets the error, the model stays up
                error = pb_utils.TritonError(f"{self.model_name}: ONNX Runtime failed: {exc}")
                for k in members:
                    responses[k] = pb_utils.InferenceResponse(output_tensors=[], error=error)
                continue
            start = 0
            for k in members:
                n = arrays[k].shape[0]
                out = pb_utils.Tensor(self.output_name, np.ascontiguousarray(result[start : start + n]))
                responses[k] = pb_utils.InferenceResponse(output_tensors=[out])
                start += n
        return responses

    def finalize(self) -> None:
        self.session = None
