"""The preview PNG of a job (``results/job-N/preview.png``): a few key slices with the ground-glass outline and the
burden numbers, for the status page and for people who look rather than read.

Key slices (``preview.key_slices`` of them, in slice order): the source slices with the largest ground-glass
area, spread over the levels the large findings span, so they show different levels of them rather than three
neighbours or a speck elsewhere; with no finding, slices evenly spaced through the series. Each tile is the
source slice as the overlay draws it (lung window, amber outline), shrunk to :data:`TILE_PX`, captioned with its
image number and ground-glass area; above the tiles, the "not for diagnostic use" line and the numbers. The file
is a palette PNG (256 colours are plenty for a greyscale CT and one outline colour, and make it about a third of
an RGB PNG's size).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from dicom_node.export.render import NOT_FOR_DIAGNOSTIC_USE, Window, banner, burden_lines, slice_with_outline
from dicom_node.export.sources import SourcePlanes
from inference.atomic import atomic_path
from inference.burden import Burden

log = logging.getLogger(__name__)

TILE_PX = 256
HEADER_FONT_PX = 13
CAPTION_FONT_PX = 11


BIG_AREA = 0.2
"""A slice counts among the large findings when its area is at least this share of the largest."""


def key_slices(masks: npt.NDArray[np.uint8], count: int) -> list[int]:
    """Up to ``count`` frame indices, in slice order: among the slices whose finding area is at least
    :data:`BIG_AREA` of the largest, the largest ones, spread over the levels those slices span (at least span /
    ``count`` apart); then the next largest, however close. With no finding, ``count`` frames evenly spaced
    through the series."""
    n = len(masks)
    areas = np.count_nonzero(masks.reshape(n, -1), axis=1)
    if not areas.any():
        return sorted({min(n - 1, round((i + 1) * n / (count + 1))) for i in range(count)})
    ranked = [int(k) for k in np.argsort(-areas, kind="stable") if areas[k] > 0]
    big = [k for k in ranked if areas[k] >= BIG_AREA * areas[ranked[0]]]
    gap = max(1, (max(big) - min(big)) // count)
    chosen: list[int] = []
    for k in big:
        if len(chosen) < count and all(abs(k - c) >= gap for c in chosen):
            chosen.append(k)
    chosen += [k for k in ranked if k not in chosen][: count - len(chosen)]
    return sorted(chosen)


def render_preview(
    planes: SourcePlanes, masks: npt.NDArray[np.uint8], burden: Burden | None, *, window: Window, count: int, title: str
) -> Image.Image:
    """The preview image (RGB)."""
    tiles: list[Image.Image] = []
    for k in key_slices(masks, count):
        plane = planes.volume.sources[k].plane
        area_cm2 = float(np.count_nonzero(masks[k])) * plane.pixel_spacing[0] * plane.pixel_spacing[1] / 100.0
        tile = slice_with_outline(planes.hu(k), masks[k], window).resize((TILE_PX, TILE_PX), Image.Resampling.LANCZOS)
        caption = f"image {k + 1} of {len(planes)}   ground glass {area_cm2:.1f} cm2"
        tiles.append(banner(tile, [caption], size=CAPTION_FONT_PX, at_bottom=True))
    lines = [f"{NOT_FOR_DIAGNOSTIC_USE}   {title}", *burden_lines(burden)]
    header_px = (HEADER_FONT_PX + HEADER_FONT_PX // 3) * len(lines) + 2 * (HEADER_FONT_PX // 3) + 2
    width = TILE_PX * max(count, len(tiles))
    header = banner(Image.new("RGB", (width, header_px)), lines, size=HEADER_FONT_PX)
    sheet = Image.new("RGB", (width, header_px + TILE_PX))
    sheet.paste(header, (0, 0))
    for n, tile in enumerate(tiles):
        sheet.paste(tile, (n * TILE_PX, header_px))
    return sheet


def write_preview(
    planes: SourcePlanes,
    masks: npt.NDArray[np.uint8],
    burden: Burden | None,
    *,
    window: Window,
    count: int,
    title: str,
    out_path: Path,
) -> Path:
    """Render and write the preview (atomically; not flushed: a derived file that a re-run writes again)."""
    image = render_preview(planes, masks, burden, window=window, count=count, title=title)
    with atomic_path(out_path, fsync=False) as tmp:
        image.quantize(colors=256).save(tmp, format="PNG")
    log.info("preview written", extra={"path": str(out_path), "size": list(image.size)})
    return out_path


__all__ = ["TILE_PX", "key_slices", "render_preview", "write_preview"]
