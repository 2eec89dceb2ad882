"""Volume reconstruction on real series: every syntax, shuffled order, geometry policies, codecs, Enhanced CT."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from dicom_node.errors import Rejected
from dicom_node.file_mode import read_dicom_folder
from dicom_node.series.reconstruct import reconstruct
from dicom_node.settings import ReconstructionSection
from dicom_node.types import CTVolume, InstanceRecord, SeriesManifest
from tests.factories import DCMCJPEG, WrittenSeries, copy_files, fill_missing_uids, read_volume, write_ct_series

DEFAULT = ReconstructionSection()


def manifest_of(files: Sequence[Path]) -> SeriesManifest:
    """A SeriesManifest as the receiver would build it, from files on disk (in the order given)."""
    records = []
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        records.append(
            InstanceRecord(
                sop_instance_uid=str(ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID),
                sop_class_uid=str(ds.get("SOPClassUID") or ds.file_meta.MediaStorageSOPClassUID),
                study_instance_uid=str(ds.get("StudyInstanceUID") or ""),
                series_instance_uid=str(ds.get("SeriesInstanceUID") or ""),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                path=Path(path),
                size=Path(path).stat().st_size,
                calling_ae_title="TEST",
                association_id="a1",
                received_at=1000.0 + k,
            )
        )
    first = records[0]
    return SeriesManifest(first.study_instance_uid, first.series_instance_uid, tuple(records))


def assert_same_geometry(actual: sitk.Image, expected: sitk.Image) -> None:
    assert actual.GetSize() == expected.GetSize()
    np.testing.assert_allclose(actual.GetSpacing(), expected.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(actual.GetOrigin(), expected.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(actual.GetDirection(), expected.GetDirection(), atol=1e-4)


def assert_equals_source(volume: CTVolume, written: WrittenSeries) -> None:
    assert volume.image.GetPixelID() == sitk.sitkFloat32
    assert_same_geometry(volume.image, written.image)
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(volume.image), sitk.GetArrayViewFromImage(written.image).astype(np.float32)
    )
    assert volume.series_instance_uid == written.series_instance_uid
    assert volume.frame_of_reference_uid == written.frame_of_reference_uid
    # Files are named by the factory's UIDs in slice order (pydicom's compress() may give the dataset a new one).
    folder = written.files[0].parent
    expected = [str(pydicom.dcmread(folder / f"{uid}.dcm", stop_before_pixels=True).SOPInstanceUID)
                for uid in written.sop_instance_uids]  # fmt: skip
    assert [s.sop_instance_uid for s in volume.sources] == expected
    assert [s.path.name for s in volume.sources] == [f"{uid}.dcm" for uid in written.sop_instance_uids]
    assert volume.resampled == ()


@pytest.fixture(scope="module")
def lung1(shared_data: Path) -> sitk.Image:
    return read_volume(shared_data / "chest_ct_volumes" / "lung1_image.nrrd")


@pytest.fixture(scope="module")
def lung1_explicit(lung1: sitk.Image, tmp_path_factory: pytest.TempPathFactory) -> WrittenSeries:
    return write_ct_series(lung1, tmp_path_factory.mktemp("explicit"), tag="recon-explicit", shuffle=True)


SYNTAXES = [ExplicitVRLittleEndian, JPEGLosslessSV1, RLELossless, JPEGLSLossless, JPEG2000Lossless]


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda s: pydicom.uid.UID(s).keyword)
def test_lung1_roundtrip_in_every_syntax(
    syntax: str, lung1: sitk.Image, lung1_explicit: WrittenSeries, tmp_path: Path
) -> None:
    if syntax == ExplicitVRLittleEndian:
        written = lung1_explicit
    else:
        if syntax == JPEGLosslessSV1 and not Path(DCMCJPEG).exists():
            pytest.skip("dcmtk's dcmcjpeg is not installed")
        written = write_ct_series(lung1, tmp_path, transfer_syntax=syntax, tag=f"recon-{syntax}", shuffle=True, seed=3)
    assert list(written.files) != sorted(written.files)  # really sent out of order
    volume = reconstruct(manifest_of(written.files), DEFAULT)
    assert_equals_source(volume, written)
    assert_same_geometry(volume.image, lung1)


def test_single_worker_gives_the_same_volume(lung1_explicit: WrittenSeries) -> None:
    volume = reconstruct(manifest_of(lung1_explicit.files), ReconstructionSection(decode_workers=1))
    assert_equals_source(volume, lung1_explicit)


def test_instance_number_is_ignored(lung1_explicit: WrittenSeries, tmp_path: Path) -> None:
    files = copy_files(lung1_explicit.files[:10], tmp_path)
    for path in files:  # scramble InstanceNumber: order must still come from positions
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = 1000 - int(ds.InstanceNumber) * 7 % 13
        ds.save_as(path)
    volume = reconstruct(manifest_of(files), DEFAULT)
    z = [float(pydicom.dcmread(s.path, stop_before_pixels=True).ImagePositionPatient[2]) for s in volume.sources]
    assert z == sorted(z)


def test_siemens_j2k_matches_simpleitk_reader(shared_data: Path, tmp_path: Path) -> None:
    written = fill_missing_uids(shared_data / "ct_siemens_j2k_20slices", tmp_path / "j2k")
    volume = reconstruct(manifest_of(written.files), DEFAULT)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "j2k")))
    expected = reader.Execute()
    assert_same_geometry(volume.image, expected)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(volume.image), sitk.GetArrayFromImage(expected))
    assert len(volume.sources) == 20


def test_read_dicom_folder(lung1_explicit: WrittenSeries, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    copy_files(lung1_explicit.files, folder / "sub")
    (folder / "notes.txt").write_text("not DICOM")
    assert_equals_source(read_dicom_folder(folder, DEFAULT), lung1_explicit)


def test_read_dicom_folder_refuses_two_series(lung1: sitk.Image, lung1_explicit: WrittenSeries, tmp_path: Path) -> None:
    copy_files(lung1_explicit.files[:3], tmp_path)
    write_ct_series(lung1[:, :, :3], tmp_path, tag="other-series")
    with pytest.raises(Rejected, match="holds 2 series"):
        read_dicom_folder(tmp_path, DEFAULT)


# -- codecs ---------------------------------------------------------------------------------------------------------

CODECS = {
    "693_J2KI.dcm": None,
    "693_J2KR.dcm": None,
    "693_UNCI.dcm": None,
    "693_UNCR.dcm": None,
    "CT_small.dcm": None,
    "bad_sequence.dcm": None,
    "explicit_VR-UN.dcm": None,
    "fodicom_CT1_J2KI.dcm": None,
    "fodicom_D_CLUNIE_CT1_RLE_FRAGS.dcm": None,
    "orthanc_Comunix_CT_J2K_1.dcm": None,
    "orthanc_Comunix_CT_J2K_2.dcm": None,
    "orthanc_TS_1.2.840.10008.1.2.1.99.dcm": None,
    "orthanc_TS_1.2.840.10008.1.2.4.70.dcm": None,
    "orthanc_TS_1.2.840.10008.1.2.4.91.dcm": None,
    "orthanc_ELSCINT1_PMSCT_RLE1_private.dcm": r"orthanc_ELSCINT1_PMSCT_RLE1_private\.dcm.*private ELSCINT1 "
    r"compression 'PMSCT_RLE1'.*Explicit VR Little Endian",
}


@pytest.mark.parametrize("name", sorted(CODECS))
def test_codec_table(name: str, shared_data: Path) -> None:
    path = shared_data / "codecs" / name
    expected_error = CODECS[name]
    if expected_error is not None:
        with pytest.raises(Rejected, match=expected_error):
            reconstruct(manifest_of([path]), DEFAULT)
        return
    volume = reconstruct(manifest_of([path]), DEFAULT)
    ds = pydicom.dcmread(path)
    reference = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(
        ds.get("RescaleIntercept", 0)
    )
    got = sitk.GetArrayFromImage(volume.image)[0]
    np.testing.assert_array_equal(got, reference.astype(np.float32))
    assert np.ptp(got) > 100  # a real image, not a constant


def test_lossless_j2k_equals_its_uncompressed_twin(shared_data: Path) -> None:
    a = reconstruct(manifest_of([shared_data / "codecs" / "693_J2KR.dcm"]), DEFAULT)
    b = reconstruct(manifest_of([shared_data / "codecs" / "693_UNCR.dcm"]), DEFAULT)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a.image), sitk.GetArrayViewFromImage(b.image))


def test_private_compression_in_a_series_fails_the_series(
    shared_data: Path, lung1_explicit: WrittenSeries, tmp_path: Path
) -> None:
    files = [*lung1_explicit.files[:4], shared_data / "codecs" / "orthanc_ELSCINT1_PMSCT_RLE1_private.dcm"]
    with pytest.raises(Rejected, match="ELSCINT1"):
        reconstruct(manifest_of(files), DEFAULT)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEGLosslessSV1], ids=["native", "jpeg-lossless"])
@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_pixel_data_is_rejected(syntax: str, keep: float, lung1: sitk.Image, tmp_path: Path) -> None:
    if syntax == JPEGLosslessSV1 and not Path(DCMCJPEG).exists():
        pytest.skip("dcmtk's dcmcjpeg is not installed")
    written = write_ct_series(lung1[:, :, 20:24], tmp_path, transfer_syntax=syntax, tag=f"trunc-{syntax}")
    victim = written.files[2]
    data = victim.read_bytes()
    victim.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(Rejected, match=rf"{victim.name}.*(truncated|cannot read)"):
        reconstruct(manifest_of(written.files), DEFAULT)


# -- geometry policies ---------------------------------------------------------------------------------------------


def test_missing_slice_reject(lung1_explicit: WrittenSeries) -> None:
    files = [f for f in lung1_explicit.files if f.name != f"{lung1_explicit.sop_instance_uids[20]}.dcm"]
    with pytest.raises(Rejected, match=r"1 missing slice.*uneven_spacing=reject"):
        reconstruct(manifest_of(files), ReconstructionSection(uneven_spacing="reject"))


def test_missing_slice_resample(lung1_explicit: WrittenSeries) -> None:
    files = [f for f in lung1_explicit.files if f.name != f"{lung1_explicit.sop_instance_uids[20]}.dcm"]
    volume = reconstruct(manifest_of(files), DEFAULT)
    assert_same_geometry(volume.image, lung1_explicit.image)
    got = sitk.GetArrayFromImage(volume.image)
    src = sitk.GetArrayFromImage(lung1_explicit.image).astype(np.float32)
    keep = [k for k in range(src.shape[0]) if k != 20]
    np.testing.assert_array_equal(got[keep], src[keep])
    np.testing.assert_allclose(got[20], (src[19] + src[21]) / 2, atol=1e-3)
    assert len(volume.sources) == 47
    assert any("missing slice" in note for note in volume.resampled)


def test_gap_wider_than_max_gap_is_rejected_even_when_resampling(lung1_explicit: WrittenSeries) -> None:
    gone = {f"{lung1_explicit.sop_instance_uids[k]}.dcm" for k in (20, 21, 22, 23)}
    files = [f for f in lung1_explicit.files if f.name not in gone]
    with pytest.raises(Rejected, match="max_gap_slices"):
        reconstruct(manifest_of(files), DEFAULT)


def _duplicate(written: WrittenSeries, k: int, tmp_path: Path, acquired: str) -> list[Path]:
    folder = written.files[0].parent
    files = copy_files([folder / f"{uid}.dcm" for uid in written.sop_instance_uids[:12]], tmp_path)
    source = next(f for f in files if f.name == f"{written.sop_instance_uids[k]}.dcm")
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.AcquisitionDateTime = acquired
    arr = ds.pixel_array
    arr[:] = arr[::-1]  # a different image at the same position (a re-scan)
    ds.PixelData = arr.tobytes()
    dup = tmp_path / "dup.dcm"
    ds.save_as(dup)
    return [*files, dup]


def test_duplicate_position_reject(lung1_explicit: WrittenSeries, tmp_path: Path) -> None:
    files = _duplicate(lung1_explicit, 5, tmp_path, "20300101120000")
    with pytest.raises(Rejected, match=r"2 instances at one position.*duplicate_positions=reject"):
        reconstruct(manifest_of(files), ReconstructionSection(duplicate_positions="reject"))


def test_duplicate_position_keeps_latest(lung1_explicit: WrittenSeries, tmp_path: Path) -> None:
    files = _duplicate(lung1_explicit, 5, tmp_path, "20300101120000")
    volume = reconstruct(manifest_of(files), DEFAULT)
    dup_uid = str(pydicom.dcmread(files[-1], stop_before_pixels=True).SOPInstanceUID)
    # The kept slice (the re-scan) lies at its position; the other slices are untouched.
    assert len(volume.sources) == 12
    assert dup_uid in [s.sop_instance_uid for s in volume.sources]
    assert lung1_explicit.sop_instance_uids[5] not in [s.sop_instance_uid for s in volume.sources]
    got = sitk.GetArrayFromImage(volume.image)
    src = sitk.GetArrayFromImage(lung1_explicit.image).astype(np.float32)
    k = [s.sop_instance_uid for s in volume.sources].index(dup_uid)
    np.testing.assert_array_equal(got[k], src[k][::-1])


def test_mixed_sizes_are_rejected(lung1: sitk.Image, lung1_explicit: WrittenSeries, tmp_path: Path) -> None:
    files = copy_files(lung1_explicit.files[:4], tmp_path)
    ds = pydicom.dcmread(files[0])
    ds.PixelSpacing = ["0.8", "0.8"]
    ds.save_as(files[0])
    with pytest.raises(Rejected, match="mixed slice sizes"):
        reconstruct(manifest_of(files), DEFAULT)


def test_mixed_orientations_are_rejected(lung1_explicit: WrittenSeries, tmp_path: Path) -> None:
    files = copy_files(lung1_explicit.files[:4], tmp_path)
    ds = pydicom.dcmread(files[0])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9, -0.43589]
    ds.save_as(files[0])
    with pytest.raises(Rejected, match="mixed slice orientations"):
        reconstruct(manifest_of(files), DEFAULT)


def test_oblique_regular_series_keeps_its_direction(lung1: sitk.Image, tmp_path: Path) -> None:
    rotation = sitk.Euler3DTransform((0, 0, 0), math.radians(20), math.radians(-10), math.radians(15))
    oblique = sitk.Image(lung1[:, :, 14:26])
    oblique.SetDirection(tuple(np.array(rotation.GetMatrix()).reshape(3, 3).ravel()))
    written = write_ct_series(oblique, tmp_path, tag="oblique", shuffle=True)
    volume = reconstruct(manifest_of(written.files), DEFAULT)
    assert_equals_source(volume, written)
    np.testing.assert_allclose(volume.image.GetDirection(), oblique.GetDirection(), atol=1e-4)


# -- gantry tilt ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tilt_files(shared_data: Path) -> list[Path]:
    files = sorted((shared_data / "ct_gantry_tilt_head").glob("*.dcm"))
    return [files[k] for k in (5, 0, 27, 14, 3, 9, 1, 2, 4, 6, 7, 8, 10, 11, 12, 13, *range(15, 27))]


def test_gantry_tilt_reject(tilt_files: list[Path]) -> None:
    with pytest.raises(Rejected, match=r"gantry tilt.*18\.5 deg.*gantry_tilt=reject"):
        reconstruct(manifest_of(tilt_files), ReconstructionSection(gantry_tilt="reject"))


def test_gantry_tilt_uneven_steps_reject(tilt_files: list[Path]) -> None:
    with pytest.raises(Rejected, match=r"uneven slice steps.*uneven_spacing=reject"):
        reconstruct(manifest_of(tilt_files), ReconstructionSection(uneven_spacing="reject"))


def _bilinear(hu: np.ndarray, r: float, c: float) -> float:
    r0, c0 = math.floor(r), math.floor(c)
    fr, fc = r - r0, c - c0
    return float(
        hu[r0, c0] * (1 - fr) * (1 - fc) + hu[r0, c0 + 1] * (1 - fr) * fc
        + hu[r0 + 1, c0] * fr * (1 - fc) + hu[r0 + 1, c0 + 1] * fr * fc
    )  # fmt: skip


def test_gantry_tilt_resample_gives_an_axial_grid(tilt_files: list[Path]) -> None:
    volume = reconstruct(manifest_of(tilt_files), DEFAULT)
    image = volume.image
    np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel(), atol=1e-6)
    np.testing.assert_allclose(image.GetSpacing(), (0.4882812, 0.4882812, 4.22), atol=1e-4)
    assert any("gantry tilt 18.5 deg" in note for note in volume.resampled)
    assert any("uneven slice steps" in note for note in volume.resampled)
    assert len(volume.sources) == 28
    # Known points: output voxel centres in the evenly stepped part (source slices 01-14, 4.22 mm along the table).
    # Each is checked against the source itself: the line through the point along the table axis meets the two
    # tilted source planes around it; bilinear in each, linear between them.
    slices = []
    for path in sorted(tilt_files)[:14]:
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        slices.append((np.array([float(v) for v in ds.ImagePositionPatient]), hu))
    first = pydicom.dcmread(tilt_files[0], stop_before_pixels=True)
    row = np.array([float(v) for v in first.ImageOrientationPatient[:3]])
    col = np.array([float(v) for v in first.ImageOrientationPatient[3:]])
    normal = np.cross(row, col)
    dy, dx = (float(v) for v in first.PixelSpacing)
    table = np.array([0.0, 0.0, 1.0])
    out = sitk.GetArrayViewFromImage(image)
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(2000):
        if checked == 25:
            break
        index = (int(rng.integers(100, 400)), int(rng.integers(100, 380)), int(rng.integers(0, image.GetSize()[2])))
        x = np.array(image.TransformIndexToPhysicalPoint(index))
        # distance along the table from x to each plane: (p_k - x).n / (table.n)
        d = np.array([(p - x) @ normal / (table @ normal) for p, _ in slices])
        k = int(np.searchsorted(d, 0.0)) - 1  # last plane below x (d < 0)
        if k < 0 or k >= len(slices) - 1:
            continue
        values = []
        for p, hu in (slices[k], slices[k + 1]):
            on_plane = x + table * ((p - x) @ normal / (table @ normal))
            rc = ((on_plane - p) @ col / dy, (on_plane - p) @ row / dx)
            values.append(_bilinear(hu, *rc))
        w = -d[k] / (d[k + 1] - d[k])
        expected = (1 - w) * values[0] + w * values[1]
        assert out[index[2], index[1], index[0]] == pytest.approx(expected, abs=0.05), index
        checked += 1
    assert checked == 25
    # Outside the sheared stack: air, not zeros.
    assert out[0, 0, 0] == -1024.0


# -- Enhanced CT ---------------------------------------------------------------------------------------------------


def test_enhanced_ct_geometry_from_functional_groups(shared_data: Path) -> None:
    path = shared_data / "enhanced_ct" / "eCT_Supplemental.dcm"
    volume = reconstruct(manifest_of([path]), DEFAULT)
    image = volume.image
    assert image.GetSize() == (512, 512, 2)
    np.testing.assert_allclose(image.GetSpacing(), (0.388672, 0.388672, 10.0), atol=1e-6)
    np.testing.assert_allclose(image.GetDirection(), (-1, 0, 0, 0, 1, 0, 0, 0, -1), atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), (99.5, -301.5, -149.0), atol=1e-6)  # frame 2 comes first
    assert [s.frame_number for s in volume.sources] == [2, 1]
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array.astype(np.float32) - 1024.0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected[::-1])


def test_unreadable_file_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "x.dcm"
    bad.write_bytes(b"not dicom at all")
    manifest = SeriesManifest(
        "1.2",
        "1.2.3",
        (
            InstanceRecord(
                "1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", "1.2", "1.2.3", "1.2.840.10008.1.2.1", bad, 16, "A", "a", 0.0
            ),
        ),
    )
    with pytest.raises(Rejected, match=r"series 1\.2\.3: instance 1\.2\.3\.4 \(x\.dcm\)"):
        reconstruct(manifest, DEFAULT)
