"""The pre-decoder: slices decoded as they arrive, reused by reconstruction, never stale, failures kept, capped."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1

from dicom_node.errors import Rejected
from dicom_node.series.decode import Predecoded, predecode
from dicom_node.series.predecode import PreDecoder
from dicom_node.series.reconstruct import reconstruct, reconstruct_headers
from dicom_node.settings import ReconstructionSection
from dicom_node.types import InstanceRecord, SeriesManifest
from tests.factories import DCMCJPEG, WrittenSeries, read_volume, write_ct_series
from tests.unit.test_reconstruct import manifest_of

DEFAULT = ReconstructionSection()
SLICE_BYTES = 512 * 512 * 2  # int16 stored values of one lung1 slice


@pytest.fixture(scope="module")
def lung1(shared_data: Path) -> sitk.Image:
    return read_volume(shared_data / "chest_ct_volumes" / "lung1_image.nrrd")


@pytest.fixture
def series(lung1: sitk.Image, tmp_path: Path) -> WrittenSeries:
    syntax = JPEGLosslessSV1 if Path(DCMCJPEG).exists() else "1.2.840.10008.1.2.1"
    return write_ct_series(lung1[:, :, 10:16], tmp_path / "s", transfer_syntax=syntax, tag="predecode", shuffle=True)


def _reconstruct(manifest: SeriesManifest, cache: PreDecoder | None) -> tuple[np.ndarray, dict[str, float]]:
    from dicom_node.series.headers import read_headers

    parts: dict[str, float] = {}
    volume = reconstruct_headers(
        manifest.study_instance_uid,
        manifest.series_instance_uid,
        list(zip(manifest.instances, read_headers(manifest), strict=True)),
        DEFAULT,
        timings=parts,
        predecoded=cache,
    )
    return sitk.GetArrayFromImage(volume.image), parts


def _submit_all(cache: PreDecoder, manifest: SeriesManifest) -> None:
    for record in manifest.instances:
        cache.submit(record)


@pytest.mark.parametrize("processes", [0, 1], ids=["threads", "processes"])
def test_predecoded_volume_equals_decoded_volume(series: WrittenSeries, processes: int) -> None:
    manifest = manifest_of(series.files)
    expected = sitk.GetArrayFromImage(reconstruct(manifest, DEFAULT).image)
    cache = PreDecoder(workers=2, cap_bytes=1 << 30, processes=processes)
    try:
        _submit_all(cache, manifest)
        got, parts = _reconstruct(manifest, cache)
        assert parts["predecoded"] == len(manifest.instances)
        np.testing.assert_array_equal(got, expected)
        assert cache.cached_bytes == len(manifest.instances) * SLICE_BYTES
        cache.discard(manifest.instances)
        assert cache.cached_bytes == 0 and len(cache) == 0
    finally:
        cache.close()


def test_replaced_instance_is_not_served_stale(series: WrittenSeries) -> None:
    manifest = manifest_of(series.files)
    before = sitk.GetArrayFromImage(reconstruct(manifest, DEFAULT).image)
    cache = PreDecoder(workers=1, cap_bytes=1 << 30)
    try:
        _submit_all(cache, manifest)
        for record in manifest.instances:
            assert cache.get(record) is not None  # all decoded and cached
        # The same instance sent again with other pixels: the spool renames a new file over the old path.
        victim = series.files[0]
        ds = pydicom.dcmread(victim)
        pixels = ds.pixel_array.astype(np.int16) + 7
        ds.PixelData = pixels.tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        tmp = victim.with_name(".tmp-replace")
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, victim)
        got, _ = _reconstruct(manifest, cache)  # not resubmitted: the cached entry's stamp no longer matches
        expected = sitk.GetArrayFromImage(reconstruct(manifest, DEFAULT).image)
        np.testing.assert_array_equal(got, expected)
        stale = manifest.instances[0]
        assert cache.get(stale) is None
        changed = np.flatnonzero((got != before).any(axis=(1, 2)))
        assert len(changed) == 1 and np.all(got[changed[0]] - before[changed[0]] == 7)

    finally:
        cache.close()


def test_decode_failure_is_rejected_when_the_job_runs(series: WrittenSeries) -> None:
    victim = series.files[2]
    data = victim.read_bytes()
    victim.write_bytes(data[: int(len(data) * 0.98)])
    manifest = manifest_of(series.files)
    record = next(r for r in manifest.instances if r.path == victim)
    cached = predecode(record)
    assert cached is not None and cached.pixels is None and cached.failure is not None
    with pytest.raises(Rejected) as direct:
        reconstruct(manifest, DEFAULT)
    assert cached.failure == str(direct.value)  # the same message as decoding it in the job

    cache = PreDecoder(workers=2, cap_bytes=1 << 30)
    try:
        _submit_all(cache, manifest)
        with pytest.raises(Rejected, match=rf"{victim.name}.*(truncated|cannot read)"):
            _reconstruct(manifest, cache)
    finally:
        cache.close()


def test_a_cached_failure_is_never_turned_into_zeros(series: WrittenSeries) -> None:
    manifest = manifest_of(series.files)
    failing = manifest.instances[1]

    def decode(record: InstanceRecord) -> Predecoded | None:
        if record.path == failing.path:
            return Predecoded((1, 512, 512), None, "series x: instance y: cannot decode pixel data: boom")
        return predecode(record)

    cache = PreDecoder(workers=2, cap_bytes=1 << 30, decode=decode)
    try:
        _submit_all(cache, manifest)
        with pytest.raises(Rejected, match="boom"):
            _reconstruct(manifest, cache)
    finally:
        cache.close()


def test_memory_cap_is_honoured(series: WrittenSeries) -> None:
    manifest = manifest_of(series.files)
    expected = sitk.GetArrayFromImage(reconstruct(manifest, DEFAULT).image)
    cap = int(2.5 * SLICE_BYTES)
    cache = PreDecoder(workers=1, cap_bytes=cap)
    try:
        _submit_all(cache, manifest)
        for record in manifest.instances:
            cache.get(record)
        assert 0 < cache.cached_bytes <= cap
        assert cache.cached_bytes == 2 * SLICE_BYTES
        got, parts = _reconstruct(manifest, cache)  # what was not cached is decoded by the job
        assert parts["predecoded"] == 2
        np.testing.assert_array_equal(got, expected)
        cache.discard(manifest.instances)
        assert cache.cached_bytes == 0
    finally:
        cache.close()


def test_submit_never_blocks_and_discard_drops_what_is_queued(series: WrittenSeries) -> None:
    manifest = manifest_of(series.files)
    release = threading.Event()

    def slow(record: InstanceRecord) -> Predecoded | None:
        release.wait(10)
        return predecode(record)

    cache = PreDecoder(workers=1, cap_bytes=1 << 30, decode=slow)
    try:
        _submit_all(cache, manifest)  # returns at once although the decoder is stuck
        assert len(cache) == len(manifest.instances)
        cache.discard(manifest.instances)
        release.set()
        assert len(cache) == 0
    finally:
        cache.close()
    assert cache.cached_bytes == 0


def test_disabled_with_a_zero_cap(series: WrittenSeries) -> None:
    manifest = manifest_of(series.files)
    cache = PreDecoder(workers=1, cap_bytes=0)
    try:
        _submit_all(cache, manifest)
        assert len(cache) == 0
        _, parts = _reconstruct(manifest, cache)
        assert parts["predecoded"] == 0
    finally:
        cache.close()
