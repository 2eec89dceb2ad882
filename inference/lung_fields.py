"""Lung fields from HU alone: the region where a lung-parenchyma finding (ground glass) can be.

Used as an optional post-transform (``post_transforms.lung_fields`` in config_inference.json): labels outside the
lung fields are set to background. Ground glass is by definition a finding of the lung parenchyma, yet a network
that has only seen chests will sometimes answer to haze it was never shown: blankets, clothing or hair in the air
around the patient, a rim of partial volume at the edge of the scan. No library ships a lung mask that needs
neither a model nor a GPU, so this one is written here; it is the classic threshold / connected-component /
hole-fill recipe, computed on blocks of about 3 mm so it costs a small fraction of the inference.

The recipe, on the model grid:

1. average blocks of ``block_mm`` in-plane (``sitk.BinShrink``): vessels, noise and fine texture drop out;
2. keep voxels at or below ``max_hu`` (-200 HU: lung, airways and ground glass, which stays below -300 HU, are
   in; fat, soft tissue and bone are out);
3. keep 3-D components of at least ``min_volume_ml`` that do not touch the in-plane border of the scan (the air
   around the patient touches it, or joins air that does);
4. fill holes slice by slice (vessels, nodules, consolidation enclosed by lung belong to the lung fields);
5. grow by ``margin_mm`` in-plane, so haze against the pleura is not cut at the block edges.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from inference.spec import LungFieldSpec

BoolArray = npt.NDArray[np.bool_]


def lung_field_blocks(image: sitk.Image, spec: LungFieldSpec) -> tuple[BoolArray, tuple[int, int]]:
    """The lung fields of a 3-D HU image on a grid of in-plane blocks.

    Returns the mask as a (z, y', x') array over blocks and the block size in voxels (y, x); voxel (z, y, x) of
    ``image`` belongs to block (z, y // by, x // bx), the last partial block of a row repeating its neighbour.
    """
    air, block = block_air(image, spec)
    return blocks_lung_fields(air, spec), block


def block_air(image: sitk.Image, spec: LungFieldSpec) -> tuple[sitk.Image, tuple[int, int]]:
    """Steps 1-2 alone: blocks whose mean HU is at or below ``max_hu`` (uint8, 1 byte a block) and the block size
    (y, x) in voxels. A pipeline keeps this small image through inference and runs the rest afterwards, when the
    model's memory is no longer needed."""
    spacing = image.GetSpacing()
    size = image.GetSize()
    bx = min(max(1, round(spec.block_mm / spacing[0])), size[0])
    by = min(max(1, round(spec.block_mm / spacing[1])), size[1])
    return sitk.BinaryThreshold(sitk.BinShrink(image, [bx, by, 1]), -math.inf, spec.max_hu, 1, 0), (by, bx)


def blocks_lung_fields(air: sitk.Image, spec: LungFieldSpec) -> BoolArray:
    """Steps 3-5 on the thresholded blocks: the lung fields as a (z, y', x') array over blocks."""
    return grow_blocks(blocks_lung_core(air, spec), air.GetSpacing(), spec)


def blocks_lung_core(air: sitk.Image, spec: LungFieldSpec) -> BoolArray:
    """Steps 3-4 on the thresholded blocks: the lungs themselves, before the margin of step 5 (which keeps haze
    at the pleura from being cut, but is not lung): what the burden numbers measure as the lung."""
    spacing = air.GetSpacing()
    components = sitk.ConnectedComponent(air, False)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(components)
    bnx, bny = air.GetSize()[0], air.GetSize()[1]
    block_ml = math.prod(spacing) / 1000.0
    keep = []
    for lab in stats.GetLabels():
        x0, y0, _z0, sx, sy, _sz = stats.GetBoundingBox(lab)
        touches_border = x0 == 0 or y0 == 0 or x0 + sx >= bnx or y0 + sy >= bny
        if not touches_border and stats.GetNumberOfPixels(lab) * block_ml >= spec.min_volume_ml:
            keep.append(lab)
    mask: BoolArray = np.isin(sitk.GetArrayViewFromImage(components), keep)
    # Slice-by-slice hole filling in one call: the slices stacked as rows of one 2-D image. No kept component
    # touches the in-plane border, so every slice's first and last rows are background joined to the image
    # border, and a hole cannot leak from one slice into the next (300 separate calls cost 30 times more).
    nz, ny, nx = mask.shape
    filled = sitk.BinaryFillhole(sitk.GetImageFromArray(mask.reshape(nz * ny, nx).view(np.uint8)))
    core: BoolArray = (sitk.GetArrayViewFromImage(filled) > 0).reshape(nz, ny, nx)
    return core


def grow_blocks(core: BoolArray, spacing: tuple[float, ...], spec: LungFieldSpec) -> BoolArray:
    """Step 5: the lungs grown by ``margin_mm`` in-plane (``spacing``: the blocks' (x, y, z) spacing)."""
    radius = (round(spec.margin_mm / spacing[0]), round(spec.margin_mm / spacing[1]), 0)
    if not (any(radius) and core.any()):
        return core
    grown = sitk.BinaryDilate(sitk.GetImageFromArray(core.view(np.uint8)), [int(r) for r in radius])
    mask: BoolArray = sitk.GetArrayViewFromImage(grown) > 0
    return mask


def blocks_image(blocks: BoolArray, air: sitk.Image) -> sitk.Image:
    """A block mask as a uint8 image (1 = in) on the blocks' own grid: ``air``'s origin, spacing and direction,
    so it lies where the blocks lie in patient space."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(blocks, dtype=np.uint8))
    image.CopyInformation(air)
    return image


def expand_blocks(blocks: BoolArray, block_yx: tuple[int, int], shape_zyx: tuple[int, int, int]) -> BoolArray:
    """The block mask on the full (z, y, x) grid it was computed from (see ``lung_field_blocks``)."""
    by, bx = block_yx
    yi = np.minimum(np.arange(shape_zyx[1]) // by, blocks.shape[1] - 1)
    xi = np.minimum(np.arange(shape_zyx[2]) // bx, blocks.shape[2] - 1)
    return blocks[:, yi][:, :, xi]


def clear_outside(labels: npt.NDArray[np.uint8], blocks: BoolArray, block_yx: tuple[int, int]) -> None:
    """Set ``labels`` (z, y, x, any strides) to 0 outside the block mask, in place.

    Same result as ``labels *= expand_blocks(...)`` without building a full-size mask or copying ``labels``
    (the volume may be a transposed view): one slice at a time, with a slice-sized temporary.
    """
    by, bx = block_yx
    _nz, ny, nx = labels.shape
    yi = np.minimum(np.arange(ny) // by, blocks.shape[1] - 1)
    xi = np.minimum(np.arange(nx) // bx, blocks.shape[2] - 1)
    rows = blocks[:, :, xi].view(np.uint8)  # (z, y blocks, x): a quarter of a volume of bytes
    for z in range(labels.shape[0]):
        labels[z] *= rows[z][yi]
