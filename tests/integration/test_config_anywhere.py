"""A node.yaml anywhere: the bundled model spec and repository are found wherever the file lives (issue: "every
key is optional" must hold for a /etc/dicom-node/node.yaml too)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.settings import INSTALL_ROOT, load_settings
from tests import factories
from tests.dicom_peers import storescp
from tests.dimse import NODE_AET, free_port, storescu, wait_for, wait_port

REPO = Path(__file__).resolve().parents[2]
NODE_BIN = REPO / ".venv" / "bin" / "dicom-node"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

pytestmark = pytest.mark.integration


def test_defaults_name_the_bundled_model_wherever_the_file_is(tmp_path: Path) -> None:
    cfg = tmp_path / "etc" / "node.yaml"
    cfg.parent.mkdir()
    cfg.write_text("destinations: [{ae_title: PACS, host: 127.0.0.1, port: 4242}]\n", encoding="utf-8")
    settings = load_settings(cfg, environ={})
    assert settings.inference.config == INSTALL_ROOT / "config" / "config_inference.json"
    assert settings.inference.model_repository == INSTALL_ROOT / "models"
    assert settings.storage.dir == cfg.parent / "var"  # a relative path written or defaulted: beside the file
    # A relative path written in the file still resolves against the file's folder.
    cfg.write_text("inference: {config: spec.json, model_repository: repo}\n", encoding="utf-8")
    settings = load_settings(cfg, environ={})
    assert settings.inference.config == cfg.parent / "spec.json"
    assert settings.inference.model_repository == cfg.parent / "repo"


def test_node_yaml_with_only_node_storage_destinations_delivers_a_seg(tmp_path: Path, shared_data: Path) -> None:
    """`dicom-node serve` started from another folder, with a node.yaml in a temp folder that sets only node,
    storage and destinations: it receives a series and delivers a SEG made with the bundled model."""
    series = factories.write_ct_series(
        factories.read_volume(shared_data / "chest_ct_volumes" / "lung1_image.nrrd"),
        tmp_path / "series",
        transfer_syntax=ExplicitVRLittleEndian,
        tag="config-anywhere",
    )
    port = free_port()
    with storescp(tmp_path / "pacs") as pacs:
        cfg = tmp_path / "etc" / "dicom-node" / "node.yaml"
        cfg.parent.mkdir(parents=True)
        cfg.write_text(
            yaml.safe_dump(
                {
                    "node": {"ae_title": NODE_AET, "host": "127.0.0.1", "port": port},
                    "storage": {"dir": "state", "min_free_bytes": 0},
                    "destinations": [{"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}],
                }
            ),
            encoding="utf-8",
        )
        elsewhere = tmp_path / "cwd"
        elsewhere.mkdir()
        exe = [str(NODE_BIN)] if NODE_BIN.exists() else [sys.executable, "-m", "dicom_node.cli"]
        # The file stays as written; only the backend is chosen from the environment (ONNX Runtime on the same
        # bundled model file Triton serves), so this test does not start a second tritonserver.
        env = {**os.environ, "DICOM_NODE__INFERENCE__BACKEND": "onnxruntime"}
        log = tmp_path / "node.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [*exe, "serve", "--config", str(cfg)], cwd=elsewhere, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            assert wait_port(port), log.read_text()
            r = storescu(port, series.files)
            assert r.returncode == 0, r.stderr

            def seg_received() -> list[Path]:
                return [
                    p
                    for p in pacs.received_files()
                    if str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) == SEGMENTATION_STORAGE
                ]

            segs = wait_for(seg_received, 240, interval=1.0)
            assert segs, log.read_text()[-4000:]
            seg = pydicom.dcmread(segs[0])
            assert seg.StudyInstanceUID == series.study_instance_uid
            refs = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
            assert refs <= set(series.sop_instance_uids)
            assert (cfg.parent / "state" / "state.sqlite3").exists()  # storage resolved beside the file
            assert not (elsewhere / "state").exists()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                assert proc.wait(60) == 0, log.read_text()[-3000:]
            finally:
                if proc.poll() is None:
                    proc.kill()
