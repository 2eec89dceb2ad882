"""A complete series -> a CT volume in HU with LPS geometry, or ``Rejected`` with the reason.

Two passes over the files:

1. Headers (stop before pixel data, read once): every frame's orientation, position, size and rescale
   (``dicom_node.frames``; Enhanced CT from its functional groups). Geometry is checked here, before any decoding:
   one orientation, one size, one frame of reference; frames sorted by position along the slice normal (never by
   InstanceNumber); duplicate positions, missing or uneven steps and gantry tilt handled by ``ReconstructionSection``
   (reject with the reason, or resample onto a regular grid).
2. Pixels: each instance is decoded by pydicom's pixel handlers (pylibjpeg-libjpeg for JPEG baseline/extended/
   lossless, pylibjpeg-openjpeg for JPEG 2000, pyjpegls for JPEG-LS, pylibjpeg-rle or pydicom for RLE, pydicom for
   native and deflated) in ``decode_workers`` threads, and rescaled straight into its slot of one preallocated
   float32 array. Any decoder error, truncated or missing pixel data fails the series naming the instance and its
   transfer syntax: a slice is never left as zeros.

The volume becomes one SimpleITK image: origin = the first slice's position along the normal, direction columns =
row cosine, column cosine, normal; spacing = (column spacing dx, row spacing dy, slice step).
"""

from __future__ import annotations

import logging
import math
import struct
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, JPEGLossless, JPEGLosslessSV1

from dicom_node import geometry
from dicom_node.errors import Rejected
from dicom_node.frames import FrameHeader, HeaderError, frame_headers, read_headers
from dicom_node.settings import ReconstructionSection
from dicom_node.types import CTVolume, InstanceRecord, SeriesManifest, SourceInstance

log = logging.getLogger(__name__)

PAD_HU = -1024.0
"""Value of resampled voxels that fall outside the acquired stack (air)."""

_ELSCINT_COMPRESSION = (0x07A1, 0x1011)


@dataclass(frozen=True, slots=True)
class _Instance:
    record: InstanceRecord
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: UID
    frame_of_reference_uid: str
    acquired: tuple[str, float, int]
    """Sort key for "later-acquired": acquisition/content date-time, received time, InstanceNumber."""
    frames: tuple[FrameHeader, ...]
    label: str


@dataclass(frozen=True, slots=True)
class _Frame:
    instance: _Instance
    header: FrameHeader
    index: int
    """0-based frame index within its instance."""


def _label(series_uid: str, sop: str, path: Path) -> str:
    return f"series {series_uid}: instance {sop} ({path.name})"


def _ts_name(ts: UID) -> str:
    return f"{ts.name} ({ts})" if ts.is_transfer_syntax else f"transfer syntax {ts}"


