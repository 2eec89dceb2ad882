from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference.errors import SpecError
from inference.spec import load_spec, parse_spec


def test_bundled_spec_loads(repo_root: Path) -> None:
    spec = load_spec(repo_root / "config" / "config_inference.json")
    assert spec.model.name == "segmentation_ct_covid_lesion_v1"
    assert spec.pre.spacing_mm == (0.8, 0.8, 5.0)
    assert spec.inferer.roi_size == (224, 224, 32)
    assert spec.segments[0].label == 1


def test_missing_key_named(repo_root: Path) -> None:
    data = json.loads((repo_root / "config" / "config_inference.json").read_text())
    del data["inferer"]["roi_size"]
    with pytest.raises(SpecError, match=r"inferer\.roi_size: missing"):
        parse_spec(data)


def test_bad_overlap(repo_root: Path) -> None:
    data = json.loads((repo_root / "config" / "config_inference.json").read_text())
    data["inferer"]["overlap"] = 1.5
    with pytest.raises(SpecError, match="overlap"):
        parse_spec(data)
