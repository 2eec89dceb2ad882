from __future__ import annotations

import math

import numpy as np
import pytest

from dicom_node.series import geometry as g

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _stack(n: int, step: float, orientation: tuple[float, ...] = AXIAL, origin=(0.0, 0.0, 0.0)) -> list[list[float]]:
    normal = g.slice_normal(orientation)
    return [list(np.asarray(origin) + normal * step * k) for k in range(n)]


def _tilted(n: int, step: float, tilt_deg: float) -> tuple[tuple[float, ...], list[list[float]]]:
    """A GE-style tilted head stack: image plane tilted about x, positions stepped along the table (z)."""
    t = math.radians(tilt_deg)
    orientation = (1.0, 0.0, 0.0, 0.0, math.cos(t), -math.sin(t))
    return orientation, [[0.0, 0.0, step * k] for k in range(n)]


def test_normal_of_axial_and_coronal() -> None:
    assert np.allclose(g.slice_normal(AXIAL), [0, 0, 1])
    assert np.allclose(g.slice_normal((1, 0, 0, 0, 0, -1)), [0, 1, 0])


def test_normal_rejects_bad_orientation() -> None:
    with pytest.raises(ValueError, match="six"):
        g.slice_normal((1, 0, 0))
    with pytest.raises(ValueError, match="parallel"):
        g.slice_normal((1, 0, 0, 1, 0, 0))


def test_positions_along_normal() -> None:
    assert np.allclose(g.positions_along([0, 0, 1], [[5, 6, -10], [1, 2, 3]]), [-10, 3])


def test_axial_angle() -> None:
    assert g.axial_angle_deg(AXIAL) == pytest.approx(0.0)
    orientation, _ = _tilted(2, 1, 18.5)
    assert g.axial_angle_deg(orientation) == pytest.approx(18.5)
    assert g.axial_angle_deg((1, 0, 0, 0, 0, -1)) == pytest.approx(90.0)


def test_regular_stack_any_order() -> None:
    pos = _stack(10, 2.5)
    shuffled = [pos[i] for i in (3, 1, 9, 0, 2, 8, 4, 7, 5, 6)]
    assert g.is_regular_stack([AXIAL] * 10, shuffled, 0.1)


def test_regular_oblique_stack() -> None:
    c, s = math.cos(0.3), math.sin(0.3)
    oblique = (c, s, 0.0, -s * 0.8, c * 0.8, 0.6)
    assert g.is_regular_stack([oblique] * 6, _stack(6, 1.25, oblique, origin=(10, -20, 30)))


def test_missing_slice_is_not_regular() -> None:
    pos = _stack(10, 2.0)
    del pos[4]
    assert not g.is_regular_stack([AXIAL] * 9, pos)
    stats = g.spacing_stats(g.positions_along([0, 0, 1], pos))
    assert stats.median == pytest.approx(2.0)
    assert stats.gaps == (3,)
    assert stats.missing_slices() == 1


def test_uneven_steps_within_tolerance() -> None:
    pos = _stack(5, 2.0)
    pos[2][2] += 0.1  # 5 % off
    assert g.is_regular_stack([AXIAL] * 5, pos, 0.1)
    assert not g.is_regular_stack([AXIAL] * 5, pos, 0.01)


def test_duplicate_position_is_not_regular() -> None:
    pos = _stack(5, 2.0)
    pos.append(list(pos[2]))
    assert not g.is_regular_stack([AXIAL] * 6, pos)
    assert g.spacing_stats(g.positions_along([0, 0, 1], pos)).duplicates == 1


def test_mixed_orientation_is_not_regular() -> None:
    pos = _stack(3, 2.0)
    assert not g.is_regular_stack([AXIAL, AXIAL, (1, 0, 0, 0, 0.9, 0.1)], pos)


def test_gantry_tilt_detected() -> None:
    orientation, pos = _tilted(10, 1.14, 18.5)
    normal = g.slice_normal(orientation)
    assert g.is_gantry_tilted(normal, pos)
    assert g.tilt_angle_deg(normal, pos) == pytest.approx(18.5)
    assert not g.is_regular_stack([orientation] * 10, pos)


def test_rounded_positions_are_not_tilt() -> None:
    pos = [[round(x, 3) for x in p] for p in _stack(50, 0.625, origin=(-170.123456, -170.987654, -300.5))]
    assert g.is_regular_stack([AXIAL] * 50, pos)


def test_degenerate_inputs() -> None:
    assert not g.is_regular_stack([], [])
    assert g.is_regular_stack([AXIAL], [[0, 0, 0]])
    assert not g.is_regular_stack([(0, 0, 0, 0, 0, 0)] * 2, [[0, 0, 0], [0, 0, 1]])
    assert not g.is_regular_stack([AXIAL], [[0, 0, 0], [0, 0, 1]])
