"""Finding and reading the one volume of a file-mode input folder, and its one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from inference.errors import InputVolumeError
from inference.volume_io import find_volume, read_volume, volume_stem


def _volume(size: tuple[int, int, int] = (6, 5, 4)) -> sitk.Image:
    arr = np.arange(np.prod(size), dtype=np.int16).reshape(size[::-1])
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((-10.25, 3.5, 100.125))
    return img


def _one_line_naming(exc: pytest.ExceptionInfo[InputVolumeError], path: Path, cause: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    assert str(path) in message
    assert cause in message


@pytest.mark.parametrize(
    ("name", "stem"),
    [("x.nii.gz", "x"), ("x.nii", "x"), ("a.b.mhd", "a.b"), ("scan.mha", "scan"), ("X.NII.GZ", "X"), ("v.nrrd", "v")],
)
def test_stem_rules(name: str, stem: str) -> None:
    assert volume_stem(Path(name)) == stem


@pytest.mark.parametrize("name", ["vol.nii.gz", "vol.nii", "vol.mhd", "vol.mha", "vol.nrrd"])
def test_reads_each_format(tmp_path: Path, name: str) -> None:
    img = _volume()
    sitk.WriteImage(img, str(tmp_path / name))
    vol = read_volume(tmp_path)
    assert vol.name == "vol"
    assert vol.image.GetSize() == img.GetSize()
    assert np.array_equal(sitk.GetArrayViewFromImage(vol.image), sitk.GetArrayViewFromImage(img))
    if name.endswith(".mhd"):
        assert [p.name for p in vol.files] == ["vol.mhd", "vol.raw"]
    else:
        assert [p.name for p in vol.files] == [name]


def test_hidden_files_are_ignored(tmp_path: Path) -> None:
    sitk.WriteImage(_volume(), str(tmp_path / "ct.nii.gz"))
    (tmp_path / ".DS_Store").write_bytes(b"junk")
    assert read_volume(tmp_path).name == "ct"


def test_dicom_series_folder(tmp_path: Path) -> None:
    img = _volume((8, 8, 5))
    series = tmp_path / "series1"
    series.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetSize()[2]):
        sl = img[:, :, k]
        sl.SetMetaData("0020|0032", "\\".join(str(v) for v in img.TransformIndexToPhysicalPoint((0, 0, k))))
        sl.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        sl.SetMetaData("0020|000e", "1.2.3.4.5")
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData("0008|0060", "CT")
        writer.SetFileName(str(series / f"{k:03d}.dcm"))
        writer.Execute(sl)
    path, kind = find_volume(tmp_path)
    assert (path, kind) == (series, "dicom")
    vol = read_volume(tmp_path)
    assert vol.name == "series1"
    assert vol.image.GetSize() == (8, 8, 5)
    assert len(vol.files) == 5


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InputVolumeError) as exc:
        read_volume(tmp_path / "nope")
    _one_line_naming(exc, tmp_path / "nope", "does not exist")


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(InputVolumeError) as exc:
        read_volume(tmp_path)
    _one_line_naming(exc, tmp_path, "empty")


def test_two_volumes(tmp_path: Path) -> None:
    sitk.WriteImage(_volume(), str(tmp_path / "a.nii.gz"))
    sitk.WriteImage(_volume(), str(tmp_path / "b.mhd"))
    with pytest.raises(InputVolumeError) as exc:
        read_volume(tmp_path)
    _one_line_naming(exc, tmp_path, "2 volumes")
    assert "a.nii.gz" in str(exc.value) and "b.mhd" in str(exc.value)


def test_no_volume_among_other_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputVolumeError) as exc:
        read_volume(tmp_path)
    _one_line_naming(exc, tmp_path, "no volume found")


@pytest.mark.parametrize("name", ["broken.nii.gz", "broken.nii", "broken.mha", "broken.nrrd"])
def test_unreadable_file(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"this is not an image at all\n" * 10)
    with pytest.raises(InputVolumeError) as exc:
        read_volume(tmp_path)
    _one_line_naming(exc, tmp_path / name, "unreadable")


@pytest.mark.parametrize("name", ["cut.nii", "cut.nii.gz", "cut.nrrd", "cut.mha"])
def test_truncated_file(tmp_path: Path, name: str) -> None:
    """ITK zero-fills a truncated NIfTI silently; the node must refuse it, never segment zeros."""
    img = sitk.GetImageFromArray(np.random.default_rng(0).integers(-1000, 500, (16, 64, 64), dtype=np.int16))
    sitk.WriteImage(img, str(tmp_path / name), useCompression=name.endswith(".gz"))
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(InputVolumeError) as exc:
        read_volume(tmp_path)
    _one_line_naming(exc, tmp_path / name, "unreadable")


def test_nifti_gz_intact_multi_member_is_accepted(tmp_path: Path) -> None:
    """A valid gzip of two members (its trailer counts only the last) is checked by decompressing, and passes."""
    import gzip

    sitk.WriteImage(_volume(), str(tmp_path / "plain.nii"))
    data = (tmp_path / "plain.nii").read_bytes()
    (tmp_path / "plain.nii").unlink()
    (tmp_path / "two.nii.gz").write_bytes(gzip.compress(data[:200]) + gzip.compress(data[200:]))
    assert read_volume(tmp_path).image.GetSize() == (6, 5, 4)


def test_mhd_with_missing_raw(tmp_path: Path) -> None:
    sitk.WriteImage(_volume(), str(tmp_path / "v.mhd"))
    (tmp_path / "v.raw").unlink()
    with pytest.raises(InputVolumeError) as exc:
        read_volume(tmp_path)
    _one_line_naming(exc, tmp_path / "v.mhd", "unreadable")


def test_2d_image(tmp_path: Path) -> None:
    sitk.WriteImage(sitk.Image(32, 32, sitk.sitkInt16), str(tmp_path / "slice.nii.gz"))
    with pytest.raises(InputVolumeError) as exc:
        read_volume(tmp_path)
    _one_line_naming(exc, tmp_path / "slice.nii.gz", "2-D")


def test_single_slice_volume(tmp_path: Path) -> None:
    sitk.WriteImage(sitk.Image(32, 32, 1, sitk.sitkInt16), str(tmp_path / "one.mha"))
    with pytest.raises(InputVolumeError) as exc:
        read_volume(tmp_path)
    _one_line_naming(exc, tmp_path / "one.mha", "3-D volume is required")


def test_vector_image(tmp_path: Path) -> None:
    sitk.WriteImage(sitk.Image([8, 8, 4], sitk.sitkVectorFloat32, 3), str(tmp_path / "rgb.mha"))
    with pytest.raises(InputVolumeError) as exc:
        read_volume(tmp_path)
    _one_line_naming(exc, tmp_path / "rgb.mha", "3 components")
