"""Drawing for people who look rather than read: a CT slice in a lung window with the ground-glass outline, and
banners of text. Shared by the overlay images and the preview PNG.

The window is SimpleITK's ``IntensityWindowing``, the outline SimpleITK's ``BinaryContour`` of the mask grown by
one pixel (a 1-pixel line vanishes when a viewer shrinks a 512 x 512 image to its tile), the composition and the
text Pillow's (its bundled font, so no system font is needed). The outline colour is amber, a colour the
greyscale CT never has, so it stays visible on lung and on soft tissue, and a test can find it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from PIL import Image, ImageDraw, ImageFont

from inference.burden import Burden

OUTLINE_RGB = (255, 176, 0)
"""The ground-glass outline (amber)."""
BANNER_RGBA = (0, 0, 0, 170)
"""The band behind banner text: black, two-thirds opaque, so the text reads on any anatomy."""
TEXT_RGB = (255, 255, 255)
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"


@dataclass(frozen=True, slots=True)
class Window:
    """A CT display window (HU)."""

    center: float
    width: float

    @property
    def bounds(self) -> tuple[float, float]:
        return self.center - self.width / 2.0, self.center + self.width / 2.0


def greyscale(hu: npt.NDArray[np.float32], window: Window) -> Image.Image:
    """The slice (rows, columns, HU) in ``window`` as an 8-bit greyscale image."""
    lo, hi = window.bounds
    image = sitk.IntensityWindowing(sitk.GetImageFromArray(hu), lo, hi, 0.0, 255.0)
    return Image.fromarray(sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkUInt8)))


def outline(mask: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """The border of ``mask`` (rows, columns; non-zero = finding), about 3 pixels wide."""
    if not mask.any():
        return np.zeros(mask.shape, dtype=bool)
    binary = sitk.GetImageFromArray((mask > 0).astype(np.uint8))
    contour = sitk.BinaryDilate(sitk.BinaryContour(binary, fullyConnected=True), [1, 1])
    border: npt.NDArray[np.bool_] = sitk.GetArrayViewFromImage(contour) > 0
    return border


def slice_with_outline(hu: npt.NDArray[np.float32], mask: npt.NDArray[np.uint8], window: Window) -> Image.Image:
    """The CT slice in ``window`` (RGB) with the outline of ``mask`` drawn on it."""
    base = greyscale(hu, window).convert("RGB")
    border = outline(mask)
    if border.any():
        colour = Image.new("RGB", base.size, OUTLINE_RGB)
        base.paste(colour, mask=Image.fromarray(border.astype(np.uint8) * 255))
    return base


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` pixels."""
    return ImageFont.load_default(size=size)


def banner(image: Image.Image, lines: Sequence[str], *, size: int, at_bottom: bool = False) -> Image.Image:
    """``image`` with ``lines`` written on a translucent band across its top (or bottom); returns an RGB copy."""
    face = font(size)
    pad = max(2, size // 3)
    line_height = size + pad
    height = pad + line_height * len(lines)
    band = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(band)
    top = image.size[1] - height if at_bottom else 0
    draw.rectangle([0, top, image.size[0], top + height], fill=BANNER_RGBA)
    for n, text in enumerate(lines):
        draw.text((pad, top + pad + n * line_height), text, font=face, fill=TEXT_RGB)
    return Image.alpha_composite(image.convert("RGBA"), band).convert("RGB")


def burden_lines(burden: Burden | None) -> list[str]:
    """The burden numbers as short lines (right, left, both)."""
    if burden is None:
        return ["ground-glass burden not measured (the model spec has no lung fields)"]
    t = burden.total
    return [
        f"right lung {burden.right.ggo_ml:.1f} mL, {burden.right.percent:.1f} % (grade {burden.right.grade})   "
        f"left lung {burden.left.ggo_ml:.1f} mL, {burden.left.percent:.1f} % (grade {burden.left.grade})",
        f"both {t.ggo_ml:.1f} mL of {t.lung_ml:.0f} mL = {t.percent:.1f} %  (grade per lung, 0-5)",
    ]


__all__ = [
    "NOT_FOR_DIAGNOSTIC_USE",
    "OUTLINE_RGB",
    "Window",
    "banner",
    "burden_lines",
    "font",
    "greyscale",
    "outline",
    "slice_with_outline",
]
