"""The reference model's training options (models/training/train.py): lesion-balanced sampling, the fast training
layout, lesion-weighted loss, network width. Small synthetic inputs; the full command is timed and measured in
models/training/README.md."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "models" / "training"))

import train  # noqa: E402


def _pool() -> list[dict]:  # type: ignore[type-arg]
    """One volume (z,y,x = 16,96,96) with a big lesion (about 5,800 voxels) and a small one (27 voxels)."""
    label = np.zeros((16, 96, 96), np.uint8)
    label[2:10, 10:40, 10:40] = 1
    label[12:15, 80:83, 80:83] = 1
    image = np.full(label.shape, 0.1, np.float16)
    fg = np.argwhere(label > 0).astype(np.int32)
    hard = np.zeros((0, 3), np.int32)
    return [{"image": image, "label": label, "fg": fg, "hard": hard}]


def test_index_lesions_keeps_each_lesion_big_enough() -> None:
    pool = _pool()
    train.index_lesions(pool, min_voxels=20, per_lesion=500)
    lesions = pool[0]["lesions"]
    assert sorted(len(les) for les in lesions) == [27, 500]  # the big one subsampled, the small one whole
    for les in lesions:
        assert pool[0]["label"][tuple(les.T)].all()
    train.index_lesions(pool, min_voxels=28)
    assert len(pool[0]["lesions"]) == 1  # a lesion under min_voxels is not indexed


@pytest.mark.parametrize(("per_lesion", "low", "high"), [(False, 0.0, 0.05), (True, 0.3, 0.7)])
def test_lesion_sampling_centres_small_lesions_as_often_as_big_ones(per_lesion: bool, low: float, high: float) -> None:
    """Voxel sampling nearly never centres the 27-voxel lesion; lesion sampling does so about half the time."""
    pool = _pool()
    train.index_lesions(pool)
    rng = np.random.default_rng(0)
    hits = 0
    n = 200
    for _ in range(n):
        _x, y = train.sample_batch(
            pool, rng, 1, (32, 32, 8), p_fg=1.0, p_hard=0.0, p_spatial=0.0, per_lesion=per_lesion
        )
        hits += 0 < int(y.sum()) <= 27  # the patch holds the small lesion (the two are 40 voxels apart)
    assert low <= hits / n <= high


def test_a_channels_last_bf16_trained_net_exports_to_plain_onnx(tmp_path: Path) -> None:
    """train.py trains in channels_last_3d (optionally under bfloat16 autocast) and converts back before export."""
    torch = pytest.importorskip("torch")
    import common
    import export

    net = common.make_net("batch").to(memory_format=torch.channels_last_3d)
    x = torch.rand(2, 1, 32, 32, 16).contiguous(memory_format=torch.channels_last_3d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    out.float().mean().backward()
    net = net.eval().to(memory_format=torch.contiguous_format)
    err = export.export(net, tmp_path / "model.onnx", check_shape=(64, 64, 16))
    assert err < 1e-2


def test_lesion_weights_lift_small_lesions_up_to_the_clip() -> None:
    """--lesion-weight-max: background 1; a lesion of n voxels sqrt(ref / n), clipped to [1, max]."""
    y = np.zeros((2, 1, 40, 40, 8), np.int64)
    y[0, 0, 2:5, 2:5, 2:5] = 1  # 27 voxels: sqrt(1309 / 27) = 7.0, clipped to 4
    y[0, 0, 10:30, 10:30, 1:7] = 1  # 2400 voxels: larger than the reference, so 1
    y[1, 0, 10:20, 10:20, 2:6] = 1  # 400 voxels: sqrt(1309 / 400) = 1.81
    w = train.lesion_weights(y, ref_voxels=1309.0, max_weight=4.0)
    assert w.shape == y.shape and w.dtype == np.float32
    assert w[0, 0, 3, 3, 3] == pytest.approx(4.0)
    assert w[0, 0, 20, 20, 3] == pytest.approx(1.0)
    assert w[1, 0, 15, 15, 3] == pytest.approx(np.sqrt(1309.0 / 400.0))
    assert (w[y == 0] == 1.0).all()


def test_make_net_takes_the_two_widths_the_issue_allows() -> None:
    pytest.importorskip("monai")
    import common

    small = sum(p.numel() for p in common.make_net("batch", 8).parameters())
    wide = sum(p.numel() for p in common.make_net("batch", 16).parameters())
    assert 3.9 < wide / small < 4.1
    with pytest.raises(ValueError, match="init_filters"):
        common.make_net("batch", 32)


def test_normal_lung_patches_come_from_the_clean_copy_and_leave_other_runs_as_they_were() -> None:
    """``p_clean`` draws patches from the lesion-free copy, centred on its dense normal lung; at 0 it draws no
    random number, so phase 1 (and every run made before it existed) samples exactly the same patches."""
    pool = _pool()
    clean = {
        "image": np.full((16, 96, 96), 0.2, np.float16),
        "label": np.zeros((16, 96, 96), np.uint8),
        "fg": np.zeros((0, 3), np.int32),
        "hard": np.zeros((0, 3), np.int32),
        "dense_lung": np.array([[8, 70, 20]], np.int32),
    }
    clean["image"][8, 70, 20] = 0.3
    pool.append(clean)
    train.index_lesions(pool)
    before = train.sample_batch(pool, np.random.default_rng(5), 2, (32, 32, 8), 0.5, 0.2, per_lesion=True)
    after = train.sample_batch(
        pool, np.random.default_rng(5), 2, (32, 32, 8), 0.5, 0.2, per_lesion=True, p_clean=0.0, clean=[1]
    )
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(0)
    for _ in range(20):
        _x, y = train.sample_batch(pool, rng, 1, (32, 32, 8), 1.0, 0.0, p_spatial=0.0, p_clean=1.0, clean=[1])
        assert not y.any()  # p_fg is 1: a patch of the lesion volume would be centred on a lesion


def test_recipe_v2_trains_its_base_unless_weights_are_given() -> None:
    """v2 starts from recipe v1 trained from scratch; given weights (a base already trained) replace that stage, and
    asking for both, or for no starting point at all, is refused before any training starts."""
    v2 = train.parse_args(["--out", "run"])
    assert (v2.recipe, v2.base_recipe, v2.iters, v2.finetune_iters) == ("v2", "v1", 0, 2000)
    again = train.parse_args(["--out", "run", "--phase1-weights", "run/base/model.pt"])
    assert again.base_recipe == "none" and again.finetune_iters == 2000
    assert train.parse_args(["--out", "run", "--recipe", "v2-scratch"]).base_recipe == "none"
    for argv in (
        ["--out", "run", "--base-recipe", "v1", "--phase1-weights", "w.pt"],
        ["--out", "run", "--base-recipe", "none"],
        ["--out", "run", "--recipe", "v1", "--base-recipe", "v1"],
    ):
        with pytest.raises(SystemExit):
            train.parse_args(argv)


def test_rehearsal_patches_come_from_the_second_pool_and_leave_other_runs_as_they_were() -> None:
    """``p_rehearse`` draws patches from the base recipe's pool (v2's phase 2 replays v1's); at 0 it draws no random
    number, so the runs made before it existed sample exactly the same patches."""
    pool = _pool()
    train.index_lesions(pool)
    other = _pool()
    other[0]["image"] = np.full(other[0]["label"].shape, 0.7, np.float16)
    train.index_lesions(other)
    before = train.sample_batch(pool, np.random.default_rng(5), 2, (32, 32, 8), 0.5, 0.2, per_lesion=True)
    after = train.sample_batch(
        pool, np.random.default_rng(5), 2, (32, 32, 8), 0.5, 0.2, per_lesion=True, p_rehearse=0.0, rehearsal=other
    )
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(0)
    from_other = 0
    for _ in range(200):
        x, _y = train.sample_batch(pool, rng, 1, (32, 32, 8), 0.5, 0.2, p_spatial=0.0, p_rehearse=0.25, rehearsal=other)
        from_other += float(x.max()) > 0.4  # about 0.7 (gain, offset and noise of a few per cent) against 0.1
    assert 0.15 <= from_other / 200 <= 0.35
    assert train.parse_args(["--out", "run", "--finetune-p-rehearse", "0.25"]).finetune_p_rehearse == 0.25
