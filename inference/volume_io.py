"""Find and read the one volume of a file-mode input folder.

Accepted: NIfTI (``.nii``, ``.nii.gz``), MetaImage (``.mhd`` + its data file, ``.mha``), NRRD (``.nrrd``,
``.nhdr``), or one DICOM series (files directly in the folder, or in one sub-folder), read with SimpleITK's series
reader. Hidden files are ignored; so are the data files an ``.mhd``/``.nhdr`` header names.

Every failure raises InputVolumeError with one line naming the path and the cause.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from inference.errors import InputVolumeError

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mhd", ".mha", ".nrrd", ".nhdr")
"""Suffixes of single-file volumes, longest first so ``x.nii.gz`` is not taken for ``.gz``."""

_DATA_FILE_KEYS = {".mhd": "ElementDataFile", ".nhdr": "data file"}


@dataclass(frozen=True)
class InputVolume:
    """The volume of an input folder, with what it was read from."""

    image: sitk.Image
    name: str
    """Stem used for the outputs: ``x.nii.gz`` -> ``x``; a DICOM series folder -> the folder's name."""
    source: Path
    """The volume file, or the DICOM series folder."""
    files: tuple[Path, ...]
    """Every file the volume consists of (header first: ``x.mhd``, ``x.raw``); the DICOM files of a series."""
    kind: str
    """``nifti``, ``metaimage``, ``nrrd`` or ``dicom``."""


def volume_stem(path: Path) -> str:
    """``x.nii.gz`` -> ``x``, ``a.b.mhd`` -> ``a.b``; other names lose their last suffix."""
    lower = path.name.lower()
    for suffix in VOLUME_SUFFIXES:
        if lower.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _volume_suffix(path: Path) -> str | None:
    lower = path.name.lower()
    for suffix in VOLUME_SUFFIXES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return suffix
    return None


def _kind(suffix: str) -> str:
    return {".nii": "nifti", ".nii.gz": "nifti", ".mhd": "metaimage", ".mha": "metaimage"}.get(suffix, "nrrd")


def _header_data_file(header: Path, suffix: str) -> Path | None:
    """The detached data file a ``.mhd``/``.nhdr`` header names, if it is a single local file."""
    key = _DATA_FILE_KEYS.get(suffix)
    if key is None:
        return None
    try:
        text = header.read_bytes()[:65536].decode("latin-1")
    except OSError:
        return None
    sep = "=" if suffix == ".mhd" else ":"
    match = re.search(rf"^\s*{re.escape(key)}\s*{sep}\s*(.+?)\s*$", text, re.MULTILINE | re.IGNORECASE)
    if match is None:
        return None
    value = match.group(1)
    if value.upper() in ("LOCAL", "LIST") or "%" in value or " " in value:
        return None
    return header.parent / value


