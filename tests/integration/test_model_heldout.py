"""Issue 4's held-out acceptance, measured on the committed model in the suite itself rather than only quoted.

``models/training/evaluate.py`` inserts 5 x 12 ground-glass opacities (seeds that training never used) into the
held-out real background (lung2), runs every volume through the node's own pipeline on ONNX Runtime with the
bundled ``config_inference.json``, and scores on the CT's own grid. About two minutes on two cores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAINING = REPO / "models" / "training"


@pytest.fixture(scope="module")
def heldout(shared_data: Path) -> dict:  # type: ignore[type-arg]
    from tests.model_export import COMMITTED_ONNX

    if not COMMITTED_ONNX.is_file():
        pytest.skip("no committed model")
    sys.path.insert(0, str(TRAINING))
    try:
        import evaluate
    finally:
        sys.path.remove(str(TRAINING))
    # Without the raw (no lung fields) runs, which no assertion reads: about 80 s of the suite.
    return evaluate.evaluate(COMMITTED_ONNX, log=lambda _msg: None, without_lung_fields=False)  # type: ignore[no-any-return]


def test_heldout_false_positives_and_solid_lesions(heldout: dict) -> None:  # type: ignore[type-arg]
    """<= 5 mL marked on the lesion-free held-out scan; no solid-lesion voxel marked on either real scan."""
    assert heldout["heldout_background"] == "lung2"
    assert heldout["fp_volume_ml_lesion_free_heldout"] <= 5.0, heldout
    for name, clean in heldout["clean_volumes"].items():
        assert clean["solid_lesion_voxels_marked_ggo"] == 0, name


@pytest.mark.xfail(strict=True, reason="issue 4 is open: the bundled model's held-out Dice is 0.74, the target 0.80")
def test_heldout_dice_meets_issue_4(heldout: dict) -> None:  # type: ignore[type-arg]
    """Mean Dice >= 0.80 over at least 30 inserted lesions >= 10 mm. Strict: a model that meets it turns this
    test red until the mark comes off."""
    assert heldout["lesions_ge_10mm"] >= 30
    assert heldout["dice_ge_10mm_mean"] >= 0.80, heldout


def test_heldout_matches_the_model_card(heldout: dict) -> None:  # type: ignore[type-arg]
    """The committed reference_metrics.json is what this very file measures (up to floating-point noise between
    CPUs), so the model card cannot drift from the model."""
    ref = json.loads((TRAINING / "reference_metrics.json").read_text())["metrics"]
    assert heldout["lesions_total"] == ref["lesions_total"]
    assert heldout["lesions_ge_10mm"] == ref["lesions_ge_10mm"]
    for key in ("dice_ge_10mm_mean", "dice_ge_10mm_median", "sensitivity_ge_10mm", "voxel_dice_all_insertions"):
        assert heldout[key] == pytest.approx(ref[key], abs=0.01), key
    assert heldout["fp_volume_ml_lesion_free_heldout"] == pytest.approx(
        ref["fp_volume_ml_lesion_free_heldout"], abs=0.25
    )
