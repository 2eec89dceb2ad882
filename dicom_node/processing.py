"""The production job processor: one claimed job -> selection -> reconstruction -> inference -> SEG -> outbox.

Each stage is a module of its own; this one only sequences them, times them, and maps their failures onto job
outcomes (``Rejected`` = the input is unusable: failed for good; ``BackendUnavailable`` = try again later).

The model backend (Triton, possibly a managed local one, or ONNX Runtime) is opened once, in the background at
start, so that reception never waits for a model server: a job that finds the backend still starting waits for
it, and one that finds it unreachable is retried with back-off.

A job is EXPORTING once its SEG sits in the persistent outbox, and DONE only when every destination has
accepted it (the outbox's settlement callback moves it). With no destination configured the SEG (and the
optional MetaImage publish) is the job's result and it is DONE at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field

import SimpleITK as sitk

from dicom_node import __version__
from dicom_node.db import Database
from dicom_node.errors import Rejected
from dicom_node.export.outbox import JobExportOutcome, Outbox, database_path
from dicom_node.export.results import write_derived
from dicom_node.export.seg_writer import check_referencable, write_seg
from dicom_node.file_mode import render_config_path
from dicom_node.inference_runtime import open_backend
from dicom_node.jobs import FailureStage, Job, JobOutcome, JobState, log_transition
from dicom_node.ops.metrics import NodeMetrics
from dicom_node.series.headers import read_headers
from dicom_node.series.predecode import PreDecoder
from dicom_node.series.reconstruct import build_volume, plan_series
from dicom_node.series.selection import select_headers
from dicom_node.settings import Settings
from dicom_node.types import CTVolume, InstanceRecord, SegArtifact, SeriesManifest
from inference.backend import Backend
from inference.burden import Burden, ground_glass_labels, measure_burden, write_burden
from inference.errors import BackendUnavailable, InferenceError
from inference.pipeline import SegmentationResult, segment
from inference.spec import InferenceSpec, load_spec
from inference.triton_fleet import EndpointState, TritonFleet
from inference.writers import write_label, write_publish

log = logging.getLogger(__name__)

BackendFactory = Callable[[Settings, InferenceSpec, "str | None"], AbstractContextManager[Backend]]


@dataclass
class JobTimings:
    """Seconds per stage of one job, logged with the job's result (bench/e2e.py reads them), and counts."""

    stages: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    """E.g. the sliding windows: ``windows_total`` (the whole model grid) and ``windows_run``."""

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t0


class BackendHolder:
    """Opens the configured backend once, off the caller's thread, and hands it to every job.

    A failed open is remembered with its reason and tried again on the next request, at most once per
    ``retry_after_s``, so a Triton that comes up later is picked up without a restart.
    """

    def __init__(
        self, settings: Settings, spec: InferenceSpec, factory: BackendFactory, retry_after_s: float = 10.0
    ) -> None:
        self._settings = settings
        self._spec = spec
        self._factory = factory
        self._retry_after_s = retry_after_s
        self._lock = threading.Lock()
        self._stack = ExitStack()
        self._backend: Backend | None = None
        self._error: InferenceError | None = None
        self._failed_at = 0.0
        self._warming = False
        self._closed = False
        self._warm_lock = threading.Lock()

    def warm_up(self) -> None:
        """Open in a background thread (start-up of a managed Triton takes tens of seconds); at most one at once."""
        with self._warm_lock:
            if self._warming or self._closed:
                return
            self._warming = True
        threading.Thread(target=self._try_open, name="backend-warm-up", daemon=True).start()

    def _try_open(self) -> None:
        try:
            self.get()
        except InferenceError as exc:
            log.warning("inference backend not ready: %s", exc)
        finally:
            with self._warm_lock:
                self._warming = False

    def endpoints(self) -> tuple[EndpointState, ...]:
        backend = self._backend
        return tuple(backend.states) if isinstance(backend, TritonFleet) else ()

    def problem(self) -> str | None:
        """None when the backend is open and checked; else why not (the readiness probe's answer). Never blocks:
        when nothing is opening it and the last failure is older than ``retry_after_s``, an open is started in the
        background, so a Triton that came back is found without waiting for a job."""
        if self._backend is not None:
            return None
        error = self._error
        if not self._warming and (error is None or time.monotonic() - self._failed_at >= self._retry_after_s):
            self.warm_up()
        if error is None:
            return "inference backend not open yet (opening)"
        return f"inference backend unavailable: {error}"

    def get(self) -> Backend:
        with self._lock:
            if self._backend is not None:
                return self._backend
            if self._error is not None and time.monotonic() - self._failed_at < self._retry_after_s:
                raise self._error
            try:
                self._backend = self._stack.enter_context(self._factory(self._settings, self._spec, None))
            except InferenceError as exc:
                self._error, self._failed_at = exc, time.monotonic()
                raise
            self._error = None
            log.info("inference backend ready: %s", self._backend.name)
            return self._backend

    def invalidate(self, backend: Backend, reason: str) -> None:
        """Drop ``backend`` after it failed mid-job (a crashed or restarted Triton): the next job opens anew,
        restarting a managed Triton if need be."""
        with self._lock:
            if self._backend is not backend:
                return  # another job already replaced it
            log.warning("inference backend %s dropped, reopening on the next job: %s", backend.name, reason)
            self._backend = None
            stack, self._stack = self._stack, ExitStack()
        try:
            stack.close()
        except Exception:  # closing a dead connection or server may fail; the new one must not inherit it
            log.exception("closing the failed inference backend")

    def close(self) -> None:
        with self._warm_lock:
            self._closed = True
        with self._lock:
            self._backend = None
            self._stack.close()