def _acquired(ds: Dataset, record: InstanceRecord) -> tuple[str, float, int]:
    stamp = str(ds.get("AcquisitionDateTime") or "")
    if not stamp:
        for date_kw, time_kw in (("AcquisitionDate", "AcquisitionTime"), ("ContentDate", "ContentTime")):
            if ds.get(date_kw) and ds.get(time_kw):
                stamp = f"{ds.get(date_kw)}{ds.get(time_kw)}"
                break
    try:
        number = int(ds.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        number = 0
    return (stamp, record.received_at, number)


def _check_pixel_header(ds: Dataset, ts: UID, label: str) -> None:
    """What can be refused from the header alone: private compression, colour, an unsupported syntax."""
    creator = ds.get((_ELSCINT_COMPRESSION[0], 0x0010))
    compression = ds.get(_ELSCINT_COMPRESSION)
    if creator is not None and str(creator.value).strip() == "ELSCINT1" and compression is not None:
        raise Rejected(
            f"{label}: pixel data uses the private ELSCINT1 compression {str(compression.value).strip()!r} "
            f"in (07A1,100A) although the transfer syntax says {_ts_name(ts)}; no open decoder reads it"
        )
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise Rejected(f"{label}: SamplesPerPixel {ds.get('SamplesPerPixel')} (a CT image has one sample)")
    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip()
    if photometric != "MONOCHROME2":
        raise Rejected(f"{label}: PhotometricInterpretation {photometric} is not supported (MONOCHROME2 only)")
    if not ts.is_transfer_syntax:
        raise Rejected(f"{label}: unknown transfer syntax {ts}")
    if ts.is_compressed:
        from pydicom.pixels.decoders.base import get_decoder

        try:
            decoder = get_decoder(ts)
        except NotImplementedError as exc:
            raise Rejected(f"{label}: no pixel data decoder for {_ts_name(ts)}") from exc
        if not decoder.is_available:
            missing = "; ".join(decoder.missing_dependencies)
            raise Rejected(f"{label}: no decoder plugin available for {_ts_name(ts)} ({missing})")


def _read_instances(series_uid: str, items: Sequence[tuple[InstanceRecord, Dataset]]) -> list[_Instance]:
    out: list[_Instance] = []
    for record, ds in items:
        meta = getattr(ds, "file_meta", None)
        sop = str(
            ds.get("SOPInstanceUID") or record.sop_instance_uid or (meta and meta.get("MediaStorageSOPInstanceUID"))
        )
        sop_class = str(ds.get("SOPClassUID") or record.sop_class_uid or (meta and meta.get("MediaStorageSOPClassUID")))
        label = _label(series_uid, sop, record.path)
        ts = UID(str((meta.get("TransferSyntaxUID") if meta is not None else None) or record.transfer_syntax_uid))
        _check_pixel_header(ds, ts, label)
        try:
            frames = tuple(frame_headers(ds))
        except HeaderError as exc:
            raise Rejected(f"{label}: {exc}") from exc
        out.append(
            _Instance(
                record=record,
                sop_class_uid=sop_class,
                sop_instance_uid=sop,
                transfer_syntax=ts,
                frame_of_reference_uid=str(ds.get("FrameOfReferenceUID") or ""),
                acquired=_acquired(ds, record),
                frames=frames,
                label=label,
            )
        )
    return out


# -- geometry -----------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    frames: list[_Frame]
    """Kept frames in slice order."""
    row: npt.NDArray[np.float64]
    col: npt.NDArray[np.float64]
    normal: npt.NDArray[np.float64]
    positions: npt.NDArray[np.float64]
    """n x 3 positions of the kept frames, in slice order."""
    dx: float
    dy: float
    stack_dir: npt.NDArray[np.float64]
    """Unit direction in which slice positions step (the normal, or the table axis under gantry tilt)."""
    t: npt.NDArray[np.float64]
    """Slice positions along ``stack_dir``, ascending."""
    step: float
    """Slice step along ``stack_dir`` of the output (mean step when even, median step when resampled)."""
    regularize: bool
    """Uneven steps: interpolate onto a regular grid along ``stack_dir``."""
    tilted: bool
    notes: list[str]


def _plan(series_uid: str, instances: list[_Instance], policy: ReconstructionSection) -> _Plan:
    frames = [_Frame(inst, fh, k) for inst in instances for k, fh in enumerate(inst.frames)]
    if not frames:
        raise Rejected(f"series {series_uid}: no instances")
    orientations = np.array([f.header.orientation for f in frames])
    if not geometry.same_orientation(orientations):
        odd = next(f for f in frames if np.max(np.abs(np.array(f.header.orientation) - orientations[0])) > 1e-3)
        raise Rejected(
            f"series {series_uid}: mixed slice orientations: {odd.instance.label} has "
            f"{list(odd.header.orientation)} where {frames[0].instance.label} has {list(frames[0].header.orientation)}"
        )
    sizes = {(f.header.rows, f.header.columns, tuple(round(s, 4) for s in f.header.pixel_spacing)) for f in frames}
    if len(sizes) > 1:
        shown = ", ".join(f"{r}x{c} at {s[0]:g}x{s[1]:g} mm" for r, c, s in sorted(sizes)[:4])
        raise Rejected(f"series {series_uid}: mixed slice sizes or pixel spacings: {shown}")
    fors = {inst.frame_of_reference_uid for inst in instances}
    if len(fors) > 1:
        raise Rejected(f"series {series_uid}: more than one FrameOfReferenceUID: {', '.join(sorted(fors))}")
    try:
        row, col, normal = geometry.orientation_vectors(frames[0].header.orientation)
    except ValueError as exc:
        raise Rejected(f"series {series_uid}: {exc}") from exc
    dy, dx = frames[0].header.pixel_spacing
    if not (dx > 0 and dy > 0):
        raise Rejected(f"series {series_uid}: PixelSpacing must be positive, got {dy:g}\\{dx:g}")

    positions = np.array([f.header.position for f in frames], dtype=np.float64)
    along = geometry.positions_along(normal, positions)
    order = np.argsort(along, kind="stable")
    frames = [frames[i] for i in order]
    positions, along = positions[order], along[order]
    notes: list[str] = []

    # Duplicates: two different frames at one position.
    keep = np.ones(len(frames), dtype=bool)
    i = 0
    while i < len(frames):
        j = i + 1
        while j < len(frames) and along[j] - along[i] <= geometry.DUPLICATE_STEP_MM:
            j += 1
        if j - i > 1:
            group = list(range(i, j))
            names = ", ".join(frames[g].instance.sop_instance_uid for g in group)
            if policy.duplicate_positions == "reject":
                raise Rejected(
                    f"series {series_uid}: {j - i} instances at one position ({along[i]:.3f} mm along the normal): "
                    f"{names} (duplicate_positions=reject)"
                )
            latest = max(group, key=lambda g: frames[g].instance.acquired)
            for g in group:
                keep[g] = g == latest
            log.warning(
                "series %s: %d instances at %.3f mm along the normal (%s): kept the later-acquired %s",
                series_uid, j - i, along[i], names, frames[latest].instance.sop_instance_uid,
            )  # fmt: skip
        i = j
    frames = [f for f, k in zip(frames, keep, strict=True) if k]
    positions, along = positions[keep], along[keep]

    tilted = len(frames) > 1 and geometry.is_gantry_tilted(normal, positions)
    stack_dir = normal
    if tilted:
        angle = geometry.tilt_angle_deg(normal, positions)
        if policy.gantry_tilt == "reject":
            raise Rejected(
                f"series {series_uid}: gantry tilt: slice positions step {angle:.1f} deg off the slice normal "
                f"(sheared stack; gantry_tilt=reject)"
            )
        span = positions[-1] - positions[0]
        stack_dir = span / np.linalg.norm(span)
        if geometry.lateral_offsets(stack_dir, positions).max() > geometry.LATERAL_TOLERANCE_MM:
            raise Rejected(f"series {series_uid}: slice positions do not lie on one line (neither stacked nor tilted)")
        notes.append(
            f"gantry tilt {angle:.1f} deg: resampled onto a grid orthogonal to the table direction "
            f"(axial for an axial acquisition)"
        )
    t = positions @ stack_dir
    stats = geometry.spacing_stats(t, policy.spacing_tolerance)
    regularize = False
    if len(frames) == 1:
        step = 1.0
    elif stats.even:
        step = float((t[-1] - t[0]) / (len(t) - 1))
    else:
        ratios = [stats.steps[i] / stats.median for i in stats.gaps]
        whole = bool(ratios) and all(abs(r - round(r)) <= policy.spacing_tolerance for r in ratios)
        small = [s for s in stats.steps if s < stats.median * (1 - policy.spacing_tolerance)]
        what = (
            f"{stats.missing_slices()} missing slice(s)" if whole and not small else "uneven slice steps"
        ) + f" (steps {stats.minimum:.3f}-{stats.maximum:.3f} mm, median {stats.median:.3f} mm)"
        if policy.uneven_spacing == "reject":
            raise Rejected(f"series {series_uid}: {what} (uneven_spacing=reject)")
        if stats.maximum > policy.max_gap_slices * stats.median:
            raise Rejected(
                f"series {series_uid}: {what}: a gap of {stats.maximum:.3f} mm is more than max_gap_slices="
                f"{policy.max_gap_slices:g} median steps; interpolating across it would invent anatomy"
            )
        step = stats.median
        regularize = True
        notes.append(f"{what}: resampled onto a regular {step:.3f} mm step")
    return _Plan(frames, row, col, normal, positions, dx, dy, stack_dir, t, step, regularize, tilted, notes)


# -- pixels -------------------------------------------------------------------------------------------------------


def _check_encapsulated(data: bytes, frames: int, ts: UID, label: str) -> None:
    """Refuse encapsulated pixel data that ends inside a fragment, or a JPEG stream that lost its end.

    Decoders are lenient: libjpeg returns a full-size image from a JPEG Lossless stream cut in half, the rest zeros.
    """
    offset, items, last = 0, 0, b""
    while offset < len(data):
        if offset + 8 > len(data):
            raise Rejected(f"{label}: pixel data is truncated ({_ts_name(ts)}: an item header is cut off)")
        group, element, length = struct.unpack_from("<HHI", data, offset)
        if (group, element) == (0xFFFE, 0xE0DD):
            break
        if (group, element) != (0xFFFE, 0xE000):
            raise Rejected(f"{label}: malformed encapsulated pixel data ({_ts_name(ts)}): item tag "
                           f"({group:04X},{element:04X})")  # fmt: skip
        if length == 0xFFFFFFFF or offset + 8 + length > len(data):
            raise Rejected(
                f"{label}: pixel data is truncated ({_ts_name(ts)}: fragment {items} declares {length} bytes, "
                f"{len(data) - offset - 8} present)"
            )
        last = data[offset + 8 : offset + 8 + length]
        offset += 8 + length
        items += 1
    if items < 1 + frames:  # the basic offset table, then at least one fragment per frame
        raise Rejected(f"{label}: pixel data is truncated ({_ts_name(ts)}: {items - 1} fragments for {frames} frames)")
    jpeg_family = ts.startswith("1.2.840.10008.1.2.4.")
    if jpeg_family and b"\xff\xd9" not in last[-4:]:
        raise Rejected(f"{label}: pixel data is truncated ({_ts_name(ts)}: the last codestream has no end marker)")


@dataclass(frozen=True, slots=True)
class Predecoded:
    """An instance decoded ahead of its job (``dicom_node.predecode``): its stored pixel values, not rescaled, shape
    (frames, rows, columns), or the reason decoding failed (``failure``: the whole ``Rejected`` message)."""

    shape: tuple[int, int, int]
    pixels: npt.NDArray[Any] | None
    failure: str | None = None


class PredecodedLookup(Protocol):
    """Slices decoded while the series arrived. ``has``: submitted (decoded or still decoding); ``get`` waits for
    it and returns None when it is not usable (dropped for the memory cap, or the file changed since)."""

    def has(self, record: InstanceRecord) -> bool: ...

    def get(self, record: InstanceRecord) -> Predecoded | None: ...


def _read_pixels(path: Path, label: str) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError) as exc:
        raise Rejected(f"{label}: cannot read the file: {type(exc).__name__}: {exc}") from exc


