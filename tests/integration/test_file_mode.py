"""``dicom-node infer`` as a subprocess on the real chest CT: outputs, exact geometry, publish folder, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytestmark = pytest.mark.integration

DICOM_NODE = Path(sys.executable).with_name("dicom-node")


def _settings(tmp: Path, repo_root: Path, model_repository: Path) -> Path:
    path = tmp / "node.yaml"
    path.write_text(
        "inference:\n"
        "  backend: onnxruntime\n"
        f"  config: {repo_root / 'config' / 'config_inference.json'}\n"
        f"  model_repository: {model_repository}\n"
    )
    return path


def _infer(settings: Path, inp: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(DICOM_NODE), "infer", "--input", str(inp), "--output", str(out), "--settings", str(settings), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def lung1(shared_data: Path) -> sitk.Image:
    return sitk.ReadImage(str(shared_data / "chest_ct_volumes" / "lung1_image.nrrd"))


@pytest.fixture(scope="module")
def nifti_run(
    tmp_path_factory: pytest.TempPathFactory, lung1: sitk.Image, repo_root: Path, model_repository: Path
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    tmp = tmp_path_factory.mktemp("file_mode_nifti")
    (tmp / "in").mkdir()
    sitk.WriteImage(lung1, str(tmp / "in" / "lung1.nii.gz"))
    proc = _infer(
        _settings(tmp, repo_root, model_repository),
        tmp / "in",
        tmp / "out",
        "--publish",
        str(tmp / "pub"),
        "--backend",
        "onnxruntime",
    )
    return tmp, proc


def _assert_same_grid(mask: sitk.Image, ref: sitk.Image) -> None:
    assert mask.GetSize() == ref.GetSize()
    assert mask.GetSpacing() == ref.GetSpacing()
    assert mask.GetOrigin() == ref.GetOrigin()
    assert mask.GetDirection() == ref.GetDirection()
    assert mask.GetPixelID() == sitk.sitkUInt8


def test_nifti_in_mhd_out_with_publish(nifti_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    tmp, proc = nifti_run
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp / "out").iterdir()) == ["lung1.json", "lung1.mhd", "lung1.raw"]
    ref = sitk.ReadImage(str(tmp / "in" / "lung1.nii.gz"))
    mask = sitk.ReadImage(str(tmp / "out" / "lung1.mhd"))
    _assert_same_grid(mask, ref)
    values = set(np.unique(sitk.GetArrayViewFromImage(mask)).tolist())
    assert values <= {0, 1}
    # The burden numbers beside the mask: its ground glass, split into the lungs; lung1's lungs hold ~3 L.
    burden = json.loads((tmp / "out" / "lung1.json").read_text())
    voxel_ml = float(np.prod(mask.GetSpacing())) / 1000.0
    ggo_ml = float(np.count_nonzero(sitk.GetArrayViewFromImage(mask))) * voxel_ml
    assert burden["total"]["ggo_ml"] == pytest.approx(ggo_ml, abs=1e-3)
    assert burden["right"]["ggo_ml"] + burden["left"]["ggo_ml"] == pytest.approx(ggo_ml, abs=2e-3)
    assert 2500 < burden["total"]["lung_ml"] < 3500 and burden["right"]["lung_ml"] > burden["left"]["lung_ml"]
    assert {burden["right"]["grade"], burden["left"]["grade"]} <= {0, 1}
    pub = tmp / "pub"
    assert sorted(p.name for p in pub.iterdir()) == [
        "config.meta",
        "config_render.json",
        "lung1.nii.gz",
        "lung1.output.mhd",
        "lung1.output.raw",
    ]
    assert json.loads((pub / "config.meta").read_text()) == {
        "density": "lung1.nii.gz",
        "name": "segmentation_ct_covid_lesion_v1",
        "seg_masks": ["lung1.output.mhd"],
        "settings": "config_render.json",
    }
    assert (pub / "lung1.nii.gz").read_bytes() == (tmp / "in" / "lung1.nii.gz").read_bytes()
    published = sitk.ReadImage(str(pub / "lung1.output.mhd"))
    assert np.array_equal(sitk.GetArrayViewFromImage(published), sitk.GetArrayViewFromImage(mask))


@pytest.mark.parametrize("name", ["lung1", "lung2"])
def test_bundled_model_leaves_solid_lesions_alone(
    name: str, tmp_path: Path, shared_data: Path, repo_root: Path, model_repository: Path
) -> None:
    """Issue 4's acceptance: ``dicom-node infer`` with the bundled model marks no voxel of the scans' solid lesions
    (``*_label.nrrd``: not ground glass) as GGO, and at most 5 mL on these scans without any ground glass."""
    from tests.model_export import COMMITTED_ONNX

    if not COMMITTED_ONNX.is_file():
        pytest.skip("no committed model: a random-weight model says nothing about solid lesions")
    chest = shared_data / "chest_ct_volumes"
    (tmp_path / "in").mkdir()
    sitk.WriteImage(sitk.ReadImage(str(chest / f"{name}_image.nrrd")), str(tmp_path / "in" / f"{name}.nii.gz"))
    proc = _infer(_settings(tmp_path, repo_root, model_repository), tmp_path / "in", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / f"{name}.mhd"))) > 0
    label = sitk.ReadImage(str(chest / f"{name}_label.nrrd"))
    solid = sitk.GetArrayFromImage(label) > 0
    assert solid.sum() > 100
    assert int((mask & solid).sum()) == 0, f"{name}: solid-lesion voxels marked as ground glass"
    ml = float(mask.sum()) * float(np.prod(label.GetSpacing())) / 1000.0
    # Issue 4: <= 5 mL of false positives on the lesion-free held-out scan (lung2); lung1 is held to it too.
    assert ml <= 5.0, f"{name}: {ml:.1f} mL marked on a scan without ground glass"


def test_mhd_in_with_oblique_direction(
    tmp_path: Path,
    lung1: sitk.Image,
    repo_root: Path,
    model_repository: Path,
) -> None:
    """lung1's voxels as MetaImage with an oblique direction (and a dotted name): the mask has exactly that grid."""
    import math

    a = math.radians(20.0)
    oblique = lung1[:, :, 8:40]  # 32 slices: one window in z, to keep the test quick
    oblique.SetDirection((math.cos(a), -math.sin(a), 0.0, math.sin(a), math.cos(a), 0.0, 0.0, 0.0, 1.0))
    (tmp_path / "in").mkdir()
    sitk.WriteImage(oblique, str(tmp_path / "in" / "chest.ct.mhd"))
    proc = _infer(_settings(tmp_path, repo_root, model_repository), tmp_path / "in", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    mask = sitk.ReadImage(str(tmp_path / "out" / "chest.ct.mhd"))
    _assert_same_grid(mask, sitk.ReadImage(str(tmp_path / "in" / "chest.ct.mhd")))
    assert not (tmp_path / "pub").exists()


def _error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def settings_file(tmp_path: Path, repo_root: Path, model_repository: Path) -> Path:
    return _settings(tmp_path, repo_root, model_repository)


def test_empty_input_folder(tmp_path: Path, settings_file: Path) -> None:
    (tmp_path / "in").mkdir()
    _error(_infer(settings_file, tmp_path / "in", tmp_path / "out"), str(tmp_path / "in"), "empty")


def test_two_volumes(tmp_path: Path, settings_file: Path) -> None:
    (tmp_path / "in").mkdir()
    for name in ("a.nii.gz", "b.mha"):
        sitk.WriteImage(sitk.Image(8, 8, 8, sitk.sitkInt16), str(tmp_path / "in" / name))
    _error(_infer(settings_file, tmp_path / "in", tmp_path / "out"), str(tmp_path / "in"), "2 volumes")


def test_unreadable_file(tmp_path: Path, settings_file: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "scan.nii.gz").write_bytes(b"\x1f\x8b garbage")
    _error(_infer(settings_file, tmp_path / "in", tmp_path / "out"), str(tmp_path / "in" / "scan.nii.gz"), "unreadable")


def test_2d_image(tmp_path: Path, settings_file: Path) -> None:
    (tmp_path / "in").mkdir()
    sitk.WriteImage(sitk.Image(64, 64, sitk.sitkInt16), str(tmp_path / "in" / "slice.mha"))
    _error(_infer(settings_file, tmp_path / "in", tmp_path / "out"), str(tmp_path / "in" / "slice.mha"), "2-D")


def test_model_missing(tmp_path: Path, repo_root: Path) -> None:
    empty_repo = tmp_path / "repo"
    empty_repo.mkdir()
    (tmp_path / "in").mkdir()
    sitk.WriteImage(sitk.Image(8, 8, 8, sitk.sitkInt16), str(tmp_path / "in" / "v.nii.gz"))
    proc = _infer(
        _settings(tmp_path, repo_root, empty_repo), tmp_path / "in", tmp_path / "out", "--backend", "onnxruntime"
    )
    _error(proc, str(empty_repo / "segmentation_ct_covid_lesion_v1" / "1" / "model.onnx"), "not found")
    assert not (tmp_path / "out").exists()


def test_dicom_series_folder_through_node_reconstruction(
    tmp_path: Path, shared_data: Path, repo_root: Path, model_repository: Path
) -> None:
    """A DICOM folder is read by the node's own reconstruction: JPEG Lossless, shuffled names, true geometry."""
    from pydicom.uid import JPEGLosslessSV1

    from tests import factories

    written = factories.write_ct_series(
        factories.read_volume(shared_data / "chest_ct_volumes" / "lung1_image.nrrd"),
        tmp_path / "in" / "lung1_dicom",
        transfer_syntax=JPEGLosslessSV1,
        tag="lung1-file-mode",
    )
    proc = _infer(_settings(tmp_path, repo_root, model_repository), tmp_path / "in", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    mask = sitk.ReadImage(str(tmp_path / "out" / "lung1_dicom.mhd"))
    assert mask.GetSize() == written.image.GetSize()
    np.testing.assert_allclose(mask.GetOrigin(), written.image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(mask.GetSpacing(), written.image.GetSpacing(), atol=1e-6)


def test_dicom_folder_with_undecodable_image_is_one_line_error(
    tmp_path: Path, shared_data: Path, repo_root: Path, model_repository: Path
) -> None:
    """The private ELSCINT1 compression no open decoder reads: refused naming the file, never zeros."""
    (tmp_path / "in").mkdir()
    src = shared_data / "codecs" / "orthanc_ELSCINT1_PMSCT_RLE1_private.dcm"
    (tmp_path / "in" / src.name).write_bytes(src.read_bytes())
    proc = _infer(_settings(tmp_path, repo_root, model_repository), tmp_path / "in", tmp_path / "out")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert src.name in lines[0] or "ELSCINT" in lines[0] or "PMSCT" in lines[0], lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
