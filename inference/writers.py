"""Outputs of the file mode: the MetaImage label and the Clara Render Server publish folder.

Every file is written under a temporary name in its destination folder and renamed into place, so a reader never
sees a half-written file; an ``.mhd`` is renamed after its ``.raw``, so a visible header always has its data.
The MetaImage header is written here (not by ITK) so the temporary names never leak into ``ElementDataFile``;
floats are written with Python's shortest round-trip repr, so spacing, origin and direction read back bit for bit.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from inference.atomic import atomic_path
from inference.errors import InferenceError

_MET_TYPES = {
    sitk.sitkUInt8: "MET_UCHAR",
    sitk.sitkInt8: "MET_CHAR",
    sitk.sitkUInt16: "MET_USHORT",
    sitk.sitkInt16: "MET_SHORT",
    sitk.sitkUInt32: "MET_UINT",
    sitk.sitkInt32: "MET_INT",
    sitk.sitkFloat32: "MET_FLOAT",
    sitk.sitkFloat64: "MET_DOUBLE",
}


class OutputError(InferenceError):
    """An output file or folder cannot be written."""


def _atomic_path(final: Path) -> AbstractContextManager[Path]:
    """The project's atomic write, without fsync: these outputs are derived and can be written again, so they are
    not worth a flush each (the spool and the SEG, which the node acknowledges or sends, are flushed)."""
    return atomic_path(final, fsync=False)


def _ensure_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create output folder: {exc.strerror or exc}") from exc


def _fmt(values: Sequence[float]) -> str:
    return " ".join(repr(float(v)) for v in values)


def mhd_header(image: sitk.Image, data_file: str) -> str:
    """A MetaImage header for ``image`` whose pixels lie in ``data_file`` (raw, little endian)."""
    dim = image.GetDimension()
    if image.GetPixelID() not in _MET_TYPES:
        raise OutputError(f"{data_file}: pixel type {image.GetPixelIDTypeAsString()} not supported for MetaImage")
    direction = image.GetDirection()
    # MetaIO stores the direction column by column: TransformMatrix = D[0][0] D[1][0] D[2][0] D[0][1] ...
    matrix = [direction[r * dim + c] for c in range(dim) for r in range(dim)]
    lines = [
        "ObjectType = Image",
        f"NDims = {dim}",
        "BinaryData = True",
        "BinaryDataByteOrderMSB = False",
        "CompressedData = False",
        f"TransformMatrix = {_fmt(matrix)}",
        f"Offset = {_fmt(image.GetOrigin())}",
        f"CenterOfRotation = {' '.join('0' for _ in range(dim))}",
        f"ElementSpacing = {_fmt(image.GetSpacing())}",
        f"DimSize = {' '.join(str(s) for s in image.GetSize())}",
        f"ElementType = {_MET_TYPES[image.GetPixelID()]}",
        f"ElementDataFile = {data_file}",
    ]
    return "\n".join(lines) + "\n"


def write_mhd(image: sitk.Image, path: Path) -> tuple[Path, Path]:
    """Write ``image`` as ``path`` (``x.mhd``) + ``x.raw``, atomically. Returns (header, data) paths."""
    if path.suffix.lower() != ".mhd":
        raise OutputError(f"{path}: a MetaImage header must end in .mhd")
    _ensure_dir(path.parent)
    raw = path.with_suffix(".raw")
    array = sitk.GetArrayViewFromImage(image)
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    try:
        with _atomic_path(raw) as tmp:
            np.ascontiguousarray(little).tofile(tmp)
        with _atomic_path(path) as tmp:
            tmp.write_text(mhd_header(image, raw.name), encoding="ascii")
    except OSError as exc:
        raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    return path, raw


def copy_atomic(source: Path, dest: Path) -> Path:
    _ensure_dir(dest.parent)
    try:
        with _atomic_path(dest) as tmp:
            shutil.copyfile(source, tmp)
    except OSError as exc:
        raise OutputError(f"{dest}: cannot copy {source}: {exc.strerror or exc}") from exc
    return dest


def write_json_atomic(data: object, dest: Path) -> Path:
    _ensure_dir(dest.parent)
    try:
        with _atomic_path(dest) as tmp:
            tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"{dest}: cannot write: {exc.strerror or exc}") from exc
    return dest


def write_label(label: sitk.Image, output_dir: Path, name: str) -> Path:
    """``<output_dir>/<name>.mhd`` + ``.raw``: the uint8 label on the input grid. Returns the header path."""
    if label.GetPixelID() != sitk.sitkUInt8:
        label = sitk.Cast(label, sitk.sitkUInt8)
    header, _ = write_mhd(label, output_dir / f"{name}.mhd")
    return header


def write_publish(
    publish_dir: Path,
    *,
    name: str,
    label: sitk.Image,
    original_files: Sequence[Path],
    render_config: Path,
    model_name: str,
    density_image: sitk.Image | None = None,
) -> Path:
    """The folder the Clara Render Server read: the original volume, ``<name>.output.mhd``/``.raw``,
    ``config_render.json`` and ``config.meta``. Returns the path of ``config.meta`` (written last).

    ``original_files`` are copied under their own names (header first: its name is the ``density``). When the
    original is not a file the renderer reads (a DICOM series), pass ``density_image`` instead: it is written as
    ``<name>.mhd``.
    """
    _ensure_dir(publish_dir)
    if density_image is not None:
        header, _ = write_mhd(density_image, publish_dir / f"{name}.mhd")
        density = header.name
    else:
        if not original_files:
            raise OutputError(f"{publish_dir}: no original volume file to publish")
        for source in original_files:
            copy_atomic(source, publish_dir / source.name)
        density = original_files[0].name
    if label.GetPixelID() != sitk.sitkUInt8:
        label = sitk.Cast(label, sitk.sitkUInt8)
    mask, _ = write_mhd(label, publish_dir / f"{name}.output.mhd")
    if not render_config.is_file():
        raise OutputError(f"{render_config}: render settings not found")
    copy_atomic(render_config, publish_dir / "config_render.json")
    meta = {"density": density, "name": model_name, "seg_masks": [mask.name], "settings": "config_render.json"}
    return write_json_atomic(meta, publish_dir / "config.meta")
