"""The job's outputs beside the SEG, through the production processor with a stand-in model on a synthetic chest:
the burden numbers stored with the job and shown by ``dicom-node status``, the SR that references the SEG's
segment and holds the same numbers, the overlay images and the preview, queued in the order they must be sent."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image

from dicom_node import admin
from dicom_node.db import Database
from dicom_node.export.overlay import patient_orientation
from dicom_node.export.preview import key_slices
from dicom_node.export.render import OUTLINE_RGB
from dicom_node.jobs import JobState
from dicom_node.processing import SeriesProcessor
from dicom_node.settings import Settings
from dicom_node.types import FramePlane, HeaderFacts, InstanceRecord
from tests import factories

REPO = Path(__file__).resolve().parents[2]
SPACING = (4.0, 4.0, 5.0)
GGO_HU = -450
GGO_CENTRE_MM = (70.0, 50.0, 30.0)  # in the left lung (LPS x > 0), posterior (below the banner)
GGO_RADIUS_MM = 20.0


class GroundGlassBackend:
    """Logits [0, 0.15 - |x - 0.37|]: label 1 where the normalised intensity is within 0.15 of 0.37, i.e. HU
    between about -670 and -220: the phantom's ground glass, not its lungs (-850) or its body (40)."""

    name = "ground-glass-band"

    def check(self) -> None: ...

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return np.concatenate([np.zeros_like(batch), 0.15 - np.abs(batch - 0.37)], axis=1)

    def close(self) -> None: ...


def _chest() -> tuple[sitk.Image, np.ndarray]:
    """A chest phantom on the model's own grid (4 x 4 x 5 mm, so nothing is resampled): air, a body ellipse, two
    lungs either side of a mediastinum, a ground-glass ball in the left lung. Returns the HU image and the ball."""
    nz, ny, nx = 12, 96, 96
    origin = (-190.0, -190.0, 0.0)
    z, y, x = np.meshgrid(
        *[origin[a] + SPACING[a] * np.arange(n) for a, n in ((2, nz), (1, ny), (0, nx))], indexing="ij"
    )
    hu = np.full((nz, ny, nx), -1000, dtype=np.int16)
    hu[(x / 170) ** 2 + (y / 120) ** 2 <= 1] = 40
    for cx in (-75.0, 75.0):
        hu[((x - cx) / 55) ** 2 + (y / 80) ** 2 + ((z - 30) / 40) ** 2 <= 1] = -850
    ball = (x - GGO_CENTRE_MM[0]) ** 2 + (y - GGO_CENTRE_MM[1]) ** 2 + (z - GGO_CENTRE_MM[2]) ** 2 <= GGO_RADIUS_MM**2
    hu[ball] = GGO_HU
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(SPACING)
    image.SetOrigin(origin)
    return image, ball


def _spec(tmp_path: Path) -> Path:
    data = json.loads((REPO / "config" / "config_inference.json").read_text())
    data["pre_transforms"]["spacing_mm"] = list(SPACING)
    data["inferer"].update({"roi_size": [64, 64, 8], "batch_size": 4})
    path = tmp_path / "spec" / "config_inference.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture()
def processed(tmp_path: Path) -> Iterator[tuple[SeriesProcessor, Database, Settings, int, np.ndarray]]:
    image, ball = _chest()
    series = factories.write_ct_series(image, tmp_path / "series", tag="job-outputs-unit")
    settings = Settings.model_validate(
        {
            "storage": {"dir": str(tmp_path / "var"), "min_free_bytes": 0},
            "inference": {"config": str(_spec(tmp_path))},
            "reconstruction": {"predecode_cache_mb": 0},
            "destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": 1}],
            "overlay": {"enabled": True},
        }
    )
    db = Database(settings.storage.dir / "state.sqlite3")
    for path in series.files:
        record = InstanceRecord(
            sop_instance_uid=path.stem, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_instance_uid=series.study_instance_uid, series_instance_uid=series.series_instance_uid,
            transfer_syntax_uid="1.2.840.10008.1.2.1", path=path, size=path.stat().st_size, calling_ae_title="SCU",
            association_id="a1", received_at=1.0,
        )  # fmt: skip
        db.add_instance(record, HeaderFacts(modality="CT"))
    (stats,) = db.open_series()
    assert db.complete_series(stats, "test") is not None
    job = db.claim(60)
    assert job is not None

    @contextlib.contextmanager
    def factory(_settings: Settings, _spec: Any, _name: str | None) -> Iterator[GroundGlassBackend]:
        yield GroundGlassBackend()

    processor = SeriesProcessor(settings, db, backend_factory=factory)
    outcome = processor.process(job, db.manifest(job))
    assert outcome.state is JobState.EXPORTING, outcome
    assert "SR" in (outcome.reason or "") and "overlay images" in (outcome.reason or ""), outcome
    try:
        yield processor, db, settings, job.id, ball
    finally:
        db.close()


