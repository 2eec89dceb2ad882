"""What every object the node derives from a series takes from its sources: the patient and study attributes of
their headers, and the label and the CT on each source plane.

The derived objects (SEG frames, overlay images, preview tiles) lie on the *source* images' planes, so that a
viewer shows them exactly on the images the PACS holds. When reconstruction did not resample, source frame k is
slice k of the volume and nothing is sampled; otherwise each plane is sampled by geometry: the label by nearest
neighbour (:class:`dicom_node.series.geometry.PlaneSampler`, ITK's rounding), the CT linearly by SimpleITK,
-1024 HU outside the volume.
"""

from __future__ import annotations

import copy

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from pydicom.dataset import Dataset

from dicom_node.errors import Rejected
from dicom_node.series import geometry
from dicom_node.types import CTVolume

TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
"""Patient and study attributes highdicom copies from the first source; Type 2 in the derived objects, so an
absent one is copied as empty rather than failing the run."""

AIR_HU = -1024.0
"""What the CT reads outside the reconstructed volume (a resampled series' planes may reach past it)."""


PATIENT_SEX_VALUES = ("M", "F", "O")
"""The enumerated values of Patient's Sex (0010,0040); highdicom refuses any other."""


def copyable_header(ds: Dataset) -> Dataset:
    """``ds`` as a derived object may copy its patient and study from it: ``ds`` itself, or a copy with the
    absent :data:`TYPE2_COPIED` attributes present and empty and a Patient's Sex outside M/F/O emptied."""
    missing = [k for k in TYPE2_COPIED if k not in ds]
    bad_sex = "PatientSex" in ds and str(ds.PatientSex or "") not in ("", *PATIENT_SEX_VALUES)
    if not missing and not bad_sex:
        return ds
    patched = copy.deepcopy(ds)
    for keyword in missing:
        setattr(patched, keyword, "")
    if bad_sex:
        patched.PatientSex = ""
    return patched


def repair_copied_patient_module(ds: Dataset) -> None:
    """De-identified sources often say PatientIdentityRemoved YES but leave DeidentificationMethod (Type 1C)
    empty; copied as is, a derived object would fail validation. Say that the method is not known rather than
    drop the flag."""
    if str(ds.get("PatientIdentityRemoved", "")).upper() == "YES" and not (
        ds.get("DeidentificationMethod") or ds.get("DeidentificationMethodCodeSequence")
    ):
        ds.DeidentificationMethod = "Not stated in the source images"


def _grid(image: sitk.Image) -> geometry.Grid:
    return geometry.Grid.of(image.GetOrigin(), image.GetSpacing(), image.GetDirection(), image.GetSize())


class SourcePlanes:
    """A volume's label and CT on its source planes, frame k being ``volume.sources[k]``.

    Whether the planes *are* the volume's slices is decided once, here; a label passed in must lie on the
    volume's grid (the SEG writer checks it).
    """

    def __init__(self, volume: CTVolume) -> None:
        self.volume = volume
        planes = [s.plane for s in volume.sources]
        shapes = {(p.rows, p.columns) for p in planes}
        if len(shapes) != 1:
            raise Rejected(f"source frames differ in size {sorted(shapes)}")
        self.rows, self.columns = shapes.pop()
        self.aligned = not volume.resampled and geometry.planes_are_slices(planes, _grid(volume.image))
        """True: source frame k is slice k of the volume, nothing is sampled."""

    def __len__(self) -> int:
        return len(self.volume.sources)

    def labels(self, label: sitk.Image) -> npt.NDArray[np.uint8]:
        """``label`` (uint8, on the volume's grid) on every source plane: (frames, rows, columns)."""
        array = sitk.GetArrayViewFromImage(label)
        if self.aligned:
            return np.array(array, dtype=np.uint8)
        masks = np.zeros((len(self), self.rows, self.columns), dtype=np.uint8)
        sampler = geometry.PlaneSampler(array, _grid(label))
        for k, source in enumerate(self.volume.sources):
            masks[k] = sampler.sample(source.plane)
        return masks

    def hu(self, index: int) -> npt.NDArray[np.float32]:
        """The CT (HU) on the plane of source frame ``index``: (rows, columns) float32."""
        image = self.volume.image
        if self.aligned:
            return np.asarray(sitk.GetArrayViewFromImage(image)[index], dtype=np.float32)
        plane = self.volume.sources[index].plane
        position, step_col, step_row = geometry.plane_vectors(plane)
        row_dir, col_dir = step_col / np.linalg.norm(step_col), step_row / np.linalg.norm(step_row)
        reference = sitk.Image([plane.columns, plane.rows, 1], sitk.sitkFloat32)
        reference.SetOrigin(position.tolist())
        reference.SetSpacing([plane.pixel_spacing[1], plane.pixel_spacing[0], 1.0])
        reference.SetDirection(np.column_stack([row_dir, col_dir, np.cross(row_dir, col_dir)]).ravel().tolist())
        sampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
        hu: npt.NDArray[np.float32] = sitk.GetArrayFromImage(sampled)[0]  # a copy: ``sampled`` is freed on return
        return hu


__all__ = ["AIR_HU", "TYPE2_COPIED", "SourcePlanes", "copyable_header", "repair_copied_patient_module"]