PREFERRED_PLUGIN: dict[str, str] = {JPEGLossless: "gdcm", JPEGLosslessSV1: "gdcm"}
"""Decoding plugin per transfer syntax where one is measurably better: GDCM decodes JPEG Lossless in about 5.3 ms
per 512 x 512 slice against libjpeg's 8.6 ms, bit for bit the same (lossless). Elsewhere pydicom's own order
minus GDCM (pylibjpeg first), whose JPEG 2000 path has had signedness quirks."""


def _decode_with_preferred_plugin(ds: Dataset, ts: UID, pixel_array: Any) -> npt.NDArray[Any]:
    """``pixel_array`` with the preferred plugin for ``ts`` first, then the decoder's other available plugins
    (GDCM last); the first plugin's error is raised when none can decode."""
    if not ts.is_encapsulated:
        return np.asarray(pixel_array(ds))
    from pydicom.pixels.decoders.base import get_decoder

    available = list(get_decoder(ts).available_plugins)
    preferred = PREFERRED_PLUGIN.get(str(ts))
    order = [p for p in available if p == preferred]
    order += [p for p in available if p not in order and p != "gdcm"]
    order += [p for p in available if p not in order]
    if not order:
        return np.asarray(pixel_array(ds))  # pydicom raises its own "no plugin available" error
    first_error: Exception | None = None
    for plugin in order:
        try:
            return np.asarray(pixel_array(ds, decoding_plugin=plugin))
        except Exception as exc:
            first_error = first_error or exc
    assert first_error is not None
    raise first_error


