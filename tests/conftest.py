"""Fixtures shared by the whole suite: where the real test data lives, and the repository root."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

    from inference.spec import InferenceSpec
    from inference.triton_server import ManagedTriton

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (override with DICOM_NODE_SHARED_DATA)."""
    path = Path(os.environ.get("DICOM_NODE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"shared test data not found at {path}")
    return path


@pytest.fixture(scope="session")
def inference_spec(repo_root: Path) -> InferenceSpec:
    """The project's config/config_inference.json, parsed."""
    from inference.spec import load_spec

    return load_spec(repo_root / "config" / "config_inference.json")


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Triton model repository in a temp folder: models/segmentation_ct_covid_lesion_v1/ copied, plus
    ``1/model.onnx`` (the committed model if there is one, else a fixed-seed random SegResNet exported to ONNX;
    see tests/model_export.py)."""
    from tests.model_export import build_model_repository

    return build_model_repository(tmp_path_factory.mktemp("model_repository"))


@pytest.fixture(scope="session")
def triton_server(model_repository: Path) -> Iterator[ManagedTriton]:
    """A real tritonserver (from the nvidia-pytriton wheel) on ``model_repository``, on free loopback ports,
    started once for the whole session. ``.grpc_url``, ``.http_url``, ``.startup_s`` (seconds until ready)."""
    import socket

    from inference.triton_server import ManagedTriton, TritonServerOptions

    sockets = [socket.socket() for _ in range(3)]
    for s in sockets:  # held open together, so the three ports differ
        s.bind(("127.0.0.1", 0))
    http, grpc, metrics = (int(s.getsockname()[1]) for s in sockets)
    for s in sockets:
        s.close()
    options = TritonServerOptions(http_port=http, grpc_port=grpc, metrics_port=metrics, startup_timeout_s=120.0)
    with ManagedTriton(model_repository, options) as server:
        yield server