def test_burden_is_stored_with_the_job_and_shown_by_status(
    processed: tuple[SeriesProcessor, Database, Settings, int, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    _processor, db, settings, job_id, ball = processed
    (row,) = db.query("SELECT burden FROM jobs WHERE id=?", (job_id,))
    burden = json.loads(row["burden"])
    ball_ml = float(ball.sum()) * float(np.prod(SPACING)) / 1000.0
    assert burden["left"]["ggo_ml"] == pytest.approx(ball_ml)  # the ball is in the left lung (patient space)
    assert burden["right"]["ggo_ml"] == 0.0 and burden["right"]["grade"] == 0
    assert burden["left"]["lung_ml"] > 100 and burden["right"]["lung_ml"] > 100
    assert 3.0 < burden["left"]["percent"] < 5.0 and burden["left"]["grade"] == 1  # ~34 of ~740 mL: below 5 %
    assert abs(burden["midline_x_mm"]) < 20.0  # the mediastinum of the phantom, centred on x = 0

    (status_job,) = admin.collect_status(settings)["jobs"]
    assert status_job["burden"] == burden
    assert admin.print_status(settings) == 0
    out = capsys.readouterr().out
    assert f"left {burden['left']['ggo_ml']:.1f} mL" in out and "(grade 1)" in out


def test_sr_references_the_seg_segment_and_holds_the_numbers(
    processed: tuple[SeriesProcessor, Database, Settings, int, np.ndarray],
) -> None:
    processor, db, _settings, job_id, _ball = processed
    folder = processor.results_dir / f"job-{job_id}"
    seg = pydicom.dcmread(folder / "seg.dcm", stop_before_pixels=True)
    sr = hd.sr.srread(folder / "sr.dcm")
    assert sr.StudyInstanceUID == seg.StudyInstanceUID and sr.SeriesInstanceUID != seg.SeriesInstanceUID
    (row,) = db.query("SELECT burden FROM jobs WHERE id=?", (job_id,))
    burden = json.loads(row["burden"])
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert [str(g.tracking_identifier) for g in groups] == [
        "Ground glass opacity, right lung",
        "Ground glass opacity, left lung",
        "Ground glass opacity, both lungs",
    ]
    for group, key in zip(groups, ("right", "left", "total"), strict=True):
        ref = group.referenced_segment[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID and int(ref.ReferencedSegmentNumber) == 1
        values = {m.name.meaning: (m.value, m.unit.value) for m in group.get_measurements()}
        assert values["Volume"][1] == "ml" and values["Volume"][0] == pytest.approx(burden[key]["ggo_ml"], abs=1e-3)
        percent = values["Ground glass volume as percent of lung volume"]
        assert percent[1] == "%" and percent[0] == pytest.approx(burden[key]["percent"], abs=1e-3)


def test_overlay_and_preview_and_sending_order(
    processed: tuple[SeriesProcessor, Database, Settings, int, np.ndarray],
) -> None:
    processor, _db, _settings, job_id, ball = processed
    rows = processor.outbox.rows(job_id)
    kinds = [r.kind for r in rows]
    slices_with_ball = int(np.count_nonzero(ball.any(axis=(1, 2))))
    assert kinds == ["SEG", "SR"] + ["overlay"] * slices_with_ball
    middle = pydicom.dcmread(rows[2 + slices_with_ball // 2].path)  # the ball's widest slice
    assert middle.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and middle.PhotometricInterpretation == "RGB"
    assert middle.BurnedInAnnotation == "YES" and middle.FrameOfReferenceUID
    outline = (middle.pixel_array.astype(int) == OUTLINE_RGB).all(axis=-1)
    rows_, cols = np.nonzero(outline)
    assert outline.sum() > 20  # drawn around the ball's centre: row (50 + 190) / 4, column (70 + 190) / 4
    assert abs(rows_.mean() - 60) < 3 and abs(cols.mean() - 65) < 3, (rows_.mean(), cols.mean())
    preview = Image.open(processor.results_dir / f"job-{job_id}" / "preview.png")
    assert preview.width == 3 * 256 and preview.height > 256


def test_key_slices_prefer_large_areas_apart() -> None:
    masks = np.zeros((30, 4, 4), dtype=np.uint8)
    masks[10, :, :] = 1  # 16
    masks[11, :3, :] = 1  # 12
    masks[25, :2, :] = 1  # 8
    assert key_slices(masks, 2) == [10, 25]
    assert key_slices(masks, 3) == [10, 11, 25]  # too few far apart: the next largest however close
    assert key_slices(np.zeros((30, 4, 4), dtype=np.uint8), 3) == [8, 15, 22]


def test_patient_orientation_of_a_plane() -> None:
    def plane(orientation: tuple[float, float, float, float, float, float]) -> FramePlane:
        return FramePlane((0.0, 0.0, 0.0), orientation, (1.0, 1.0), 4, 4)

    assert patient_orientation(plane((1, 0, 0, 0, 1, 0))) == ("L", "P")
    assert patient_orientation(plane((-1, 0, 0, 0, -1, 0))) == ("R", "A")
    assert patient_orientation(plane((0, 1, 0, 0, 0, -1))) == ("P", "F")


def test_ct_on_the_source_planes_of_a_resampled_series(shared_data: Path) -> None:
    """A tilted head CT with uneven steps is resampled by reconstruction; the overlay and preview take the CT back
    on each source plane by geometry, and it reads what the source image holds."""
    from dicom_node.export.sources import SourcePlanes
    from dicom_node.file_mode import read_dicom_folder
    from dicom_node.settings import ReconstructionSection

    volume = read_dicom_folder(shared_data / "ct_gantry_tilt_head", ReconstructionSection())
    planes = SourcePlanes(volume)
    assert volume.resampled and not planes.aligned
    for k in (3, len(volume.sources) // 2):
        hu = planes.hu(k)
        source = pydicom.dcmread(volume.sources[k].path)
        stored = source.pixel_array * float(source.RescaleSlope) + float(source.RescaleIntercept)
        inside = (hu > -1000) & (stored > -1000)
        assert inside.mean() > 0.2
        assert np.corrcoef(hu[inside], stored[inside])[0, 1] > 0.98
        assert np.median(np.abs(hu - stored)[inside]) < 20.0