def _decode_pixels(ds: Dataset, ts: UID, nframes: int, rows: int, cols: int, label: str) -> npt.NDArray[Any]:
    """The stored values of every frame of ``ds``, shape (nframes, rows, cols); ``Rejected`` for anything broken."""
    from pydicom.pixels.utils import pixel_array

    ts_label = f"{label}, {_ts_name(ts)}"
    if "PixelData" not in ds:
        present = [kw for kw in ("FloatPixelData", "DoubleFloatPixelData") if kw in ds]
        cause = f"{', '.join(present)} is not a CT image" if present else "the file is truncated or holds no image"
        raise Rejected(f"{ts_label}: no Pixel Data element ({cause})")
    data: bytes = ds.PixelData
    if ts.is_encapsulated:
        _check_encapsulated(data, nframes, ts, label)
    else:
        expected = rows * cols * nframes * math.ceil(int(ds.get("BitsAllocated") or 16) / 8)
        if len(data) < expected:
            raise Rejected(f"{ts_label}: pixel data is truncated ({len(data)} of {expected} bytes)")
    try:
        arr = _decode_with_preferred_plugin(ds, ts, pixel_array)
    except Exception as exc:  # any decoder failure fails the series, whatever the plugin raises
        raise Rejected(f"{ts_label}: cannot decode pixel data: {type(exc).__name__}: {exc}") from exc
    arr = arr.reshape(nframes, rows, cols) if arr.ndim == 2 or nframes == 1 else arr
    if arr.shape != (nframes, rows, cols):
        raise Rejected(f"{ts_label}: decoded pixel data has shape {arr.shape}, expected {(nframes, rows, cols)}")
    return arr


