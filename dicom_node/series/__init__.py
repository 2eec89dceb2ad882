"""Stage 3: a complete series -> the axial CT volume in HU with its true geometry, from headers to pixels.

``headers`` (the one header reader), ``geometry`` (all plane maths), ``selection`` (which series are processed),
``plan`` (sort, duplicates, tilt, spacing; headers only), ``decode`` (pixels, rescaled), ``predecode`` (decoding
while a series arrives), ``resample`` (onto a regular grid), ``reconstruct`` (the three in order).

Imports nothing of the node but ``settings``, ``types`` and ``errors``.
"""

from dicom_node.series.decode import Predecoded, predecode
from dicom_node.series.headers import (
    FrameHeader,
    HeaderError,
    InstanceUIDs,
    frame_headers,
    header_facts,
    instance_uids,
    read_header,
    read_headers,
    source_frames,
)
from dicom_node.series.plan import Plan
from dicom_node.series.predecode import PreDecoder
from dicom_node.series.reconstruct import build_volume, plan_series, reconstruct, reconstruct_headers
from dicom_node.series.selection import SelectionDecision, select_headers, select_series

__all__ = [
    "FrameHeader",
    "HeaderError",
    "InstanceUIDs",
    "Plan",
    "PreDecoder",
    "Predecoded",
    "SelectionDecision",
    "build_volume",
    "frame_headers",
    "header_facts",
    "instance_uids",
    "plan_series",
    "predecode",
    "read_header",
    "read_headers",
    "reconstruct",
    "reconstruct_headers",
    "select_headers",
    "select_series",
    "source_frames",
]
