"""MetaImage label and the publish folder: exact geometry, atomic writes, the Clara config.meta layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from inference.writers import OutputError, write_label, write_mhd, write_publish
from tests.unit.test_transforms import oblique_direction


def _label() -> sitk.Image:
    arr = (np.random.default_rng(0).random((7, 11, 13)) > 0.7).astype(np.uint8)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.1 + 0.2, 0.7, 5.000000001))
    img.SetOrigin((-123.45678901234568, 1 / 3, 2 / 7))
    img.SetDirection(oblique_direction())
    return img


def test_write_label_round_trips_exactly(tmp_path: Path) -> None:
    img = _label()
    header = write_label(img, tmp_path / "out", "lung1")
    assert header == tmp_path / "out" / "lung1.mhd"
    assert (tmp_path / "out" / "lung1.raw").stat().st_size == 7 * 11 * 13
    assert "ElementDataFile = lung1.raw" in header.read_text()
    back = sitk.ReadImage(str(header))
    assert back.GetPixelID() == sitk.sitkUInt8
    assert back.GetSize() == img.GetSize()
    assert back.GetSpacing() == img.GetSpacing()
    assert back.GetOrigin() == img.GetOrigin()
    assert back.GetDirection() == img.GetDirection()
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(img))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lung1.mhd", "lung1.raw"]  # no temp files


def test_header_matches_itk_writer(tmp_path: Path) -> None:
    """Same direction convention as ITK's own MetaImage writer (TransformMatrix is column by column)."""
    img = _label()
    sitk.WriteImage(img, str(tmp_path / "itk.mhd"))
    ours, _ = write_mhd(img, tmp_path / "ours.mhd")

    def field(text: str, key: str) -> list[float]:
        line = next(ln for ln in text.splitlines() if ln.startswith(key))
        return [float(v) for v in line.split("=")[1].split()]

    for key in ("TransformMatrix", "Offset", "ElementSpacing", "DimSize"):
        assert field(ours.read_text(), key) == field((tmp_path / "itk.mhd").read_text(), key)


def test_overwrite_replaces(tmp_path: Path) -> None:
    write_label(_label(), tmp_path, "x")
    img = sitk.Image(3, 3, 3, sitk.sitkUInt8)
    write_label(img, tmp_path, "x")
    assert sitk.ReadImage(str(tmp_path / "x.mhd")).GetSize() == (3, 3, 3)


def test_unwritable_output_is_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputError, match="cannot create output folder"):
        write_label(_label(), blocker / "sub", "x")


def test_publish_folder(tmp_path: Path, repo_root: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    vol = sitk.Image(13, 11, 7, sitk.sitkInt16)
    sitk.WriteImage(vol, str(src / "ct.mhd"))
    pub = tmp_path / "pub"
    meta = write_publish(
        pub,
        name="ct",
        label=_label(),
        original_files=[src / "ct.mhd", src / "ct.raw"],
        render_config=repo_root / "config" / "config_render.json",
        model_name="segmentation_ct_covid_lesion_v1",
    )
    assert sorted(p.name for p in pub.iterdir()) == [
        "config.meta",
        "config_render.json",
        "ct.mhd",
        "ct.output.mhd",
        "ct.output.raw",
        "ct.raw",
    ]
    assert json.loads(meta.read_text()) == {
        "density": "ct.mhd",
        "name": "segmentation_ct_covid_lesion_v1",
        "seg_masks": ["ct.output.mhd"],
        "settings": "config_render.json",
    }
    assert sitk.ReadImage(str(pub / "ct.mhd")).GetSize() == (13, 11, 7)  # the copy still finds its .raw
    assert (pub / "config_render.json").read_bytes() == (repo_root / "config" / "config_render.json").read_bytes()


def test_publish_dicom_writes_the_density_volume(tmp_path: Path, repo_root: Path) -> None:
    vol = sitk.Image(13, 11, 7, sitk.sitkInt16)
    write_publish(
        tmp_path,
        name="series",
        label=_label(),
        original_files=(),
        density_image=vol,
        render_config=repo_root / "config" / "config_render.json",
        model_name="m",
    )
    assert json.loads((tmp_path / "config.meta").read_text())["density"] == "series.mhd"
    assert sitk.ReadImage(str(tmp_path / "series.mhd")).GetPixelID() == sitk.sitkInt16
