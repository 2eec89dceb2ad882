"""The seven real chest CT backgrounds, each with its solid-lesion mask, behind one small API.

Every background is a float32 HU SimpleITK image (LPS, on its own grid: the resample to the model grid happens
elsewhere, ``common.to_model_grid``) and a bool (z, y, x) mask on the same grid of its SOLID nodules and lesions.
Those are hard negatives: the simulator keeps ground glass away from them and they are never labelled ground glass.

- ``lung1``, ``lung2``: PyRadiomics sample volumes with their manual lesion labels (``common.load_real``).
- ``lidc_idri_0028/0295/0306/0350``: LIDC-IDRI scans averaged to 5 mm slabs (NRRD); the mask comes from the LIDC
  readers' XML (all solid: texture 4-5 where rated), 0295 has none and 0306's XML holds no nodule (empty masks).
- ``lidc_idri_0001``: a real DICOM series (JPEG-LS lossless, 2.5 mm) read through the node's own reconstruction,
  so the training background is exactly what the node itself would make of that series, plus its readers' XML.

Run ``python models/training/backgrounds.py`` to load all seven and print their geometry and mask statistics
(a mask that misses its nodules shows up as a low mean HU inside it).
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

NAMES: tuple[str, ...] = (
    "lung1",
    "lung2",
    "lidc_idri_0028",
    "lidc_idri_0295",
    "lidc_idri_0306",
    "lidc_idri_0350",
    "lidc_idri_0001",
)
TRAIN: tuple[str, ...] = ("lung1", "lidc_idri_0028", "lidc_idri_0306", "lidc_idri_0350", "lidc_idri_0001")
"""The backgrounds training (and the calibration of its last step) may load."""
HELDOUT: tuple[str, ...] = ("lung2", "lidc_idri_0295")
"""The backgrounds no training step loads: only ``evaluate_patterns`` draws on them."""
LIDC_SLABS = ("lidc_idri_0028", "lidc_idri_0295", "lidc_idri_0306", "lidc_idri_0350")
LIDC_DIR = common.DATA / "chest_ct_lidc"
LIDC_0001_DIR = common.DATA / "ct_lidc_0001_jpegls"
LIDC_NS = "{http://www.nih.gov}"
AIR_HU = -1024.0
"""Floor of the LIDC images: their -2048 / -3024 HU padding outside the scanner's field of view is no tissue."""
LIDC_SLICE = 512
"""The LIDC contours are in pixel columns/rows of the original 512x512 slices."""


@dataclass(frozen=True, eq=False)
class Background:
    """One real chest CT and its solid lesions. ``eq=False``: comparing numpy arrays field by field is ambiguous,
    so two backgrounds are equal only when they are the same object."""

    name: str
    image: sitk.Image
    """float32 HU, LPS, on the scan's own grid."""
    solid: np.ndarray
    """bool (z, y, x), same grid as ``image``: solid lesions / nodules, never ground glass."""
    source: str
    """One line: where the data came from and under which licence."""


def load(name: str) -> Background:
    """Load background ``name`` (one of ``NAMES``)."""
    if name in ("lung1", "lung2"):
        image, solid = common.load_real(name)
        source = f"PyRadiomics sample data chest_ct_volumes/{name}_image.nrrd + _label.nrrd (BSD-3-Clause)"
    elif name in LIDC_SLABS:
        image = _floor_air(sitk.ReadImage(str(LIDC_DIR / f"{name}.nrrd"), sitk.sitkFloat32))
        solid = lidc_solid_mask(LIDC_DIR / f"{name}_nodules.xml", image)
        source = (
            f"LIDC-IDRI-{name[-4:]} (TCIA) averaged to 5 mm slabs, chest_ct_lidc/{name}.nrrd, nodules from the "
            "LIDC readers' XML (CC BY 3.0)"
        )
    elif name == "lidc_idri_0001":
        image = _floor_air(_read_dicom_series(LIDC_0001_DIR / "ct"))
        solid = lidc_solid_mask(LIDC_0001_DIR / "lidc_idri_0001_nodules.xml", image)
        source = (
            "LIDC-IDRI-0001 (TCIA) DICOM series, JPEG-LS lossless re-encoded, ct_lidc_0001_jpegls/ct, 2.5 mm, "
            "nodules from the LIDC readers' XML (CC BY 3.0)"
        )
    else:
        raise ValueError(f"unknown background {name!r}; expected one of {NAMES}")
    if solid.shape != sitk.GetArrayViewFromImage(image).shape:
        raise ValueError(f"{name}: solid mask {solid.shape} does not match the image {image.GetSize()[::-1]}")
    return Background(name=name, image=image, solid=solid.astype(bool), source=source)


def _floor_air(image: sitk.Image) -> sitk.Image:
    """Clamp to >= -1024 HU. The LIDC scans carry -2048 / -3024 HU padding outside the reconstructed field of
    view: it is no tissue, and left in it would drag smoothing, normalisation and the simulator's parenchyma
    statistics far below air at the edge of the circle. Air itself is about -1000 HU, so nothing real is lost."""
    return sitk.Cast(sitk.Maximum(sitk.Cast(image, sitk.sitkFloat32), AIR_HU), sitk.sitkFloat32)


def _read_dicom_series(folder: Path) -> sitk.Image:
    """The series' HU image as the node reconstructs it (``read_dicom_folder`` with the default reconstruction
    policy, as file mode and the daemon use when nothing is configured), at its own 2.5 mm grid."""
    from dicom_node.file_mode import read_dicom_folder
    from dicom_node.settings import ReconstructionSection

    return sitk.Cast(read_dicom_folder(folder, ReconstructionSection()).image, sitk.sitkFloat32)