def _is_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _one_line(exc: BaseException) -> str:
    """Condense an ITK exception (several lines, C++ file names) into its cause."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.lower().startswith(("description:", "itk::error")):
            ln = ln.split(":", 1)[1].strip()
        if ln and not ln.lower().startswith(("location:", "file:", "line:", "sitk::error", "exception thrown")):
            return re.sub(r"\s+", " ", ln)
    return re.sub(r"\s+", " ", " ".join(lines)) or type(exc).__name__


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def find_volume(input_dir: Path) -> tuple[Path, str]:
    """Locate the one volume in ``input_dir``: (path, kind). A DICOM series is returned as its folder."""
    if not input_dir.exists():
        raise InputVolumeError(f"{input_dir}: input folder does not exist")
    if not input_dir.is_dir():
        raise InputVolumeError(f"{input_dir}: input is not a folder")
    entries = _visible(input_dir)
    if not entries:
        raise InputVolumeError(f"{input_dir}: input folder is empty, expected one volume")
    volumes: list[tuple[Path, str]] = []
    data_files: set[Path] = set()
    for entry in entries:
        suffix = _volume_suffix(entry) if entry.is_file() else None
        if suffix is not None:
            volumes.append((entry, _kind(suffix)))
            data = _header_data_file(entry, suffix)
            if data is not None:
                data_files.add(data.resolve())
    loose_dicom = [p for p in entries if p.is_file() and p.resolve() not in data_files and _is_dicom(p)]
    if loose_dicom:
        volumes.append((input_dir, "dicom"))
    for entry in entries:
        if entry.is_dir() and any(p.is_file() and _is_dicom(p) for p in _visible(entry)):
            volumes.append((entry, "dicom"))
    if not volumes:
        names = ", ".join(p.name for p in entries[:5])
        raise InputVolumeError(
            f"{input_dir}: no volume found (expected .nii, .nii.gz, .mhd, .mha, .nrrd or a DICOM series; found {names})"
        )
    if len(volumes) > 1:
        names = ", ".join(p.name if p != input_dir else "DICOM files" for p, _ in volumes)
        raise InputVolumeError(f"{input_dir}: holds {len(volumes)} volumes ({names}); file mode takes exactly one")
    return volumes[0]


def _check_shape(path: Path, dimension: int, size: tuple[int, ...], components: int) -> None:
    if components != 1:
        raise InputVolumeError(f"{path}: image has {components} components per voxel, a scalar CT volume is required")
    if dimension != 3:
        shape = " x ".join(str(s) for s in size)
        raise InputVolumeError(f"{path}: image is {dimension}-D ({shape}), a 3-D volume is required")
    if min(size) < 2:
        shape = " x ".join(str(s) for s in size)
        raise InputVolumeError(f"{path}: image is a single slice ({shape}), a 3-D volume is required")


def _nifti_expected_bytes(head: bytes) -> int | None:
    """Header + voxel bytes a NIfTI-1/-2 file must hold, from its header; None if the header is not NIfTI."""
    for order in ("<", ">"):
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            dims = struct.unpack(order + "8h", head[40:56])
            bitpix = struct.unpack(order + "h", head[72:74])[0]
            offset = int(struct.unpack(order + "f", head[108:112])[0])
            break
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            bitpix = struct.unpack(order + "h", head[14:16])[0]
            dims = struct.unpack(order + "8q", head[16:80])
            offset = struct.unpack(order + "q", head[168:176])[0]
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    return int(max(offset, 348) + math.prod(max(int(d), 1) for d in dims[1 : ndim + 1]) * bitpix // 8)


def _check_nifti_complete(path: Path) -> None:
    """ITK reads a truncated NIfTI without complaint and fills the rest with zeros: refuse it instead."""
    gz = path.name.lower().endswith(".gz")
    try:
        if gz:
            with gzip.open(path, "rb") as fh:
                head = fh.read(540)
        else:
            with path.open("rb") as fh:
                head = fh.read(540)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputVolumeError(f"{path}: unreadable image: {exc}") from exc
    expected = _nifti_expected_bytes(head)
    if expected is None:
        return  # not a NIfTI header: ITK's own reader reports what is wrong
    if not gz:
        actual = path.stat().st_size
    else:
        with path.open("rb") as fh:
            fh.seek(-4, os.SEEK_END)
            isize = struct.unpack("<I", fh.read(4))[0]
        if isize == expected % 2**32:
            return  # the gzip trailer says the whole image is there (the common, cheap case)
        actual = 0
        try:
            with gzip.open(path, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    actual += len(chunk)
        except (OSError, EOFError, zlib.error) as exc:
            raise InputVolumeError(f"{path}: unreadable image: compressed data truncated or corrupt ({exc})") from exc
    if actual < expected:
        raise InputVolumeError(f"{path}: unreadable image: file is truncated ({actual} of {expected} bytes)")


def _read_file(path: Path) -> sitk.Image:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputVolumeError(f"{path}: unreadable image: {_one_line(exc)}") from exc
    _check_shape(path, reader.GetDimension(), tuple(reader.GetSize()), reader.GetNumberOfComponents())
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_complete(path)
    try:
        image: sitk.Image = reader.Execute()
    except RuntimeError as exc:
        raise InputVolumeError(f"{path}: unreadable image: {_one_line(exc)}") from exc
    return image


def _read_dicom(folder: Path) -> tuple[sitk.Image, tuple[Path, ...]]:
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as exc:
        raise InputVolumeError(f"{folder}: cannot scan DICOM series: {_one_line(exc)}") from exc
    if not series:
        raise InputVolumeError(f"{folder}: no readable DICOM image series")
    if len(series) > 1:
        raise InputVolumeError(f"{folder}: holds {len(series)} DICOM series; file mode takes exactly one")
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputVolumeError(f"{folder}: unreadable DICOM series: {_one_line(exc)}") from exc
    _check_shape(folder, image.GetDimension(), tuple(image.GetSize()), image.GetNumberOfComponentsPerPixel())
    return image, tuple(Path(n) for n in names)


DicomReader = Callable[[Path], tuple[sitk.Image, tuple[Path, ...]]]
"""Reads the DICOM series in a folder: (HU image in LPS, its files). Raises InputVolumeError."""


def read_volume(input_dir: Path, dicom_reader: DicomReader | None = None) -> InputVolume:
    """Find and read the one volume of ``input_dir``. Raises InputVolumeError naming the path and the cause.

    ``dicom_reader`` reads a DICOM series folder; the node passes its own reconstruction (sorting along the
    normal, decoder failures as errors, tilt and gap policies). Without one, SimpleITK's series reader is used.
    """
    path, kind = find_volume(input_dir)
    if kind == "dicom":
        image, files = (dicom_reader or _read_dicom)(path)
        return InputVolume(image=image, name=path.name, source=path, files=files, kind=kind)
    image = _read_file(path)
    suffix = _volume_suffix(path) or ""
    data = _header_data_file(path, suffix)
    files = (path, data) if data is not None and data.is_file() else (path,)
    return InputVolume(image=image, name=volume_stem(path), source=path, files=files, kind=kind)
