"""Issue 17's held-out acceptance, measured on the committed model in the suite itself rather than only quoted.

``models/training/evaluate_patterns.py`` draws each COVID-19 pattern with the evaluation settings (bands of every
parameter range that training never drew) into the held-out real background lung2, runs every volume through the
node's own pipeline on ONNX Runtime with the bundled ``config_inference.json``, and scores on the CT's own grid.
The suite runs the first case of each pattern on lung2 (the model card's evaluation runs two cases on each of
two held-out backgrounds, seeds identical), plus lung1 and lung2 as they are: about three minutes on two cores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAINING = REPO / "models" / "training"


def _reference() -> dict:  # type: ignore[type-arg]
    return json.loads((TRAINING / "reference_metrics_patterns.json").read_text())["metrics"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def heldout(shared_data: Path) -> dict:  # type: ignore[type-arg]
    from tests.model_export import COMMITTED_ONNX

    if not COMMITTED_ONNX.is_file():
        pytest.skip("no committed model")
    sys.path.insert(0, str(TRAINING))
    try:
        import evaluate_patterns
    finally:
        sys.path.remove(str(TRAINING))
    return evaluate_patterns.evaluate_patterns(  # type: ignore[no-any-return]
        COMMITTED_ONNX, cases=1, log=lambda _msg: None, heldout=("lung2",), clean=("lung1", "lung2")
    )


def test_heldout_false_positives_and_solid_nodules(heldout: dict) -> None:  # type: ignore[type-arg]
    """<= 5 mL marked on the clean held-out scan; no solid nodule with more than 1 % of its voxels marked."""
    clean = heldout["clean_volumes"]
    assert clean["lung2"]["fp_volume_ml"] <= 5.0, clean
    for name, entry in clean.items():
        assert entry["solid_nodules"] >= 1, name
        assert entry["solid_max_fraction_marked"] <= 0.01, (name, entry)


def test_heldout_matches_the_model_card(heldout: dict) -> None:  # type: ignore[type-arg]
    """The committed reference_metrics_patterns.json is what this very code measures (up to floating-point noise between
    CPUs): the same truth volume and, within 2 % or 0.5 mL, the same predicted volume for every pattern's first
    lung2 case; so the model card cannot drift from the model."""
    ref = _reference()["by_pattern_and_background"]
    for pattern, entries in heldout["by_pattern_and_background"].items():
        got, want = entries["lung2"]["cases"][0], ref[pattern]["lung2"]["cases"][0]
        assert got["truth_ml"] == pytest.approx(want["truth_ml"], abs=0.05), pattern
        assert got["pred_ml"] == pytest.approx(want["pred_ml"], rel=0.02, abs=0.5), pattern


@pytest.mark.parametrize(
    "pattern",
    [
        "peripheral",
        "multifocal",
        "diffuse",  # per lung 0.953 (per connected region 0.596: the costophrenic recesses, MODEL_CARD.md)
        "crazy_paving",
        "consolidation",  # 0.817 with the consolidation rule in the model file (MODEL_CARD.md, "Labels")
    ],
)
def test_model_card_meets_issue_17(pattern: str) -> None:
    """The model card's full evaluation (two held-out backgrounds, two cases each): Dice >= 0.80 per pattern on
    regions >= 10 mm (for diffuse, each lung's involvement: ``evaluate_patterns.CRITERION``), and the diffuse
    cases' involved volume within 15 %. The previous test ties those figures to the committed model."""
    entry = _reference()["by_pattern"][pattern]
    dice = entry["dice_mean_per_lung"] if entry["criterion"] == "lungs" else entry["dice_mean"]
    assert dice >= 0.80, entry
    if pattern == "diffuse":
        assert entry["max_abs_volume_error"] <= 0.15, entry


def test_model_card_clean_heldout_volumes_meet_issue_17() -> None:
    """The model card's clean volumes: each held-out background (lung2 and lidc_idri_0295, whose 4.03 mL has the
    least margin) marks at most 5 mL, and no solid nodule on any background has more than 1 % of its voxels marked.
    ``test_heldout_false_positives_and_solid_nodules`` re-measures lung2 from the committed file."""
    clean = _reference()["clean_volumes"]
    held_out = [name for name, entry in clean.items() if entry["heldout"]]
    assert sorted(held_out) == ["lidc_idri_0295", "lung2"]
    for name in held_out:
        assert clean[name]["fp_volume_ml"] <= 5.0, (name, clean[name])
    for name, entry in clean.items():
        assert entry["solid_max_fraction_marked"] <= 0.01, (name, entry)