class _Finished(Exception):
    """A stage of :meth:`SeriesProcessor._process` ended the job early, with this outcome."""

    def __init__(self, outcome: JobOutcome) -> None:
        super().__init__(outcome.reason or outcome.state.value)
        self.outcome = outcome


class SeriesProcessor:
    """The :class:`dicom_node.worker.JobProcessor` the daemon runs in production."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        backend_factory: BackendFactory | None = None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.metrics = metrics or NodeMetrics()
        self.spec = load_spec(settings.inference.config)
        self.ggo_labels = ground_glass_labels(self.spec.segments)
        """The label values the burden numbers count as ground glass."""
        self.backend = BackendHolder(settings, self.spec, backend_factory or open_backend)
        self.results_dir = settings.storage.dir / "results"
        self.outbox = Outbox(
            database_path(settings),
            settings.export,
            calling_ae_title=settings.node.ae_title,
            destinations=settings.destinations,
            on_job_settled=self._on_export_settled,
            metrics=self.metrics,
        )
        rec = settings.reconstruction
        self.predecoder: PreDecoder | None = (
            PreDecoder(rec.decode_workers, rec.predecode_cache_mb * 1024 * 1024, processes=rec.predecode_processes)
            if rec.predecode_cache_mb > 0
            else None
        )

    # -- life (called by the daemon's Node) ---------------------------------------------------------------
    def start(self) -> None:
        self.outbox.start()
        self.backend.warm_up()

    def stop(self) -> None:
        self.outbox.stop(timeout=self.settings.export.timeout_s)
        self.backend.close()
        if self.predecoder is not None:
            self.predecoder.close()

    def backend_problem(self) -> str | None:
        """None when the model backend is ready to take a job; else why not."""
        return self.backend.problem()

    def backend_endpoints(self) -> Sequence[EndpointState]:
        """Each Triton endpoint's state when the backend is a fleet (``inference.triton.urls``); else none."""
        return self.backend.endpoints()

    def on_stored(self, record: InstanceRecord) -> None:
        """The SCP's hook: queue the instance for decoding while its series still arrives."""
        if self.predecoder is not None:
            self.predecoder.submit(record)

    # -- the job ------------------------------------------------------------------------------------------
    def process(self, job: Job, manifest: SeriesManifest) -> JobOutcome:
        try:
            return self._process(job, manifest)
        finally:
            if self.predecoder is not None:
                self.predecoder.discard(manifest.instances)

    def _process(self, job: Job, manifest: SeriesManifest) -> JobOutcome:
        timings = JobTimings()
        try:
            volume = self._reconstruct(manifest, timings)
            result = self._infer(job, volume, timings)
            return self._write(job, volume, result, timings)
        except _Finished as finished:
            return finished.outcome

    def _reconstruct(self, manifest: SeriesManifest, timings: JobTimings) -> CTVolume:
        """Headers, selection, plan and every header-only check, then decoding: the volume in HU."""
        series = manifest.series_instance_uid
        with timings.stage("headers"):
            headers = read_headers(manifest)
        verdict = select_headers(series, headers, self.settings.selection)
        if not verdict.selected:
            raise _Finished(JobOutcome.skipped(str(verdict.reason)))
        with timings.stage("plan"):
            plan = plan_series(
                series, list(zip(manifest.instances, headers, strict=True)), self.settings.reconstruction
            )
        # What the SEG needs of the headers is refused here, before decoding and inference, not after them.
        if not plan.frame_of_reference_uid:
            raise _Finished(
                JobOutcome.failed(
                    f"series {series}: no FrameOfReferenceUID (0020,0052): a SEG cannot be placed on it",
                    FailureStage.INPUT,
                )
            )
        check_referencable([(f.instance.record.path, f.header.frame_number) for f in plan.frames])
        parts: dict[str, float] = {}
        volume = build_volume(
            manifest.study_instance_uid, series, plan, self.settings.reconstruction,
            timings=parts, predecoded=self.predecoder,
        )  # fmt: skip
        if self.predecoder is not None:  # the volume holds them now: free the memory before inference
            self.predecoder.discard(manifest.instances)
        timings.stages["decode"] = parts["decode"]
        timings.stages["predecoded_instances"] = parts["predecoded"]
        timings.stages["reconstruct"] = timings.stages.pop("plan") + parts["assemble"]
        self.metrics.observe_stage("decode", timings.stages["decode"])
        self.metrics.observe_stage("reconstruct", timings.stages["reconstruct"])
        return volume

    def _infer(self, job: Job, volume: CTVolume, timings: JobTimings) -> SegmentationResult:
        """The labels on the volume's grid; a backend that is away sends the job back to wait for it."""
        try:
            backend = self.backend.get()
        except BackendUnavailable as exc:
            raise _Finished(JobOutcome.unavailable(f"inference backend unavailable: {exc}")) from exc
        except InferenceError as exc:
            raise _Finished(JobOutcome.failed(f"inference backend unusable: {exc}", FailureStage.INFERENCE)) from exc
        t0 = time.perf_counter()
        try:
            result = segment(volume.image, self.spec, self.metrics.timed(backend))
        except BackendUnavailable as exc:
            self.backend.invalidate(backend, str(exc))
            raise _Finished(JobOutcome.unavailable(f"inference backend lost during the job: {exc}")) from exc
        except InferenceError as exc:
            raise _Finished(
                JobOutcome.failed(
                    f"series {volume.series_instance_uid}: inference failed: {exc}", FailureStage.INFERENCE
                )
            ) from exc
        self.metrics.observe_stage("inference", time.perf_counter() - t0)
        for name, seconds in result.timings.items():
            timings.stages[f"inference.{name}"] = seconds
        timings.counts.update(windows_total=result.windows, windows_run=result.windows_run)
        self.db.record_windows(job.id, result.windows, result.windows_run)
        return result

    def _write(self, job: Job, volume: CTVolume, result: SegmentationResult, timings: JobTimings) -> JobOutcome:
        """Burden, SEG, the derived objects and the publish folders, then the outbox: the job's outcome."""
        with timings.stage("burden"):
            burden = self._burden(job, result.label, result.lung_mask)
        out_dir = self.results_dir / f"job-{job.id}"
        try:
            with timings.stage("seg_encode"):
                artifact = write_seg(
                    volume,
                    result.label,
                    segments=self.spec.segments,
                    algorithm_name=self.spec.model.name,
                    algorithm_version=self.spec.model.version,
                    seg=self.settings.seg,
                    out_path=out_dir / "seg.dcm",
                )
            self.metrics.observe_stage("seg", timings.stages["seg_encode"])
            derived = write_derived(
                volume, result.label, artifact, burden, ggo_labels=self.ggo_labels, spec=self.spec,
                settings=self.settings, out_dir=out_dir, stage=timings.stage,
            )  # fmt: skip
            with timings.stage("publish"):
                self._publish(job, volume, result.label, burden)
        except Rejected as exc:
            return JobOutcome.failed(str(exc), FailureStage.OUTPUT)
        except OSError as exc:  # a full or failing disk: the same work may succeed once it has room again
            where = exc.filename or out_dir
            return JobOutcome.failed(
                f"cannot write the results to {where}: {exc.strerror or exc}", FailureStage.OUTPUT, retryable=True
            )
        self._log_result(job, volume, artifact, timings, burden)

        written = f"SEG {artifact.sop_instance_uid}" + (f" with {derived.describe()}" if derived.describe() else "")
        if not self.settings.destinations:
            return JobOutcome.done(f"{written} written to {out_dir} (no destination)")
        self.outbox.enqueue(job.id, artifact, *derived.objects)
        return JobOutcome.exporting(f"{written} queued for {len(self.settings.destinations)} destination(s)")

    def _burden(self, job: Job, label: sitk.Image, lung_mask: sitk.Image | None) -> Burden | None:
        """The job's burden numbers, stored with the job (``dicom-node status`` shows them); None when the model
        spec has no lung fields to measure them against."""
        if lung_mask is None:
            return None
        burden = measure_burden(label, lung_mask, self.ggo_labels)
        self.db.record_burden(job.id, json.dumps(burden.as_dict()))
        return burden

    def _publish(self, job: Job, volume: CTVolume, label: sitk.Image, burden: Burden | None) -> None:
        """The old operator's MetaImage outputs, when configured; named by the source series UID. The burden
        numbers go beside the mask as ``<name>.json``, as file mode writes them."""
        pub = self.settings.publish
        if pub.output_dir is None and pub.publish_dir is None:
            return
        name = volume.series_instance_uid
        if pub.output_dir is not None:
            write_label(label, pub.output_dir, name)
            if burden is not None:
                write_burden(burden, pub.output_dir / f"{name}.json")
        if pub.publish_dir is not None:
            write_publish(
                pub.publish_dir / name,
                name=name,
                label=label,
                original_files=(),
                render_config=render_config_path(self.spec),
                model_name=self.spec.model.name,
                density_image=volume.image,
            )

    def _log_result(
        self, job: Job, volume: CTVolume, artifact: SegArtifact, timings: JobTimings, burden: Burden | None
    ) -> None:
        size = volume.image.GetSize()
        log.info(
            f"job {job.id}: SEG {artifact.sop_instance_uid} ({artifact.segment_voxels} voxels) for series "
            f"{volume.series_instance_uid} ({size[0]}x{size[1]}x{size[2]})"
            + (f"; {'; '.join(volume.resampled)}" if volume.resampled else "")
            + (f"; {burden.summary()}" if burden is not None else ""),
            extra={
                "event": "job_result",
                "job_id": job.id,
                "series_uid": volume.series_instance_uid,
                "study_uid": volume.study_instance_uid,
                "seg_sop_uid": artifact.sop_instance_uid,
                "segment_voxels": artifact.segment_voxels,
                "burden": None if burden is None else burden.as_dict(),
                "timings": {k: round(v, 4) for k, v in timings.stages.items()},
                **timings.counts,
                "software_version": __version__,
            },
        )

    # -- outbox -> job ------------------------------------------------------------------------------------
    def _on_export_settled(self, job_id: int, outcome: JobExportOutcome) -> None:
        """Every destination accepted every object of the job (DONE), or one failed for good (FAILED).
        Idempotent."""
        job = self.db.job(job_id)
        if job is None:
            return
        expect = [JobState.EXPORTING, JobState.INFERRING, JobState.FAILED]
        if outcome.state == "delivered":
            warned = outcome.warnings
            kinds = dict.fromkeys(r.kind for r in outcome.rows)
            objects = len({r.sop_instance_uid for r in outcome.rows})
            reason = f"{', '.join(kinds) or 'SEG'} ({objects} object(s)) delivered to every destination" + (
                f" ({len(warned)} with a warning status)" if warned else ""
            )
            moved = self.db.transition(job_id, JobState.DONE, reason, expect=expect)
            to = JobState.DONE
        else:
            reason = f"export failed: {outcome.reason}"
            moved = self.db.transition(job_id, JobState.FAILED, reason, expect=expect[:2], stage=FailureStage.EXPORT)
            to = JobState.FAILED
        if moved:
            log_transition(job, to, reason, logging.INFO if to is JobState.DONE else logging.WARNING)
