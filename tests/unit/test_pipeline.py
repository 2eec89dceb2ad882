"""segment(): layout handling, labels, geometry, timings, against a reference built from MONAI and SimpleITK."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from inference.errors import ModelMismatch, SpecError
from inference.pipeline import STAGES, segment
from inference.spec import InferenceSpec, parse_spec
from inference.transforms import resample_to_spacing, restore_labels
from tests.unit.test_transforms import ct_like, oblique_direction

torch = pytest.importorskip("torch")
monai_inferers = pytest.importorskip("monai.inferers")

REPO = Path(__file__).resolve().parents[2]


def small_spec(**changes: Any) -> InferenceSpec:
    data = json.loads((REPO / "config" / "config_inference.json").read_text())
    data["inferer"].update({"roi_size": [24, 20, 8], "batch_size": 3})
    data["post_transforms"].pop("lung_fields", None)  # the MONAI reference has no such step; tested on its own
    for path, value in changes.items():
        node = data
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return parse_spec(data)


class TorchBackend:
    """A small conv net in torch as a Backend (its spatial axes are whatever the layout says)."""

    name = "torch"

    def __init__(self, out_channels: int = 2, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Conv3d(1, 4, 3, padding=1),
            torch.nn.Tanh(),
            torch.nn.Conv3d(4, out_channels, (5, 3, 1), padding=(2, 1, 0)),
        ).eval()
        self.calls = 0

    def check(self) -> None:
        pass

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        with torch.no_grad():
            return self.net(torch.from_numpy(batch)).numpy()

    def close(self) -> None:
        pass


def reference_labels(image: sitk.Image, spec: InferenceSpec, backend: TorchBackend) -> np.ndarray:
    """resample -> ScaleIntensityRange -> MONAI sliding window in the model's layout -> activation -> restore."""
    res = resample_to_spacing(image, spec.pre.spacing_mm)
    arr = sitk.GetArrayFromImage(res)  # z, y, x
    it = spec.pre.intensity
    arr = np.clip((arr - it.a_min) / (it.a_max - it.a_min) * (it.b_max - it.b_min) + it.b_min, it.b_min, it.b_max)
    xyz = spec.model.input.layout == "NCXYZ"
    vol = arr.transpose(2, 1, 0) if xyz else arr
    roi = spec.inferer.roi_size if xyz else tuple(reversed(spec.inferer.roi_size))
    with torch.no_grad():
        out = monai_inferers.sliding_window_inference(
            torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))[None, None],
            roi,
            spec.inferer.batch_size,
            backend.net,
            overlap=spec.inferer.overlap,
            mode=spec.inferer.mode,
            sigma_scale=spec.inferer.sigma_scale,
        )
    if spec.post.activation == "softmax":
        lab = torch.argmax(torch.softmax(out, dim=1), dim=1)[0].numpy().astype(np.uint8)
    else:
        lab = (torch.sigmoid(out)[0, 0] >= spec.post.threshold).numpy().astype(np.uint8)
    if xyz:
        lab = lab.transpose(2, 1, 0)
    lab_img = sitk.GetImageFromArray(np.ascontiguousarray(lab))
    lab_img.CopyInformation(res)
    return sitk.GetArrayFromImage(restore_labels(lab_img, image))


