"""``dicom-node infer``: the file-mode operator that replaces Clara Deploy's COVID-19 lesion segmentation.

One volume in ``input_dir`` -> ``<name>.mhd`` + ``.raw`` (uint8 labels on exactly the input grid) and
``<name>.json`` (the burden numbers, :mod:`inference.burden`; when the model spec has lung fields) in
``output_dir``; with ``publish_dir``, also the Clara Render Server layout (original volume, ``<name>.output.mhd``,
``config_render.json``, ``config.meta``). Errors propagate as InferenceError subclasses; cli.py prints them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from dicom_node.errors import Rejected
from dicom_node.inference_runtime import open_backend
from dicom_node.series.headers import READ_ERRORS, instance_uids
from dicom_node.series.reconstruct import reconstruct_headers
from dicom_node.settings import ReconstructionSection, Settings
from dicom_node.types import CTVolume, InstanceRecord
from inference.backend import Backend
from inference.burden import ground_glass_labels, measure_burden, write_burden
from inference.errors import InferenceError, InputVolumeError
from inference.pipeline import SegmentationResult, segment
from inference.spec import InferenceSpec, load_spec
from inference.volume_io import InputVolume, read_volume
from inference.writers import OutputError, write_label, write_publish

log = logging.getLogger(__name__)

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

BackendFactory = Callable[[Settings, InferenceSpec, "str | None"], AbstractContextManager[Backend]]

RENDER_CONFIG_NAME = "config_render.json"
_PACKAGED_CONFIG = Path(__file__).resolve().parent.parent / "config"


def read_dicom_folder(folder: Path, policy: ReconstructionSection) -> CTVolume:
    """Reconstruct the one series in ``folder`` (files at any depth; non-DICOM files and DICOMDIR are ignored)
    through the node's own reconstruction, so file mode and the daemon agree.

    Raises ``Rejected`` when the folder holds no DICOM image or more than one series.
    """
    groups: dict[str, list[tuple[InstanceRecord, Dataset]]] = {}
    study_of: dict[str, str] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except READ_ERRORS:
            continue
        uids = instance_uids(ds, transfer_syntax_uid=ImplicitVRLittleEndian)
        if uids.sop_class_uid == MEDIA_STORAGE_DIRECTORY or "Rows" not in ds:
            continue  # a DICOMDIR, or not an image (a SR, a SEG...)
        stat = path.stat()
        record = InstanceRecord(
            sop_instance_uid=uids.sop_instance_uid, sop_class_uid=uids.sop_class_uid,
            study_instance_uid=uids.study_instance_uid, series_instance_uid=uids.series_instance_uid,
            transfer_syntax_uid=uids.transfer_syntax_uid, path=path.resolve(), size=stat.st_size,
            calling_ae_title="", association_id="", received_at=stat.st_mtime,
        )  # fmt: skip
        groups.setdefault(uids.series_instance_uid, []).append((record, ds))
        study_of.setdefault(uids.series_instance_uid, uids.study_instance_uid)
    if not groups:
        raise Rejected(f"{folder}: no DICOM image found")
    if len(groups) > 1:
        shown = ", ".join(f"{uid or '(no SeriesInstanceUID)'} ({len(v)} files)" for uid, v in groups.items())
        raise Rejected(f"{folder}: holds {len(groups)} series, expected one: {shown}")
    ((series, items),) = groups.items()
    return reconstruct_headers(study_of[series], series, items, policy)


def _read_dicom_series(folder: Path, settings: Settings) -> tuple[sitk.Image, tuple[Path, ...]]:
    try:
        volume = read_dicom_folder(folder, settings.reconstruction)
    except Rejected as exc:
        raise InputVolumeError(f"{folder}: {exc}") from exc
    return volume.image, tuple(dict.fromkeys(s.path for s in volume.sources))


def render_config_path(spec: InferenceSpec) -> Path:
    """``config_render.json`` beside the spec, else the one shipped in the project's ``config/``."""
    if spec.source is not None:
        beside = spec.source.parent / RENDER_CONFIG_NAME
        if beside.is_file():
            return beside
    return _PACKAGED_CONFIG / RENDER_CONFIG_NAME


def write_outputs(
    volume: InputVolume,
    result: SegmentationResult,
    spec: InferenceSpec,
    output_dir: Path,
    publish_dir: Path | None,
) -> Path:
    """The MHD label and the burden numbers in ``output_dir`` and, if asked, the publish folder. Returns the
    label header's path."""
    header = write_label(result.label, output_dir, volume.name)
    if result.lung_mask is not None:
        burden = measure_burden(result.label, result.lung_mask, ground_glass_labels(spec.segments))
        write_burden(burden, output_dir / f"{volume.name}.json")
        log.info("%s: %s", volume.source, burden.summary())
    if publish_dir is not None:
        write_publish(
            publish_dir,
            name=volume.name,
            label=result.label,
            original_files=volume.files if volume.kind != "dicom" else (),
            render_config=render_config_path(spec),
            model_name=spec.model.name,
            density_image=volume.image if volume.kind == "dicom" else None,
        )
    return header


def run_file_mode(
    settings: Settings,
    *,
    input_dir: Path,
    output_dir: Path,
    publish_dir: Path | None = None,
    spec_path: Path | None = None,
    backend: str | None = None,
    backend_factory: BackendFactory | None = None,
) -> int:
    """Segment the one volume of ``input_dir``; returns 0. ``backend`` overrides ``settings.inference.backend``.

    ``backend_factory`` (settings, spec, backend name) -> context manager yielding a Backend; by default
    ``dicom_node.inference_runtime.open_backend``, which starts a managed Triton when it has to.
    """
    t0 = time.perf_counter()
    spec = load_spec(spec_path or settings.inference.config)
    publish_dir = publish_dir if publish_dir is not None else settings.publish.publish_dir
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(f"{output_dir}: output path exists and is not a folder")
    volume = read_volume(input_dir, dicom_reader=lambda folder: _read_dicom_series(folder, settings))
    t_read = time.perf_counter() - t0
    factory = backend_factory or open_backend
    try:
        with factory(settings, spec, backend) as runtime:
            result = segment(volume.image, spec, runtime)
    except InferenceError as exc:
        # One line that names the input as well as the backend's own object (URL, model, tensor) and cause.
        raise type(exc)(f"{volume.source}: {exc}") from exc
    t1 = time.perf_counter()
    header = write_outputs(volume, result, spec, output_dir, publish_dir)
    t_write = time.perf_counter() - t1
    stages = " ".join(f"{k}={v:.2f}s" for k, v in {"read": t_read, **result.timings, "write": t_write}.items())
    log.info("%s -> %s (%s)", volume.source, header, stages)
    return 0
