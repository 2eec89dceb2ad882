"""Helpers for tests of the SEG the node writes: dciodvfy, a CTVolume for a factory series, and an independent
read-back of a SEG's frames by their own plane positions (highdicom reads, SimpleITK resamples)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.series.headers import source_frames
from dicom_node.types import CTVolume
from tests.factories import WrittenSeries

DCIODVFY = "/usr/bin/dciodvfy"
DCMCONV = "/usr/bin/dcmconv"


def dciodvfy_errors(path: Path, tmp_dir: Path) -> list[str]:
    """The "Error" lines dciodvfy reports for ``path`` (an Explicit VR LE copy when the file is Deflated)."""
    ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    target = path
    if ts != ExplicitVRLittleEndian:
        target = tmp_dir / f"{path.stem}.evrle.dcm"
        subprocess.run([DCMCONV, "+te", str(path), str(target)], check=True, capture_output=True)
    proc = subprocess.run([DCIODVFY, str(target)], capture_output=True, text=True, check=False)
    out = proc.stdout + proc.stderr
    return [line for line in out.splitlines() if line.startswith("Error")]


def have_dciodvfy() -> bool:
    return shutil.which(DCIODVFY) is not None


def volume_of_series(ws: WrittenSeries) -> CTVolume:
    """The CTVolume reconstruction would make of a regular factory series (slices in file order = along z)."""
    files = sorted(ws.files, key=lambda p: ws.sop_instance_uids.index(p.stem))
    return CTVolume(
        image=sitk.Cast(ws.image, sitk.sitkFloat32),
        study_instance_uid=ws.study_instance_uid,
        series_instance_uid=ws.series_instance_uid,
        frame_of_reference_uid=ws.frame_of_reference_uid,
        sources=tuple(s for p in files for s in source_frames(pydicom.dcmread(p, stop_before_pixels=True), p)),
    )


@dataclass(frozen=True)
class SegFrame:
    pixels: np.ndarray  # (rows, columns) uint8
    position: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    spacing: tuple[float, float]  # (between rows, between columns)
    segment: int
    sources: tuple[tuple[str, int | None], ...]  # (SOP instance UID, frame number)


def seg_frames(path: Path) -> tuple[hd.seg.Segmentation, list[SegFrame]]:
    """Each frame of a SEG with the geometry its own functional groups give it (highdicom decodes the pixels)."""
    seg = hd.seg.segread(path)
    pixels = seg.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[None]
    shared = seg.SharedFunctionalGroupsSequence[0]
    out: list[SegFrame] = []
    for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ori = (item.get("PlaneOrientationSequence") or shared.PlaneOrientationSequence)[0].ImageOrientationPatient
        meas = (item.get("PixelMeasuresSequence") or shared.PixelMeasuresSequence)[0].PixelSpacing
        ipp = item.PlanePositionSequence[0].ImagePositionPatient
        refs: list[tuple[str, int | None]] = []
        for der in item.get("DerivationImageSequence", []):
            for src in der.SourceImageSequence:
                frames = src.get("ReferencedFrameNumber")
                refs.append((str(src.ReferencedSOPInstanceUID), int(frames) if frames is not None else None))
        out.append(
            SegFrame(
                pixels=np.asarray(pixels[i], dtype=np.uint8),
                position=np.asarray([float(v) for v in ipp]),
                row_dir=np.asarray([float(v) for v in ori[:3]]),
                col_dir=np.asarray([float(v) for v in ori[3:]]),
                spacing=(float(meas[0]), float(meas[1])),
                segment=int(
                    (item.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence)[
                        0
                    ].ReferencedSegmentNumber
                ),
                sources=tuple(refs),
            )
        )
    return seg, out


def sample_label_on_frame(label: sitk.Image, frame: SegFrame, rows: int, columns: int) -> np.ndarray:
    """SimpleITK's own nearest-neighbour resampling of ``label`` onto one frame's plane (independent of the
    node's sampler)."""
    normal = np.cross(frame.row_dir, frame.col_dir)
    ref = sitk.Image([columns, rows, 1], sitk.sitkUInt8)
    ref.SetOrigin(frame.position.tolist())
    ref.SetSpacing([frame.spacing[1], frame.spacing[0], 1.0])
    ref.SetDirection(np.column_stack([frame.row_dir, frame.col_dir, normal]).ravel().tolist())
    out = sitk.Resample(label, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out)[0]


def place_on_grid(label: sitk.Image, frames: list[SegFrame]) -> np.ndarray:
    """Put each SEG frame into an array shaped like ``label``, at the slice its own plane position names.

    Asserts each frame lies exactly on a slice of ``label``'s grid (same in-plane axes and origin, position a
    whole number of slice steps along the normal)."""
    direction = np.asarray(label.GetDirection()).reshape(3, 3)
    spacing = np.asarray(label.GetSpacing())
    origin = np.asarray(label.GetOrigin())
    out = np.zeros(sitk.GetArrayViewFromImage(label).shape, dtype=np.uint8)
    for f in frames:
        assert np.allclose(f.row_dir, direction[:, 0], atol=1e-4)
        assert np.allclose(f.col_dir, direction[:, 1], atol=1e-4)
        offset = direction.T @ (f.position - origin)  # in (x, y, z) mm along the grid axes
        k = round(offset[2] / spacing[2])
        assert abs(offset[0]) < 1e-3 and abs(offset[1]) < 1e-3, offset
        assert abs(offset[2] - k * spacing[2]) < 1e-3, offset
        out[k] = np.maximum(out[k], f.pixels * f.segment)
    return out
