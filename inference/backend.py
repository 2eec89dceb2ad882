"""The contract every inference backend fulfils (Triton, ONNX Runtime).

A backend runs the raw network on a batch of windows: it owns no sliding window, blending or activation, which
are ours and shared (inference.sliding_window, inference.pipeline). Backends are chosen explicitly by config;
a failing backend raises, it never falls through to another one mid-job.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt


@runtime_checkable
class Backend(Protocol):
    """Runs the model on a batch laid out as the spec's input layout says (N, C, spatial...)."""

    name: str

    def check(self) -> None:
        """Verify the model is loaded and its tensor names, shapes and types match the spec.

        Raises BackendUnavailable (cannot reach it) or ModelMismatch (reached, but wrong model).
        """

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Run one batch; returns the raw network output (N, channels, spatial...) as float32."""

    def close(self) -> None:
        """Release connections, sessions and shared memory. Idempotent."""
