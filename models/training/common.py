"""Shared by the training scripts: the model spec, the network, the model grid and intensity transforms, the data.

The transforms come from ``config/config_inference.json`` through ``inference.spec.load_spec``, the very file and
parser the node uses, so training and inference cannot drift apart. The resample and the intensity
window are the node's own functions (``inference.transforms``), so the network is trained on exactly what the node
will feed it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from inference.spec import InferenceSpec, load_spec
from inference.transforms import normalise_intensity, resample_to_spacing

REPO = Path(__file__).resolve().parents[2]
SPEC_PATH = REPO / "config" / "config_inference.json"
DATA = Path(__import__("os").environ.get("DICOM_NODE_SHARED_DATA", REPO.parent / "shared" / "data"))
CHEST = DATA / "chest_ct_volumes"
TRAIN_BACKGROUND = "lung1"
HELDOUT_BACKGROUND = "lung2"


def spec() -> InferenceSpec:
    return load_spec(SPEC_PATH)


NORMS = ("batch", "group")


INIT_FILTERS = (8, 16)


def make_net(norm: str = "batch", init_filters: int = 8):  # type: ignore[no-untyped-def]
    """The reference SegResNet. ``norm="batch"`` (the default since the second model) normalises with statistics
    learnt in training, so a voxel's features do not depend on what else is in the window; MONAI's default
    ``"group"`` normalises each window by its own content, which made the 224x224x32 inference windows (lots of
    body and mediastinum) behave unlike the 96x96x16 training patches (mostly lung). ``init_filters``: 8 or 16, the
    widths the issue allows (16: four times the weights, about 2.5x the inference compute)."""
    from monai.networks.nets import SegResNet

    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if init_filters not in INIT_FILTERS:
        raise ValueError(f"init_filters must be one of {INIT_FILTERS}, got {init_filters!r}")
    return SegResNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        init_filters=init_filters,
        blocks_down=(1, 2, 2, 4),
        blocks_up=(1, 1, 1),
        norm=("BATCH", {}) if norm == "batch" else ("GROUP", {"num_groups": 8}),
    )


def to_model_grid(img: sitk.Image, s: InferenceSpec, label: bool = False) -> sitk.Image:
    """Resample a CT (or a label with ``label=True``) onto the model's grid, with the node's own resample."""
    return resample_to_spacing(img, s.pre.spacing_mm, "nearest" if label else s.pre.interpolation)


def normalise(hu: np.ndarray, s: InferenceSpec) -> np.ndarray:
    """HU -> network input, with the node's own intensity transform (a float32 copy)."""
    return normalise_intensity(np.array(hu, dtype=np.float32, copy=True), s.pre.intensity)


def load_real(name: str) -> tuple[sitk.Image, np.ndarray]:
    """A real chest CT (float32 HU image) and its solid-lesion mask (bool, z,y,x): NOT ground glass."""
    img = sitk.Cast(sitk.ReadImage(str(CHEST / f"{name}_image.nrrd")), sitk.sitkFloat32)
    solid = sitk.GetArrayFromImage(sitk.ReadImage(str(CHEST / f"{name}_label.nrrd"))) > 0
    return img, solid


def with_array(arr: np.ndarray, like: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(like)
    return out