def predecode(record: InstanceRecord) -> Predecoded | None:
    """Decode one stored instance ahead of its job, as ``_decode_into`` would. None where its header alone will
    fail the job (or cannot be read): only pixel failures are kept, as the ``Rejected`` message the job raises."""
    try:
        header = pydicom.dcmread(record.path)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError):
        return None  # the job reads it again and says why
    full: Dataset | None = header
    try:
        if "Rows" not in header:  # pydicom returns an empty dataset for a file cut inside its pixel data
            full, header = None, pydicom.dcmread(record.path, stop_before_pixels=True)
        meta = getattr(header, "file_meta", None)
        ts = UID(str((meta.get("TransferSyntaxUID") if meta is not None else None) or record.transfer_syntax_uid))
        sop = str(header.get("SOPInstanceUID") or record.sop_instance_uid)
        label = _label(record.series_instance_uid, sop, record.path)
        _check_pixel_header(header, ts, label)
        frames = frame_headers(header)
    except Exception:  # the job reads the header again and reports what is wrong with it
        return None
    shape = (len(frames), frames[0].rows, frames[0].columns)
    try:
        return Predecoded(shape, _decode_pixels(full if full is not None else Dataset(), ts, *shape, label))
    except Rejected as exc:
        return Predecoded(shape, None, str(exc))