@pytest.mark.parametrize("layout", ["NCXYZ", "NCZYX"])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_segment_equals_reference(layout: str, activation: str) -> None:
    channels = 2 if activation == "softmax" else 1
    spec = small_spec(
        model__input__layout=layout,
        model__output__layout=layout,
        model__output__channels=channels,
        post_transforms__activation=activation,
        post_transforms__threshold=0.53,
    )
    image = ct_like(size=(70, 41, 30), direction=oblique_direction())
    backend = TorchBackend(channels)
    result = segment(image, spec, backend)
    expected = reference_labels(image, spec, backend)
    got = sitk.GetArrayFromImage(result.label)
    assert result.label.GetSize() == image.GetSize()
    assert result.label.GetOrigin() == image.GetOrigin()
    assert result.label.GetSpacing() == image.GetSpacing()
    assert result.label.GetDirection() == image.GetDirection()
    assert result.label.GetPixelID() == sitk.sitkUInt8
    assert 0.02 < got.mean() < 0.98, "the test net should give both labels"
    # Equal up to float rounding at exact ties of the two logits.
    assert np.mean(got != expected) < 1e-4
    assert list(result.timings) == list(STAGES)
    assert result.timings["model_compute"] > 0
    assert backend.calls == -(-result.windows // spec.inferer.batch_size)


def test_layout_matters() -> None:
    """The same net run with the other layout gives other labels: the transposes are really exercised."""
    image = ct_like(size=(70, 41, 30))
    backend = TorchBackend()
    a = sitk.GetArrayFromImage(segment(image, small_spec(), backend).label)
    b = reference_labels(image, small_spec(model__input__layout="NCZYX", model__output__layout="NCZYX"), backend)
    assert np.mean(a != b) > 0.01


class ThresholdBackend:
    """Logits [0, x - 0.5]: label 1 where the normalised intensity is above 0.5, i.e. HU above -250."""

    name = "threshold"

    def check(self) -> None:
        pass

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return np.concatenate([np.zeros_like(batch), batch - 0.5], axis=1)

    def close(self) -> None:
        pass


def test_labels_land_where_the_anatomy_is() -> None:
    """A smooth phantom on an oblique grid: the mask matches thresholding the input itself."""
    size = (90, 70, 24)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in size[::-1]], indexing="ij")
    phantom = np.where((x / 0.7) ** 2 + ((y - 0.2) / 0.5) ** 2 + (z / 0.8) ** 2 < 1, 200, -900).astype(np.int16)
    image = sitk.GetImageFromArray(phantom)
    image.SetSpacing((0.7, 0.6, 2.5))
    image.SetOrigin((12.5, -40.0, 300.0))
    image.SetDirection(oblique_direction())
    spec = small_spec(pre_transforms__spacing_mm=[0.9, 0.8, 4.0])
    label = sitk.GetArrayFromImage(segment(image, spec, ThresholdBackend()).label)
    truth = (phantom > -250).astype(np.uint8)
    assert np.mean(label != truth) < 0.01


def test_label_values_come_from_the_spec() -> None:
    spec = small_spec(segments=[{"label": 7, "name": "GGO"}])
    label = sitk.GetArrayFromImage(segment(ct_like(size=(40, 30, 12)), spec, TorchBackend()).label)
    assert set(np.unique(label).tolist()) == {0, 7}


def test_three_class_softmax_uses_argmax() -> None:
    spec = small_spec(model__output__channels=3, segments=[{"label": 1, "name": "a"}, {"label": 2, "name": "b"}])
    image = ct_like(size=(40, 30, 12))
    backend = TorchBackend(3)
    got = sitk.GetArrayFromImage(segment(image, spec, backend).label)
    assert np.mean(got != reference_labels(image, spec, backend)) < 1e-4


def test_segments_must_match_channels() -> None:
    spec = small_spec(segments=[{"label": 1, "name": "a"}, {"label": 2, "name": "b"}])
    with pytest.raises(SpecError, match="segments"):
        segment(ct_like(size=(40, 30, 12)), spec, TorchBackend())


def test_wrong_output_channels_is_a_model_mismatch() -> None:
    with pytest.raises(ModelMismatch, match="3 channels"):
        segment(ct_like(size=(40, 30, 12)), small_spec(), TorchBackend(3))


def test_in_flight_gives_the_same_labels() -> None:
    image = ct_like(size=(70, 41, 30))
    backend = TorchBackend()
    a = segment(image, small_spec(), backend, max_in_flight=1)
    b = segment(image, small_spec(), backend, max_in_flight=3)
    assert np.array_equal(sitk.GetArrayViewFromImage(a.label), sitk.GetArrayViewFromImage(b.label))
    assert dataclasses.asdict(small_spec())["inferer"]["batch_size"] == 3
