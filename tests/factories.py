"""Build DICOM test series from the real scans in ``../shared/data``.

Pixel data always comes from a real volume (never invented); what these helpers add is the DICOM wrapping a
modality would write: one CT Image Storage file per slice with true geometry, in the transfer syntax a test asks
for. JPEG Lossless (process 14, SV1) is encoded by dcmtk's ``dcmcjpeg`` (pydicom has no encoder for it);
RLE, JPEG-LS and JPEG 2000 by pydicom's own encoders.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import random
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

DCMCJPEG = "/usr/bin/dcmcjpeg"
RESCALE_INTERCEPT = -1024.0


def derived_uid(*parts: object) -> str:
    """A UID that is the same on every run for the same parts, so tests are reproducible."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()
    return f"2.25.{int(digest[:30], 16)}"


@dataclass(frozen=True)
class WrittenSeries:
    """What a factory wrote: the files (in slice order), the UIDs, and the volume they came from."""

    files: tuple[Path, ...]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: tuple[str, ...]
    image: sitk.Image
    """The HU volume exactly as encoded (after integer rounding), LPS geometry."""


def read_volume(path: Path) -> sitk.Image:
    """Read a NRRD/NIfTI/MHD volume as int16 HU."""
    return sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkInt16)


def tall_volume(image: sitk.Image, slices: int) -> sitk.Image:
    """Make a volume of ``slices`` slices from ``image`` by mirroring it along z (real anatomy, continuous)."""
    arr = sitk.GetArrayFromImage(image)
    reps = [arr, arr[::-1]]
    out = np.concatenate([reps[k % 2] for k in range(-(-slices // arr.shape[0]))], axis=0)[:slices]
    tall = sitk.GetImageFromArray(np.ascontiguousarray(out))
    tall.SetSpacing(image.GetSpacing())
    tall.SetOrigin(image.GetOrigin())
    tall.SetDirection(image.GetDirection())
    return tall


def _ds(value: float) -> str:
    """The closest Decimal String (16 characters at most) to ``value``."""
    return str(format_number_as_ds(float(value)))


def _slice_dataset(
    image: sitk.Image,
    pixels: np.ndarray,
    k: int,
    *,
    study_uid: str,
    series_uid: str,
    for_uid: str,
    sop_uid: str,
    patient_id: str,
    patient_name: str,
    series_number: int,
    modality: str,
    image_type: Sequence[str],
) -> Dataset:
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = image.GetSpacing()
    origin = np.array(image.GetOrigin())
    position = origin + direction[:, 2] * spacing[2] * k
    now = _dt.datetime(2026, 11, 25, 9, 30, 0)

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(image_type)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.SeriesDate = ds.StudyDate
    ds.ContentDate = ds.StudyDate
    ds.StudyTime = now.strftime("%H%M%S")
    ds.SeriesTime = ds.StudyTime
    ds.ContentTime = ds.StudyTime
    ds.AccessionNumber = "ACC0001"
    ds.Modality = modality
    ds.Manufacturer = "dicom-node test factory"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Chest CT (test)"
    ds.SeriesDescription = "Axial 5mm (test)"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds(spacing[2])
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(position[2])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = f"{RESCALE_INTERCEPT:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    ds.PixelData = pixels.astype("<i2").tobytes()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def write_ct_series(
    image: sitk.Image,
    out_dir: Path,
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    tag: str = "series",
    shuffle: bool = False,
    seed: int = 0,
    patient_id: str = "TEST0001",
    patient_name: str = "Test^Chest",
    series_number: int = 2,
    modality: str = "CT",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
) -> WrittenSeries:
    """Write ``image`` (HU) as a CT series, one file per slice, named by SOP Instance UID.

    ``tag`` seeds the UIDs, so the same call writes the same UIDs every time; ``shuffle`` shuffles the order of
    the returned ``files`` (what a sender sends), while InstanceNumber and positions stay true.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    hu = np.clip(np.rint(sitk.GetArrayFromImage(image)), -32768 - RESCALE_INTERCEPT, 32767 + RESCALE_INTERCEPT)
    stored = (hu - RESCALE_INTERCEPT).astype(np.int16)
    study_uid = derived_uid(tag, "study")
    series_uid = derived_uid(tag, "series")
    for_uid = derived_uid(tag, "frame-of-reference")
    files: list[Path] = []
    sops: list[str] = []
    for k in range(stored.shape[0]):
        sop = derived_uid(tag, "instance", k)
        ds = _slice_dataset(
            image, stored[k], k, study_uid=study_uid, series_uid=series_uid, for_uid=for_uid, sop_uid=sop,
            patient_id=patient_id, patient_name=patient_name, series_number=series_number, modality=modality,
            image_type=image_type,
        )  # fmt: skip
        path = out_dir / f"{sop}.dcm"
        if transfer_syntax in (RLELossless, JPEGLSLossless, JPEG2000Lossless):
            ds.compress(transfer_syntax, generate_instance_uid=False)
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        sops.append(sop)
    if transfer_syntax == JPEGLosslessSV1:
        _dcmcjpeg_in_place(files)
    elif transfer_syntax not in (ExplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless):
        raise ValueError(f"factory cannot write transfer syntax {transfer_syntax}")
    encoded = sitk.GetImageFromArray((stored.astype(np.float32) + RESCALE_INTERCEPT).astype(np.int16))
    encoded.CopyInformation(image)
    order = list(range(len(files)))
    if shuffle:
        random.Random(seed).shuffle(order)
    return WrittenSeries(
        files=tuple(files[i] for i in order),
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        frame_of_reference_uid=for_uid,
        sop_instance_uids=tuple(sops),
        image=encoded,
    )


def _dcmcjpeg_in_place(files: Sequence[Path]) -> None:
    """JPEG Lossless, first-order prediction (process 14 SV1), through dcmtk."""
    for path in files:
        tmp = path.with_suffix(".jpll")
        subprocess.run([DCMCJPEG, "+e1", str(path), str(tmp)], check=True, capture_output=True)
        tmp.replace(path)


def fill_missing_uids(src_dir: Path, out_dir: Path, *, tag: str = "siemens-j2k") -> WrittenSeries:
    """Copy the Siemens JPEG 2000 series with its empty UIDs filled in, bytes of the pixel data untouched.

    The files carry their SOP class and instance UIDs only in the file meta; Study/Series UIDs are empty.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = derived_uid(tag, "study")
    series_uid = derived_uid(tag, "series")
    files: list[Path] = []
    sops: list[str] = []
    for src in sorted(p for p in src_dir.iterdir() if p.is_file()):
        ds = pydicom.dcmread(src)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        if not ds.get("FrameOfReferenceUID"):
            ds.FrameOfReferenceUID = derived_uid(tag, "frame-of-reference")
        if not ds.get("PatientID"):
            ds.PatientID = "J2K0001"
        if not ds.get("PatientName"):
            ds.PatientName = "Test^J2K"
        dst = out_dir / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(dst, enforce_file_format=True)
        files.append(dst)
        sops.append(str(ds.SOPInstanceUID))
    # Reference geometry from GDCM's own sorting by position, never from file-name order.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(out_dir), series_uid))
    image = reader.Execute()
    return WrittenSeries(
        files=tuple(files),
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        frame_of_reference_uid=str(pydicom.dcmread(files[0], stop_before_pixels=True).FrameOfReferenceUID),
        sop_instance_uids=tuple(sops),
        image=image,
    )


def copy_files(files: Sequence[Path], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(f, out_dir / f.name)) for f in files]


def new_uid() -> str:
    return str(generate_uid())
