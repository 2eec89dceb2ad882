"""Decoding: the stored pixel values of every planned frame, rescaled to HU into one float32 array.

Each instance is decoded by pydicom's pixel handlers (pylibjpeg-libjpeg for JPEG baseline/extended/lossless,
pylibjpeg-openjpeg for JPEG 2000, pyjpegls for JPEG-LS, pylibjpeg-rle or pydicom for RLE, pydicom for native and
deflated; GDCM first where it is measurably faster) in ``decode_workers`` threads, and rescaled straight into its
slot of one preallocated array. What the header alone can refuse (private compression, colour, no decoder) is
refused before any decoding (:func:`check_pixel_header`). Any decoder error, empty, truncated or missing pixel
data fails the series naming the instance and its transfer syntax: a slice is never left as zeros.

Instances decoded while the series arrived (:mod:`dicom_node.series.predecode`) are taken from there.
"""

from __future__ import annotations

import math
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, JPEGLossless, JPEGLosslessSV1

from dicom_node.errors import Rejected
from dicom_node.series.headers import READ_ERRORS, frame_headers, instance_uids
from dicom_node.series.plan import Plan, PlannedInstance, instance_label
from dicom_node.types import InstanceRecord

_ELSCINT_COMPRESSION = (0x07A1, 0x1011)


def _ts_name(ts: UID) -> str:
    return f"{ts.name} ({ts})" if ts.is_transfer_syntax else f"transfer syntax {ts}"


def check_pixel_header(ds: Dataset, ts: UID, label: str) -> None:
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
    """An instance decoded ahead of its job (``dicom_node.series.predecode``): its stored pixel values, not
    rescaled, shape (frames, rows, columns), or the reason decoding failed (``failure``: the whole ``Rejected``
    message)."""

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
    except READ_ERRORS as exc:
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
    data: bytes | None = ds.PixelData
    if not data:
        raise Rejected(f"{ts_label}: Pixel Data is empty (an image without pixels cannot be reconstructed)")
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
    except READ_ERRORS:
        return None  # the job reads it again and says why
    full: Dataset | None = header
    try:
        if "Rows" not in header:  # pydicom returns an empty dataset for a file cut inside its pixel data
            full, header = None, pydicom.dcmread(record.path, stop_before_pixels=True)
        uids = instance_uids(
            header, sop_instance_uid=record.sop_instance_uid, transfer_syntax_uid=record.transfer_syntax_uid
        )
        ts = UID(uids.transfer_syntax_uid)
        label = instance_label(record.series_instance_uid, uids.sop_instance_uid, record.path)
        check_pixel_header(header, ts, label)
        frames = frame_headers(header)
    except Exception:  # the job reads the header again and reports what is wrong with it
        return None
    shape = (len(frames), frames[0].plane.rows, frames[0].plane.columns)
    try:
        return Predecoded(shape, _decode_pixels(full if full is not None else Dataset(), ts, *shape, label))
    except Rejected as exc:
        return Predecoded(shape, None, str(exc))


def _rescale_into(inst: PlannedInstance, arr: npt.NDArray[Any], slots: list[tuple[int, int]],
                  volume: npt.NDArray[np.float32]) -> None:  # fmt: skip
    for index, slot in slots:
        fh = inst.frames[index]
        out = volume[slot]
        if fh.slope == 1.0:
            np.add(arr[index], np.float32(fh.intercept), out=out, casting="unsafe")
        else:
            np.multiply(arr[index], np.float32(fh.slope), out=out, casting="unsafe")
            out += np.float32(fh.intercept)


def _decode_into(inst: PlannedInstance, slots: list[tuple[int, int]], volume: npt.NDArray[np.float32], rows: int,
                 cols: int) -> None:  # fmt: skip
    """Decode one instance and write each (frame index, slot) rescaled into ``volume[slot]``."""
    ds = _read_pixels(inst.record.path, inst.label)
    arr = _decode_pixels(ds, inst.transfer_syntax, len(inst.frames), rows, cols, inst.label)
    _rescale_into(inst, arr, slots, volume)


def _from_predecoded(cache: PredecodedLookup, inst: PlannedInstance, slots: list[tuple[int, int]],
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


def decode_volume(
    plan: Plan, workers: int, cache: PredecodedLookup | None = None
) -> tuple[npt.NDArray[np.float32], int]:
    """The volume, and how many instances came decoded from ``cache``."""
    rows, cols = plan.rows, plan.columns
    volume = np.empty((len(plan.frames), rows, cols), dtype=np.float32)
    by_instance: dict[int, tuple[PlannedInstance, list[tuple[int, int]]]] = {}
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


__all__ = ["PREFERRED_PLUGIN", "Predecoded", "PredecodedLookup", "check_pixel_header", "decode_volume", "predecode"]
