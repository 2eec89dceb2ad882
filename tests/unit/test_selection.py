"""Selection rules: each rule passes a real series and fails a modified one with a reason naming the series."""

from __future__ import annotations

import math
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.errors import Rejected
from dicom_node.series.selection import select_headers, select_series
from dicom_node.settings import SelectionSection
from dicom_node.types import InstanceRecord, SeriesManifest
from tests.factories import read_volume, write_ct_series

RULES = SelectionSection()


@pytest.fixture(scope="module")
def series(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[Path]]:
    image = read_volume(shared_data / "chest_ct_volumes" / "lung1_image.nrrd")[:, :, :10]
    written = write_ct_series(image, tmp_path_factory.mktemp("sel"), tag="selection")
    return written.series_instance_uid, list(written.files)


def _headers(files: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def _manifest(files: list[Path]) -> SeriesManifest:
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    records = tuple(
        InstanceRecord(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID), str(ds.SOPClassUID),
                       str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), "1.2.840.10008.1.2.1", f, 1, "A", "a", 0.0)
        for f in files
    )  # fmt: skip
    return SeriesManifest(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), records)


def test_real_series_is_selected(series: tuple[str, list[Path]]) -> None:
    uid, files = series
    decision = select_series(_manifest(files), RULES)
    assert decision.selected and decision.rule is None and decision.reason == ""
    assert decision.series_instance_uid == uid


def test_modality(series: tuple[str, list[Path]]) -> None:
    uid, files = series
    headers = _headers(files)
    headers[3].Modality = "MR"
    d = select_headers(uid, headers, RULES)
    assert (d.selected, d.rule) == (False, "modality")
    assert d.reason.startswith(f"series {uid}: modality MR is not in [CT]")


def test_image_type(series: tuple[str, list[Path]]) -> None:
    uid, files = series
    headers = _headers(files)
    headers[0].ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    d = select_headers(uid, headers, RULES)
    assert d.rule == "image_type"
    assert "ImageType DERIVED\\SECONDARY\\AXIAL does not start with ORIGINAL\\PRIMARY" in d.reason
    assert select_headers(uid, headers, SelectionSection(image_type=())).selected


def test_not_axial(series: tuple[str, list[Path]]) -> None:
    uid, files = series
    headers = _headers(files)
    t = math.radians(40)
    for ds in headers:
        ds.ImageOrientationPatient = [1, 0, 0, 0, math.cos(t), -math.sin(t)]
    d = select_headers(uid, headers, RULES)
    assert d.rule == "axial"
    assert "40.0 deg from the head-foot axis (tolerance 30 deg)" in d.reason
    assert select_headers(uid, headers, SelectionSection(axial_tolerance_deg=45)).selected


def test_coronal_is_not_axial(series: tuple[str, list[Path]]) -> None:
    uid, files = series
    headers = _headers(files)
    for ds in headers:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    assert select_headers(uid, headers, RULES).rule == "axial"


def test_min_slices(series: tuple[str, list[Path]]) -> None:
    uid, files = series
    d = select_headers(uid, _headers(files[:5]), RULES)
    assert d.rule == "min_slices"
    assert d.reason == f"series {uid}: 5 slices, fewer than the 8 required"


def test_min_slices_counts_enhanced_ct_frames(shared_data: Path) -> None:
    ds = pydicom.dcmread(shared_data / "enhanced_ct" / "eCT_Supplemental.dcm", stop_before_pixels=True)
    rules = SelectionSection(image_type=(), min_slices=2)
    assert select_headers("x", [ds], rules).selected
    assert select_headers("x", [ds], SelectionSection(image_type=(), min_slices=3)).reason == (
        "series x: 2 slices, fewer than the 3 required"
    )


def test_uniform_size(series: tuple[str, list[Path]]) -> None:
    uid, files = series
    headers = _headers(files)
    headers[7].PixelSpacing = ["0.7", "0.7"]
    d = select_headers(uid, headers, RULES)
    assert d.rule == "uniform"
    assert "Rows/Columns/PixelSpacing differ" in d.reason and "0.7x0.7" in d.reason
    headers = _headers(files)
    headers[2].Rows = 256
    assert select_headers(uid, headers, RULES).rule == "uniform"


def test_first_failed_rule_wins(series: tuple[str, list[Path]]) -> None:
    uid, files = series
    headers = _headers(files[:3])
    headers[0].Modality = "PT"
    assert select_headers(uid, headers, RULES).rule == "modality"


def test_unreadable_instance_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\x00" * 10)
    record = InstanceRecord("1.2.9", "1.2.840.10008.5.1.4.1.1.2", "1.2", "1.2.3", "1.2.840.10008.1.2.1", bad, 10,
                            "A", "a", 0.0)  # fmt: skip
    with pytest.raises(Rejected, match=r"series 1\.2\.3: instance 1\.2\.9 \(bad\.dcm\)"):
        select_series(SeriesManifest("1.2", "1.2.3", (record,)), RULES)


def test_selection_reads_no_pixels(series: tuple[str, list[Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    real = pydicom.dcmread

    def spy(*args: object, **kwargs: object) -> Dataset:
        calls.append(bool(kwargs.get("stop_before_pixels")))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pydicom, "dcmread", spy)
    assert select_series(_manifest(series[1]), RULES).selected
    assert calls and all(calls)
