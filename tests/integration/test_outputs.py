"""Issue 18's acceptance, every part real and one node run shared by the assertions: dcmtk storescu sends lung1 with
two ground-glass balls of known volume inserted (one per lung) to the node (ONNX Runtime, the bundled model), which
sends the SEG, the burden SR and the overlay series to dcmtk storescp and to Orthanc (which already holds the CT
study, as a PACS would).

- everything arrives, each object has no dciodvfy error; the SR read back with highdicom references the SEG's
  segment and holds the node's numbers; its total volume is the SEG mask's volume (frames x pixel area x slice
  spacing) within 1 %;
- Orthanc files every object in the source study, and its own rendering of an overlay image
  (``/instances/{id}/preview``) shows the outline where the SEG says the finding is;
- the node's burden numbers match the inserted volumes within 5 %, per lung and in all.

Why balls rather than the simulator's irregular patterns: their volume is exact by construction and a ball is the
plainest lesion there is, so a miss tests the burden numbers, not the model's reading of a pattern. They are drawn
as the training renderer draws every lesion (``_insert_balls``): an edge blurred by the scan's own point-spread
function and vessels that keep their density. Until 2026-12-06 the balls were a constant HU offset with a step edge
at the CT's own pixels, sharper than any reconstruction makes, which also raised the vessels inside them to
soft-tissue density (+100..+300 HU); a network trained on the issue-17 patterns, whose labels call such dense areas
consolidation (background), measured those balls 7-10 % small and the rendered ones within 3.2 %; the v1 network
measured the old balls +1.3 / -0.8 % and the rendered ones +4.4 / +1.5 %."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from pydicom.uid import JPEGLosslessSV1

from dicom_node.daemon import Node
from dicom_node.export.render import OUTLINE_RGB
from dicom_node.jobs import JobState
from dicom_node.settings import Settings
from tests import factories
from tests.dicom_peers import Orthanc, orthanc_binary, storescp
from tests.dimse import free_port, node_config, settings_for, storescu, wait_for, write_config
from tests.seg_helpers import dciodvfy_errors, have_dciodvfy, seg_frames

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(orthanc_binary() is None, reason="Orthanc is not installed"),
]

REPO = Path(__file__).resolve().parents[2]
NODE_BIN = REPO / ".venv" / "bin" / "dicom-node"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.22"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
BALLS = (("right", 20.0, -450.0), ("left", 18.0, -500.0))
"""(lung, radius mm, HU the parenchyma is brought to): one ball of ground glass in each lung."""


@dataclass
class Inserted:
    series: factories.WrittenSeries
    ml: dict[str, float]
    """Inserted ground-glass volume per lung ("right", "left")."""
    centres: dict[str, tuple[int, int, int]]
    """(z, y, x) index of each ball's centre."""


def _insert_balls(image: sitk.Image) -> tuple[sitk.Image, dict[str, float], dict[str, tuple[int, int, int]]]:
    """lung1 with a ball of ground glass at the deepest point of each lung, drawn by the training renderer
    (``models/training/patterns.py``): the parenchyma is brought to the ball's HU as filled air spaces, so vessels
    keep their own density and stay visible through the haze, and the added density is blurred by the scan's own
    point-spread function, as every reconstruction blurs an edge. The inserted volume is the renderer's label: the
    ball within the simulator's HU-only lung mask (independent of the node's lung fields), airway lumen left out."""
    sys.path.insert(0, str(REPO / "models" / "training"))
    import patterns

    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    spacing = image.GetSpacing()
    ctx = patterns.context(hu, spacing, image.GetDirection())
    x_mm = image.GetOrigin()[0] + spacing[0] * np.arange(hu.shape[2])  # axial, identity direction
    middle = float(np.median(np.broadcast_to(x_mm, hu.shape)[ctx.lung]))
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(hu.shape, spacing[::-1], strict=True)], indexing="ij")
    field = patterns.Field.empty(hu.shape)
    balls: dict[str, np.ndarray] = {}
    centres: dict[str, tuple[int, int, int]] = {}
    for side, radius, target in BALLS:
        d = np.where((x_mm < middle) if side == "right" else (x_mm > middle), ctx.dist, 0.0)  # LPS: right is -x
        c = np.unravel_index(int(np.argmax(d)), d.shape)
        assert d[c] > radius + 5, f"{side} lung too thin for the ball"
        ball = (z - c[0] * spacing[2]) ** 2 + (y - c[1] * spacing[1]) ** 2 + (x - c[2] * spacing[0]) ** 2 <= radius**2
        balls[side] = ball & ctx.lung
        field.w[balls[side]] = 1.0
        field.target[balls[side]] = target
        centres[side] = (int(c[0]), int(c[1]), int(c[2]))
    drawn = patterns.render(ctx, field)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    ml = {side: float((drawn.label.astype(bool) & ball).sum()) * voxel_ml for side, ball in balls.items()}
    result = sitk.GetImageFromArray(np.rint(drawn.hu).astype(np.int16))
    result.CopyInformation(image)
    return result, ml, centres


