"""Lung fields post-transform: the mask on a synthetic chest, the spec keys, and its effect inside segment()."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from inference.errors import SpecError
from inference.lung_fields import clear_outside, expand_blocks, lung_field_blocks
from inference.pipeline import segment
from inference.spec import LungFieldSpec, parse_spec

REPO = Path(__file__).resolve().parents[2]
SPEC = LungFieldSpec(max_hu=-200.0, min_volume_ml=20.0, block_mm=3.2, margin_mm=3.2)


def chest(spacing: tuple[float, float, float] = (0.8, 0.8, 5.0)) -> tuple[sitk.Image, dict[str, np.ndarray]]:
    """Air with a hazy blanket in it, a body, two lungs with a vessel, a subpleural GGO and enclosed bowel gas."""
    nz, ny, nx = 14, 320, 400
    z, y, x = np.ogrid[:nz, :ny, :nx]
    hu = np.full((nz, ny, nx), -1000.0, np.float32)
    body = ((x - 200) / 180.0) ** 2 + ((y - 170) / 130.0) ** 2 <= 1
    hu[np.broadcast_to(body, hu.shape)] = 40.0
    lungs = np.zeros(hu.shape, bool)
    for cx in (120, 280):
        lungs |= np.broadcast_to(((x - cx) / 60.0) ** 2 + ((y - 170) / 90.0) ** 2 <= 1, hu.shape) & (z >= 2)
    hu[lungs] = -850.0
    vessel = np.broadcast_to((x - 120) ** 2 + (y - 150) ** 2 <= 16, hu.shape) & lungs
    hu[vessel] = 40.0
    # ground glass against the lateral pleura of the left lung, at -350 HU (denser than max_hu would allow alone)
    ggo = np.broadcast_to((x - 66) ** 2 + (y - 170) ** 2 <= 20**2, hu.shape) & lungs & (z >= 5) & (z <= 8)
    hu[ggo] = -350.0
    blanket = np.broadcast_to((y < 30) & (x > 100) & (x < 300), hu.shape)  # haze outside the patient
    hu[blanket] = -600.0
    gas = np.broadcast_to((x - 200) ** 2 + (y - 285) ** 2 <= 8**2, hu.shape) & (z <= 1)  # a small enclosed pocket
    hu[gas] = -1000.0
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing(spacing)
    return img, {"lungs": lungs, "vessel": vessel, "ggo": ggo, "blanket": blanket, "gas": gas, "body": body}


def full_mask(img: sitk.Image, spec: LungFieldSpec = SPEC) -> np.ndarray:
    blocks, block = lung_field_blocks(img, spec)
    return expand_blocks(blocks, block, sitk.GetArrayViewFromImage(img).shape)


def test_mask_keeps_lungs_vessels_and_pleural_haze() -> None:
    img, parts = chest()
    mask = full_mask(img)
    assert mask.shape == parts["lungs"].shape and mask.dtype == np.bool_
    assert mask[parts["lungs"]].all(), "lung parenchyma, vessels and ground glass belong to the lung fields"
    assert mask[parts["vessel"]].all()
    assert mask[parts["ggo"]].all()
    assert not mask[parts["blanket"]].any(), "haze in the air around the patient is not lung"
    assert not mask[parts["gas"]].any(), "enclosed air smaller than min_volume_ml is not lung"
    # The margin is about 3 mm: the lung fields end within a few blocks of the pleura.
    outside = ~parts["lungs"] & ~mask
    assert outside.sum() > 0.9 * (~parts["lungs"]).sum()


def test_block_grid_expansion_covers_partial_blocks() -> None:
    img, _ = chest()
    blocks, (by, bx) = lung_field_blocks(img, SPEC)
    assert (by, bx) == (4, 4)
    shape = sitk.GetArrayViewFromImage(img).shape
    assert blocks.shape == (shape[0], shape[1] // 4, shape[2] // 4)
    odd = expand_blocks(blocks, (by, bx), (shape[0], shape[1] + 3, shape[2] + 2))
    assert odd.shape == (shape[0], shape[1] + 3, shape[2] + 2)
    assert np.array_equal(odd[:, -1], odd[:, -4])


def test_no_lung_no_labels() -> None:
    """A scan with no enclosed air (a head, an abdomen) has no lung fields: the mask is empty."""
    hu = np.full((6, 120, 120), 40.0, np.float32)
    hu[:, :10] = -1000.0
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing((0.8, 0.8, 5.0))
    assert not full_mask(img).any()


def spec_data(**lung_fields: Any) -> dict[str, Any]:
    data = json.loads((REPO / "config" / "config_inference.json").read_text())
    data["post_transforms"]["lung_fields"] = lung_fields
    return data


def test_bundled_spec_restricts_to_lung_fields() -> None:
    spec = parse_spec(json.loads((REPO / "config" / "config_inference.json").read_text()))
    assert spec.post.lung_fields == SPEC


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"max_hu": -200, "min_volume_ml": 20, "block_mm": 3.2}, "lung_fields.margin_mm: missing"),
        ({"max_hu": -200, "min_volume_ml": 20, "block_mm": 0, "margin_mm": 3}, "block_mm must be > 0"),
        ({"max_hu": -200, "min_volume_ml": 20, "block_mm": 3, "margin_mm": 3, "radius": 1}, "unknown keys radius"),
        ({"max_hu": "lung", "min_volume_ml": 20, "block_mm": 3, "margin_mm": 3}, "lung_fields"),
    ],
)
def test_bad_lung_fields_named(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec(spec_data(**keys))


class EverywhereBackend:
    """Ground glass everywhere: logits [0, 1] for every voxel."""

    name = "everywhere"

    def check(self) -> None:
        pass

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return np.concatenate([np.zeros_like(batch), np.ones_like(batch)], axis=1)

    def close(self) -> None:
        pass


def test_segment_keeps_labels_only_in_the_lung_fields() -> None:
    img, parts = chest()
    data = json.loads((REPO / "config" / "config_inference.json").read_text())
    data["inferer"].update({"roi_size": [96, 96, 16], "batch_size": 4})
    result = segment(img, parse_spec(data), EverywhereBackend())
    got = sitk.GetArrayFromImage(result.label).astype(bool)
    assert got[parts["lungs"]].all()
    assert not got[parts["blanket"]].any()
    assert not got[~np.broadcast_to(parts["body"], got.shape)].any()
    assert result.timings["lung_fields"] > 0
    data["post_transforms"].pop("lung_fields")
    assert sitk.GetArrayFromImage(segment(img, parse_spec(data), EverywhereBackend()).label).all()


@pytest.mark.parametrize("shape", [(3, 40, 48), (3, 42, 51), (2, 3, 3)])
def test_clear_outside_equals_expanded_mask(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(1)
    block = (4, 4)
    blocks = rng.random((shape[0], max(1, shape[1] // 4), max(1, shape[2] // 4))) < 0.5
    blocks[:, 0, 0] = True
    labels = rng.integers(0, 3, shape).astype(np.uint8)
    expected = labels * expand_blocks(blocks, block, shape)
    clear_outside(labels, blocks, block)
    assert np.array_equal(labels, expected)


def test_clear_outside_works_in_place_on_a_transposed_view() -> None:
    rng = np.random.default_rng(2)
    base = rng.integers(0, 2, (44, 40, 3)).astype(np.uint8)
    labels = base.transpose(2, 1, 0)  # (3, 40, 44), not C-contiguous
    blocks = rng.random((3, 10, 11)) < 0.5
    expected = labels * expand_blocks(blocks, (4, 4), labels.shape)
    clear_outside(labels, blocks, (4, 4))
    assert np.array_equal(labels, expected) and np.array_equal(base.transpose(2, 1, 0), expected)