def _rescale_into(inst: _Instance, arr: npt.NDArray[Any], slots: list[tuple[int, int]],
                  volume: npt.NDArray[np.float32]) -> None:  # fmt: skip
    for index, slot in slots:
        fh = inst.frames[index]
        out = volume[slot]
        if fh.slope == 1.0:
            np.add(arr[index], np.float32(fh.intercept), out=out, casting="unsafe")
        else:
            np.multiply(arr[index], np.float32(fh.slope), out=out, casting="unsafe")
            out += np.float32(fh.intercept)


def _decode_into(inst: _Instance, slots: list[tuple[int, int]], volume: npt.NDArray[np.float32], rows: int,
                 cols: int) -> None:  # fmt: skip
    """Decode one instance and write each (frame index, slot) rescaled into ``volume[slot]``."""
    ds = _read_pixels(inst.record.path, inst.label)
    arr = _decode_pixels(ds, inst.transfer_syntax, len(inst.frames), rows, cols, inst.label)
    _rescale_into(inst, arr, slots, volume)


def _from_predecoded(cache: PredecodedLookup, inst: _Instance, slots: list[tuple[int, int]],
                     volume: npt.NDArray[np.float32], rows: int, cols: int) -> bool:  # fmt: skip
    """Use the pre-decoded pixels of ``inst`` (waiting for them), or decode it here when they are not usable.
    True when the pre-decoded pixels were used."""
    entry = cache.get(inst.record)
    if entry is None or entry.shape != (len(inst.frames), rows, cols):
        _decode_into(inst, slots, volume, rows, cols)
        return False
    if entry.failure is not None:
        raise Rejected(entry.failure)
    assert entry.pixels is not None
    _rescale_into(inst, entry.pixels, slots, volume)
    return True


def _decode(plan: _Plan, workers: int, cache: PredecodedLookup | None = None) -> tuple[npt.NDArray[np.float32], int]:
    """The volume, and how many instances came decoded from ``cache``."""
    rows, cols = plan.frames[0].header.rows, plan.frames[0].header.columns
    volume = np.empty((len(plan.frames), rows, cols), dtype=np.float32)
    by_instance: dict[int, tuple[_Instance, list[tuple[int, int]]]] = {}
    for slot, frame in enumerate(plan.frames):
        by_instance.setdefault(id(frame.instance), (frame.instance, []))[1].append((frame.index, slot))
    jobs = list(by_instance.values())
    ready = [job for job in jobs if cache is not None and cache.has(job[0].record)]
    misses = [job for job in jobs if cache is None or not cache.has(job[0].record)]
    hits = 0
    if workers <= 1 or len(misses) <= 1:
        for inst, slots in misses:
            _decode_into(inst, slots, volume, rows, cols)
        if cache is not None:
            for inst, slots in ready:
                hits += _from_predecoded(cache, inst, slots, volume, rows, cols)
        return volume, hits
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        futures = [pool.submit(_decode_into, inst, slots, volume, rows, cols) for inst, slots in misses]
        try:
            if cache is not None:  # meanwhile, in this thread: what was decoded (or is decoding) as it arrived
                for inst, slots in ready:
                    hits += _from_predecoded(cache, inst, slots, volume, rows, cols)
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return volume, hits


# -- resampling ---------------------------------------------------------------------------------------------------