@pytest.fixture(scope="module")
def inserted(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Inserted:
    image, ml, centres = _insert_balls(factories.read_volume(shared_data / "chest_ct_volumes" / "lung1_image.nrrd"))
    series = factories.write_ct_series(
        image, tmp_path_factory.mktemp("outputs_series"), transfer_syntax=JPEGLosslessSV1, tag="lung1-ggo-balls"
    )
    return Inserted(series, ml, centres)


@dataclass
class Run:
    node_settings: Settings
    config: Path
    job_id: int
    burden: dict[str, Any]
    results: Path
    received: dict[str, list[Path]]
    """storescp's files by SOP class UID."""
    orthanc: Orthanc
    work: Path


@pytest.fixture(scope="module")
def run(inserted: Inserted, model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    work = tmp_path_factory.mktemp("outputs_run")
    orthanc = Orthanc(work / "orthanc").start()
    try:
        assert storescu(orthanc.dicom_port, inserted.series.files, aet="MODALITY").returncode == 0  # the PACS's CT
        with storescp(work / "pacs") as pacs:
            sections: dict[str, Any] = {
                "destinations": [
                    {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port},
                    {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port},
                ],
                "inference": {"model_repository": str(model_repository)},
                "export": {"backoff": {"initial_s": 1.0, "max_s": 5.0}},
                "sr": {"enabled": True},
                "overlay": {"enabled": True},
            }
            port = free_port()
            config = write_config(work / "node.yaml", node_config(work / "var", port, **sections))
            settings = settings_for(work / "var", port, **sections)
            node = Node(settings)
            node.start()
            try:
                assert storescu(node.port, inserted.series.files).returncode == 0
                assert node.db is not None
                db = node.db

                def finished() -> Any:
                    jobs = [j for j in db.jobs() if j.series_instance_uid == inserted.series.series_instance_uid]
                    return jobs[0] if jobs and jobs[0].state.terminal else None

                job = wait_for(finished, 300, interval=0.5)
                assert job is not None and job.state is JobState.DONE, job
                (row,) = db.query("SELECT burden FROM jobs WHERE id=?", (job.id,))
            finally:
                node.stop(grace_s=5)
            received: dict[str, list[Path]] = {}
            for path in pacs.received_files():
                uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID)
                received.setdefault(uid, []).append(path)
        yield Run(settings, config, job.id, json.loads(row["burden"]), settings.storage.dir / "results" /
                  f"job-{job.id}", received, orthanc, work)  # fmt: skip
    finally:
        orthanc.stop()


def _seg_volume_ml(seg_path: Path, slice_spacing_mm: float) -> float:
    _, frames = seg_frames(seg_path)
    return sum(int(np.count_nonzero(f.pixels)) * f.spacing[0] * f.spacing[1] * slice_spacing_mm for f in frames) / 1000


def test_seg_sr_and_overlay_arrive_without_dciodvfy_errors(run: Run, inserted: Inserted) -> None:
    assert sorted(run.received) == sorted([SEG_CLASS, SR_CLASS, SC_CLASS])
    assert len(run.received[SEG_CLASS]) == 1 and len(run.received[SR_CLASS]) == 1
    seg = pydicom.dcmread(run.received[SEG_CLASS][0], stop_before_pixels=True)
    # one overlay image per source slice with a finding: as many as the SEG has frames
    assert len(run.received[SC_CLASS]) == int(seg.NumberOfFrames) > 8
    for path in run.received[SC_CLASS]:
        sc = pydicom.dcmread(path, stop_before_pixels=True)
        assert sc.StudyInstanceUID == inserted.series.study_instance_uid
        assert sc.FrameOfReferenceUID == inserted.series.frame_of_reference_uid
        assert sc.BurnedInAnnotation == "YES" and sc.SeriesNumber == 9903
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in inserted.series.sop_instance_uids
    if have_dciodvfy():
        for path in [*run.received[SEG_CLASS], *run.received[SR_CLASS], *run.received[SC_CLASS]]:
            assert dciodvfy_errors(path, run.work) == [], path


def test_sr_references_the_seg_segment_and_holds_the_node_numbers(run: Run, inserted: Inserted) -> None:
    seg_path, sr_path = run.received[SEG_CLASS][0], run.received[SR_CLASS][0]
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    sr = hd.sr.srread(sr_path)
    assert sr.StudyInstanceUID == inserted.series.study_instance_uid
    groups = sr.content.get_volumetric_roi_measurement_groups()
    numbers: dict[str, dict[str, float]] = {}
    for group, key in zip(groups, ("right", "left", "total"), strict=True):
        (ref,) = group.referenced_segment[0].ReferencedSOPSequence
        assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID and int(ref.ReferencedSegmentNumber) == 1
        (site,) = group.finding_sites
        assert site.value.meaning == "Lung"
        numbers[key] = {m.name.meaning: float(m.value) for m in group.get_measurements()}
        assert numbers[key]["Volume"] == pytest.approx(run.burden[key]["ggo_ml"], abs=1e-3)
        assert numbers[key]["Ground glass volume as percent of lung volume"] == pytest.approx(
            run.burden[key]["percent"], abs=1e-3
        )
    lateralities = [g.finding_sites[0].laterality.meaning for g in groups]
    assert lateralities == ["Right", "Left", "Bilateral"]
    lung_groups = sr.content.get_image_measurement_groups()
    lung_ml = [float(g.get_measurements()[0].value) for g in lung_groups]
    assert lung_ml == pytest.approx([run.burden[k]["lung_ml"] for k in ("right", "left", "total")], abs=1e-3)
    # The SR's total volume is the SEG mask's volume: frames x pixel area x slice spacing (lung1: 5 mm).
    spacing = float(inserted.series.image.GetSpacing()[2])
    assert numbers["total"]["Volume"] == pytest.approx(_seg_volume_ml(seg_path, spacing), rel=0.01)
    # ... and `dicom-node status` shows the same numbers.
    status = subprocess.run([str(NODE_BIN), "status", "--config", str(run.config)], capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    assert f"right {run.burden['right']['ggo_ml']:.1f} mL" in status.stdout, status.stdout
    assert (run.results / "preview.png").is_file()


def test_burden_matches_the_inserted_volumes_within_5_percent(run: Run, inserted: Inserted) -> None:
    for side in ("right", "left"):
        assert run.burden[side]["ggo_ml"] == pytest.approx(inserted.ml[side], rel=0.05), (side, run.burden)
    assert run.burden["total"]["ggo_ml"] == pytest.approx(sum(inserted.ml.values()), rel=0.05)
    for side in ("right", "left"):
        b = run.burden[side]
        assert b["percent"] == pytest.approx(100 * b["ggo_ml"] / b["lung_ml"], rel=1e-3)
        assert b["grade"] == 1  # a 30 mL ball in a lung of 1.1-1.9 L: under 5 %


def test_orthanc_files_every_object_in_the_study_and_renders_the_outline(run: Run, inserted: Inserted) -> None:
    orthanc = run.orthanc
    (study,) = orthanc.post(
        "/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": inserted.series.study_instance_uid}}
    )
    held = {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in orthanc.get(f"/studies/{study}/instances")}
    sent = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): cls
        for cls, paths in run.received.items()
        for p in paths
    }
    assert set(sent) <= set(held), set(sent) - set(held)
    assert set(inserted.series.sop_instance_uids) <= set(held)  # the same study as the CT

    # The overlay image of the right ball's middle slice, rendered by Orthanc itself.
    slice_sop = inserted.series.sop_instance_uids[inserted.centres["right"][0]]
    (overlay,) = [
        p for p in run.received[SC_CLASS]
        if pydicom.dcmread(p, stop_before_pixels=True).SourceImageSequence[0].ReferencedSOPInstanceUID == slice_sop
    ]  # fmt: skip
    overlay_id = held[str(pydicom.dcmread(overlay, stop_before_pixels=True).SOPInstanceUID)]
    url = f"http://127.0.0.1:{orthanc.http_port}/instances/{overlay_id}/preview"
    with urllib.request.urlopen(url, timeout=30) as rsp:
        rendered = np.asarray(Image.open(io.BytesIO(rsp.read())).convert("RGB"), dtype=np.int32)
    outline = np.abs(rendered - np.asarray(OUTLINE_RGB)).sum(axis=-1) <= 30
    # Where the SEG says the finding is on that slice: its border, give or take the outline's width.
    _, frames = seg_frames(run.received[SEG_CLASS][0])
    (frame,) = [f for f in frames if f.sources and f.sources[0][0] == slice_sop]
    mask = sitk.GetImageFromArray(frame.pixels)
    border = sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.BinaryContour(mask, fullyConnected=True), [3, 3])) > 0
    assert rendered.shape[:2] == frame.pixels.shape
    assert outline.sum() > 100, outline.sum()
    assert (outline & border).sum() / outline.sum() > 0.95  # drawn on the finding's border, nowhere else
    contour = sitk.GetArrayFromImage(sitk.BinaryContour(mask, fullyConnected=True)) > 0
    near = sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.GetImageFromArray(outline.astype(np.uint8)), [2, 2])) > 0
    assert (contour & near).sum() / contour.sum() > 0.9  # and all the way round