# ----------------------------------------------------------------------------------------------- LIDC XML
@dataclass(frozen=True)
class Roi:
    """One reader's contour of one nodule on one original slice."""

    reader: int
    nodule: str
    z_mm: float
    inclusion: bool
    points: tuple[tuple[int, int], ...]
    """(column, row) pixels of the original 512x512 slice."""


def lidc_rois(xml_path: Path) -> Iterator[Roi]:
    """Every nodule contour in a LIDC reading XML, over all reading sessions (readers). ``nonNodule`` marks (not
    nodules, no extent) are skipped; nodules < 3 mm come as a single edge-map point."""
    root = ET.parse(xml_path).getroot()
    for reader, session in enumerate(root.iter(f"{LIDC_NS}readingSession")):
        for nodule in session.iter(f"{LIDC_NS}unblindedReadNodule"):
            nid = (nodule.findtext(f"{LIDC_NS}noduleID") or "").strip()
            for roi in nodule.iter(f"{LIDC_NS}roi"):
                pts = tuple(
                    (
                        int(float(e.findtext(f"{LIDC_NS}xCoord") or "nan")),
                        int(float(e.findtext(f"{LIDC_NS}yCoord") or "nan")),
                    )
                    for e in roi.iter(f"{LIDC_NS}edgeMap")
                )
                if not pts:
                    continue
                yield Roi(
                    reader=reader,
                    nodule=nid,
                    z_mm=float(roi.findtext(f"{LIDC_NS}imageZposition") or "nan"),
                    inclusion=(roi.findtext(f"{LIDC_NS}inclusion") or "TRUE").strip().upper() == "TRUE",
                    points=pts,
                )


def rasterise(points: tuple[tuple[int, int], ...], size_xy: tuple[int, int]) -> np.ndarray:
    """A contour as a bool (y, x) mask: polygon outline + fill (the LIDC edge map is the nodule's outer boundary,
    so its pixels belong to the nodule); a single point (a nodule < 3 mm) becomes a 3x3 pixel square."""
    canvas = Image.new("1", size_xy, 0)
    draw = ImageDraw.Draw(canvas)
    if len(points) == 1:
        (x, y) = points[0]
        draw.rectangle((x - 1, y - 1, x + 1, y + 1), fill=1, outline=1)
    else:
        draw.polygon(list(points), fill=1, outline=1)
    return np.array(canvas, dtype=bool)


def lidc_solid_mask(xml_path: Path, image: sitk.Image) -> np.ndarray:
    """Union over readers and nodules of the LIDC contours, on ``image``'s grid (bool, z, y, x); empty if the XML
    does not exist.

    In-plane, the XML's pixel coordinates are used directly: that needs the image to be the original 512x512 axial
    grid (checked; the NRRD slabs and the DICOM series both are). Along z, each contour's ``imageZposition`` (patient
    z, mm) goes to the slice k = round((z - origin_z) / spacing_z) through the image's own geometry, so a 5 mm slab
    averaged from thinner slices collects every original slice it covers (their union); a contour on a slice outside
    the volume is skipped. Exclusion contours (inclusion FALSE: holes) are cut out of their own reader's nodule on
    their own original slice only, before the union, so one reader's hole never erases another reader's nodule.
    """
    nx, ny, nz = image.GetSize()
    mask = np.zeros((nz, ny, nx), bool)
    if not xml_path.exists():
        return mask
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if (nx, ny) != (LIDC_SLICE, LIDC_SLICE) or not np.allclose(direction, np.eye(3), atol=1e-6):
        raise ValueError(f"{xml_path.name}: LIDC contours need the original 512x512 axial grid, got {image.GetSize()}")
    per_slice: dict[tuple[int, str, float], tuple[np.ndarray, np.ndarray]] = {}
    for roi in lidc_rois(xml_path):
        key = (roi.reader, roi.nodule, roi.z_mm)
        inc, exc = per_slice.setdefault(key, (np.zeros((ny, nx), bool), np.zeros((ny, nx), bool)))
        (inc if roi.inclusion else exc)[...] |= rasterise(roi.points, (nx, ny))
    ox, oy, _ = image.GetOrigin()
    for (_reader, _nodule, z_mm), (inc, exc) in per_slice.items():
        kc = image.TransformPhysicalPointToContinuousIndex((ox, oy, z_mm))[2]
        k = int(np.floor(kc + 0.5))
        if 0 <= k < nz:
            mask[k] |= inc & ~exc
    return mask


# ----------------------------------------------------------------------------------------------- report
def summary(bg: Background) -> dict[str, float | int | str]:
    """Geometry and mask statistics of one background (what ``__main__`` prints)."""
    hu = sitk.GetArrayViewFromImage(bg.image)
    sx, sy, sz = bg.image.GetSpacing()
    n = int(bg.solid.sum())
    return {
        "name": bg.name,
        "size": "x".join(str(v) for v in bg.image.GetSize()),
        "spacing": f"{sx:.3f}x{sy:.3f}x{sz:.2f}",
        "hu_min": float(hu.min()),
        "hu_max": float(hu.max()),
        "solid_voxels": n,
        "solid_ml": n * sx * sy * sz / 1000.0,
        "solid_mean_hu": float(hu[bg.solid].mean()) if n else float("nan"),
    }


def main() -> None:
    print(f"{'name':16} {'size':12} {'spacing mm':18} {'HU range':>14} {'solid vox':>9} {'mL':>7} {'mean HU':>8}")
    for name in NAMES:
        s = summary(load(name))
        print(
            f"{s['name']:16} {s['size']:12} {s['spacing']:18} {s['hu_min']:6.0f}..{s['hu_max']:<6.0f} "
            f"{s['solid_voxels']:9d} {s['solid_ml']:7.2f} {s['solid_mean_hu']:8.0f}"
        )


if __name__ == "__main__":
    main()