def _regularize(volume: npt.NDArray[np.float32], t: npt.NDArray[np.float64], step: float) -> npt.NDArray[np.float32]:
    """Linear interpolation between neighbouring slices onto t[0] + m * step, m = 0..M (M * step <= span)."""
    count = math.floor((t[-1] - t[0]) / step + 1e-3) + 1
    grid = t[0] + step * np.arange(count)
    k = np.clip(np.searchsorted(t, grid, side="right") - 1, 0, len(t) - 2)
    w = ((grid - t[k]) / (t[k + 1] - t[k])).astype(np.float32)
    out = np.empty((count, *volume.shape[1:]), dtype=np.float32)
    for m in range(count):
        a, b = volume[k[m]], volume[k[m] + 1]
        if w[m] <= 0:
            out[m] = a
        elif w[m] >= 1:
            out[m] = b
        else:
            np.multiply(a, 1 - w[m], out=out[m])
            out[m] += w[m] * b
    return out


def _image(array: npt.NDArray[np.float32], origin: Sequence[float], spacing: Sequence[float],
           direction: npt.NDArray[np.float64]) -> sitk.Image:  # fmt: skip
    image = sitk.GetImageFromArray(array, isVector=False)
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return image


def _untilt(plan: _Plan, volume: npt.NDArray[np.float32]) -> sitk.Image:
    """Resample a sheared (gantry-tilted) regular stack onto a grid orthogonal to the table direction.

    The sheared stack is x = p0 + i*dx*row + j*dy*col + m*step*s. Seen as an image with orthonormal direction
    (row, col, normal) and slice spacing step*(s.n), a point x of that stack sits at y = A (x - p0) + p0 with
    A = I - s_perp n^T / (s.n), s_perp = s - (s.n) n: an affine transform SimpleITK's resampler applies.
    """
    s, n, p0 = plan.stack_dir, plan.normal, plan.positions[0]
    sn = float(s @ n)
    s_perp = s - sn * n
    source = _image(volume, p0, (plan.dx, plan.dy, plan.step * sn), np.column_stack([plan.row, plan.col, n]))
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(float(v) for v in (np.eye(3) - np.outer(s_perp, n) / sn).ravel()))
    transform.SetCenter(tuple(float(v) for v in p0))

    out_row = plan.row - (plan.row @ s) * s
    out_row /= np.linalg.norm(out_row)
    out_col = np.cross(s, out_row)
    direction = np.column_stack([out_row, out_col, s])
    slices, rows, cols = volume.shape
    edges = ((cols - 1) * plan.dx * plan.row, (rows - 1) * plan.dy * plan.col, (slices - 1) * plan.step * s)
    corners = np.array(
        [p0 + a * edges[0] + b * edges[1] + c * edges[2] for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    )
    q = corners @ direction
    spacing = np.array([plan.dx, plan.dy, plan.step])
    qmin, qmax = q.min(axis=0), q.max(axis=0)
    size = [int(v) for v in np.floor((qmax - qmin) / spacing + 1e-3) + 1]
    origin = direction @ qmin
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(size)
    resampler.SetOutputOrigin(tuple(float(v) for v in origin))
    resampler.SetOutputSpacing(tuple(float(v) for v in spacing))
    resampler.SetOutputDirection(tuple(float(v) for v in direction.ravel()))
    resampler.SetTransform(transform)
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(PAD_HU)
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    result: sitk.Image = resampler.Execute(source)
    return result


# -- entry points -------------------------------------------------------------------------------------------------


def reconstruct_headers(
    study_uid: str,
    series_uid: str,
    items: Sequence[tuple[InstanceRecord, Dataset]],
    policy: ReconstructionSection,
    timings: dict[str, float] | None = None,
    predecoded: PredecodedLookup | None = None,
) -> CTVolume:
    """Reconstruct from instances whose headers are already read (``stop_before_pixels`` datasets).

    ``timings``, when given, receives seconds for ``plan`` (geometry checks), ``decode`` and ``assemble``.
    ``predecoded``: instances decoded while the series arrived; only the others are decoded here. A pre-decoded
    failure fails the series as decoding it here would.
    """
    t0 = time.perf_counter()
    instances = _read_instances(series_uid, items)
    plan = _plan(series_uid, instances, policy)
    t1 = time.perf_counter()
    volume, reused = _decode(plan, policy.decode_workers, predecoded)
    t2 = time.perf_counter()
    if plan.regularize:
        volume = _regularize(volume, plan.t, plan.step)
    if plan.tilted:
        image = _untilt(plan, volume)
    else:
        direction = np.column_stack([plan.row, plan.col, plan.normal])
        image = _image(volume, plan.positions[0], (plan.dx, plan.dy, plan.step), direction)
    if timings is not None:
        timings.update(plan=t1 - t0, decode=t2 - t1, assemble=time.perf_counter() - t2, predecoded=float(reused))
    sources = tuple(
        SourceInstance(
            sop_class_uid=f.instance.sop_class_uid,
            sop_instance_uid=f.instance.sop_instance_uid,
            path=f.instance.record.path,
            frame_number=f.header.frame_number,
        )
        for f in plan.frames
    )
    return CTVolume(
        image=image,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        frame_of_reference_uid=instances[0].frame_of_reference_uid,
        sources=sources,
        resampled=tuple(plan.notes),
    )


def reconstruct(manifest: SeriesManifest, policy: ReconstructionSection) -> CTVolume:
    """Decode and assemble one complete series. Raises ``Rejected`` naming the series/instance and the cause."""
    series = manifest.series_instance_uid
    items = list(zip(manifest.instances, read_headers(manifest), strict=True))
    return reconstruct_headers(manifest.study_instance_uid, series, items, policy)


def read_dicom_folder(folder: Path, policy: ReconstructionSection) -> CTVolume:
    """Reconstruct the one series in ``folder`` (files at any depth; non-DICOM files and DICOMDIR are ignored).

    Raises ``Rejected`` when the folder holds no DICOM image or more than one series.
    """
    groups: dict[str, list[tuple[InstanceRecord, Dataset]]] = {}
    study_of: dict[str, str] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError):
            continue
        meta = getattr(ds, "file_meta", None)
        if meta is not None and str(meta.get("MediaStorageSOPClassUID") or "") == "1.2.840.10008.1.3.10":
            continue  # DICOMDIR
        if "Rows" not in ds:
            continue  # not an image (a SR, a SEG...)
        series = str(ds.get("SeriesInstanceUID") or "")
        sop = str(
            ds.get("SOPInstanceUID") or (meta.get("MediaStorageSOPInstanceUID") if meta is not None else "") or ""
        )
        record = InstanceRecord(
            sop_instance_uid=sop,
            sop_class_uid=str(ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else "") or ""),
            study_instance_uid=str(ds.get("StudyInstanceUID") or ""),
            series_instance_uid=series,
            transfer_syntax_uid=str(
                meta.get("TransferSyntaxUID") if meta is not None else pydicom.uid.ImplicitVRLittleEndian
            ),
            path=path.resolve(),
            size=path.stat().st_size,
            calling_ae_title="",
            association_id="",
            received_at=path.stat().st_mtime,
        )
        groups.setdefault(series, []).append((record, ds))
        study_of.setdefault(series, record.study_instance_uid)
    if not groups:
        raise Rejected(f"{folder}: no DICOM image found")
    if len(groups) > 1:
        shown = ", ".join(f"{uid or '(no SeriesInstanceUID)'} ({len(v)} files)" for uid, v in groups.items())
        raise Rejected(f"{folder}: holds {len(groups)} series, expected one: {shown}")
    ((series, items),) = groups.items()
    return reconstruct_headers(study_of[series], series, items, policy)


__all__ = [
    "PAD_HU",
    "Predecoded",
    "PredecodedLookup",
    "predecode",
    "read_dicom_folder",
    "reconstruct",
    "reconstruct_headers",
]
