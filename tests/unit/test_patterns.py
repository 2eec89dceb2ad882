"""The COVID-19 pattern simulator (models/training/patterns.py) on a real chest background: what the model card
says of it holds (labels, vessels through the haze, the background's own noise, consolidated cores, the split)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "models" / "training"))

import common  # noqa: E402
import patterns  # noqa: E402


@pytest.fixture(scope="module")
def ctx(shared_data: Path) -> patterns.Context:
    """lung1's lower half on the model grid (fast), its solid lesion excluded."""
    img, solid = common.load_real("lung1")
    spec = common.spec()
    img_m = common.to_model_grid(img, spec)
    solid_m = sitk.GetArrayFromImage(common.to_model_grid(common.with_array(solid.astype(np.float32), img), spec, True))
    hu = sitk.GetArrayFromImage(img_m)[8:32]
    return patterns.context(hu, tuple(spec.pre.spacing_mm), img_m.GetDirection(), exclude=solid_m[8:32] > 0.5)


def test_draw_bands_of_the_two_splits_never_meet() -> None:
    train = patterns.Draw(np.random.default_rng(0), "train")
    held = patterns.Draw(np.random.default_rng(0), "eval")
    a = np.array([train.uniform(0.0, 6.0) for _ in range(2000)])
    b = np.array([held.uniform(0.0, 6.0) for _ in range(2000)])
    assert set(np.floor(a).astype(int)) == {0, 2, 4}
    assert set(np.floor(b).astype(int)) == {1, 3, 5}
    with pytest.raises(ValueError, match="split"):
        patterns.Draw(np.random.default_rng(0), "test")


def test_sharp_margins_are_drawn_in_training_only_and_leave_other_draws_as_they_were() -> None:
    """A step margin for the share asked for, in the training split; the evaluation split (and a training draw at
    0) consumes no random number for it, so the held-out lesions and the earlier pools stay exactly as they were."""
    train = patterns.Draw(np.random.default_rng(0), "train", sharp=0.3)
    widths = np.array([train.margin(0.2) for _ in range(2000)])
    assert set(widths) == {0.2, patterns.SHARP_WIDTH}
    assert 0.25 < float(np.mean(widths == patterns.SHARP_WIDTH)) < 0.35
    for split, sharp in (("eval", 0.3), ("train", 0.0)):
        with_margin = patterns.Draw(np.random.default_rng(1), split, sharp=sharp)
        without = patterns.Draw(np.random.default_rng(1), split)
        assert [with_margin.margin(0.2) for _ in range(50)] == [0.2] * 50
        assert with_margin.uniform(0.0, 1.0) == without.uniform(0.0, 1.0)


def test_scanner_is_measured_from_the_background(ctx: patterns.Context) -> None:
    assert 5.0 < ctx.scanner.noise_hu < 80.0
    assert 0.2 < ctx.scanner.psf_mm < 1.5
    assert ctx.posterior[ctx.lung].min() == 0.0 and ctx.posterior[ctx.lung].max() == 1.0


@pytest.mark.parametrize("name", patterns.PATTERNS)
def test_each_pattern_is_seeded_lung_only_and_ground_glass(ctx: patterns.Context, name: str) -> None:
    a = patterns.insert(ctx, (name,), np.random.default_rng([1, 2]), "train")
    if name == "multifocal":  # seeded: the same seed draws the same volume (once: each insertion takes seconds)
        b = patterns.insert(ctx, (name,), np.random.default_rng([1, 2]), "train")
        np.testing.assert_array_equal(a.hu, b.hu)
        np.testing.assert_array_equal(a.label, b.label)
    lab = a.label > 0
    assert lab.sum() > 50, name
    assert not (lab & ~ctx.allowed).any(), "labels only in the lung fields, never airway or solid lesion"
    hu = a.hu[lab]
    assert -760.0 < float(np.median(hu)) < -350.0, name  # ground-glass attenuation
    assert a.patterns == (name,)
    # nothing changes far from the lesions: the rest of the scan is the background's own voxels
    far = ~(a.hu != ctx.hu)
    assert far.mean() > 0.3


def test_vessels_stay_visible_and_noise_is_the_backgrounds(ctx: patterns.Context) -> None:
    ins = patterns.insert(ctx, ("diffuse",), np.random.default_rng([4, 4]), "train", scale=1.5)
    lab = ins.label > 0
    vessel = lab & (ctx.smooth > -100.0)
    parenchyma = lab & (ctx.smooth < -800.0)
    assert vessel.sum() > 20 and parenchyma.sum() > 200
    # a vessel gains little, the air spaces around it much: the vessel still stands out of the haze
    assert np.median((ins.hu - ctx.hu)[vessel]) < 0.5 * np.median((ins.hu - ctx.hu)[parenchyma])
    assert np.median(ins.hu[vessel]) > np.median(ins.hu[parenchyma]) + 200.0
    # the original noise is kept: the high-pass residual inside the lesion is the background's
    res_before = ctx.hu - ctx.smooth
    res_after = ins.hu - patterns.simulate.smooth_mm(ins.hu, ctx.spacing_xyz, 1.0)
    ratio = np.std(res_after[parenchyma]) / np.std(res_before[parenchyma])
    assert 0.7 < ratio < 1.3


def test_consolidated_core_is_dense_and_label_zero(ctx: patterns.Context) -> None:
    ins = patterns.insert(ctx, ("consolidation",), np.random.default_rng([9, 1]), "train")
    assert ins.core.any()
    assert not (ins.core & (ins.label > 0)).any(), "a consolidated core is label 0"
    inner = ins.core & ctx.allowed
    assert np.median(ins.hu[inner]) > -300.0, "denser than about -300 HU, vessels obscured"


def test_crazy_paving_carries_a_network_of_lines(ctx: patterns.Context) -> None:
    fld = patterns.crazy_paving(ctx, patterns.Draw(np.random.default_rng([3, 3]), "train"), 1.0)
    ins = patterns.render(ctx, fld)
    lab = ins.label > 0
    on, off = lab & (fld.septa > 0.5), lab & (fld.septa < 0.05)
    assert on.sum() > 50 and off.sum() > 50
    added = ins.hu - ctx.hu
    # the septa stand out of the haze (by 100 HU or more after the scanner's blur), and are ground glass (label 1)
    assert np.median(added[on]) > np.median(added[off]) + 100.0
