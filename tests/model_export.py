"""Export a random-weight SegResNet to ONNX, as the node's model (tests and benchmarks only; needs torch + MONAI).

The architecture is the reference model's (MONAI SegResNet, 3-D, 1 -> 2 channels, init_filters 8, blocks_down
(1, 2, 2, 4), blocks_up (1, 1, 1)) with fixed-seed random weights: the node must not care which weights it runs.
Tensor names and layout follow config/config_inference.json: NV_MODEL_INPUT / NV_MODEL_OUTPUT, N, C, X, Y, Z,
with dynamic batch and spatial axes. Run as a script to write a file: ``python tests/model_export.py OUT.onnx``.
"""

from __future__ import annotations

import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO_ROOT / "models" / "segmentation_ct_covid_lesion_v1"
COMMITTED_ONNX = MODEL_DIR / "1" / "model.onnx"

INPUT_NAME = "NV_MODEL_INPUT"
OUTPUT_NAME = "NV_MODEL_OUTPUT"


def build_segresnet(seed: int = 0) -> Any:
    """The reference architecture with random weights from ``torch.manual_seed(seed)``, in eval mode.

    With MONAI's default GroupNorm: random BatchNorm statistics would be meaningless, and the node treats both alike.
    """
    import torch
    from monai.networks.nets import SegResNet

    torch.manual_seed(seed)
    net = SegResNet(
        spatial_dims=3, in_channels=1, out_channels=2, init_filters=8, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1)
    )
    return net.eval()


def export_onnx(net: Any, path: Path, sample_shape: tuple[int, ...] = (1, 1, 64, 64, 32)) -> Path:
    """torch.onnx.export with opset 17, the node's tensor names, dynamic batch and spatial axes."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {0: "batch", 2: "x", 3: "y", 4: "z"}
    tmp = path.with_name(path.name + ".tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        torch.onnx.export(
            net,
            (torch.zeros(sample_shape, dtype=torch.float32),),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
            opset_version=17,
            dynamo=False,
        )
    tmp.replace(path)
    return path


def export_random_segresnet(path: Path, seed: int = 0) -> Path:
    return export_onnx(build_segresnet(seed), path)


def model_onnx(path: Path) -> Path:
    """Put the model at ``path``: a copy of the committed ONNX when there is one, else the random SegResNet."""
    if COMMITTED_ONNX.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(COMMITTED_ONNX, path)
        return path
    return export_random_segresnet(path)


def build_model_repository(dest: Path) -> Path:
    """A Triton model repository at ``dest``: a copy of models/segmentation_ct_covid_lesion_v1/ plus
    ``1/model.onnx`` (committed or exported). Returns ``dest``."""
    model = dest / MODEL_DIR.name
    if MODEL_DIR.is_dir():
        shutil.copytree(MODEL_DIR, model, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
    onnx_path = model / "1" / "model.onnx"
    if not onnx_path.is_file():
        model_onnx(onnx_path)
    return dest


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("model.onnx")
    print(export_random_segresnet(out))
