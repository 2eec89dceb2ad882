"""DIMSE status mapping and backoff schedule of the export (no network)."""

from __future__ import annotations

import pytest

from dicom_node.export.scu import classify_status
from dicom_node.settings import BackoffPolicy, ExportSection
from dicom_node.types import SendStatus


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (0x0000, SendStatus.SUCCESS),
        (0x0001, SendStatus.WARNING),
        (0x0107, SendStatus.WARNING),
        (0x0116, SendStatus.WARNING),
        (0xB000, SendStatus.WARNING),
        (0xB006, SendStatus.WARNING),
        (0xB007, SendStatus.WARNING),
        (0xA700, SendStatus.RETRY),
        (0xA7FF, SendStatus.RETRY),
        (0xA900, SendStatus.FAILED),
        (0xA9FF, SendStatus.FAILED),
        (0x0122, SendStatus.FAILED),
        (0x0124, SendStatus.FAILED),
        (0xC000, SendStatus.RETRY),
        (0xCFFF, SendStatus.RETRY),
        (0x0110, SendStatus.RETRY),
        (0xFE00, SendStatus.RETRY),
    ],
)
def test_classify_status(status: int, expected: SendStatus) -> None:
    outcome, reason = classify_status(status)
    assert outcome == expected
    assert reason


def test_backoff_doubles_and_caps() -> None:
    export = ExportSection(backoff=BackoffPolicy(initial_s=5, max_s=60))
    assert [export.backoff.delay(n) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]
