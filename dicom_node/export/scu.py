"""C-STORE SCU: send files to one destination over one association and say, for each, whether to count it
delivered, retry, or give up.

Presentation contexts: each SOP class of the batch twice, Explicit VR Little Endian alone first, then Implicit VR
Little Endian alone, so an acceptor that takes both gives us Explicit (the encoding of every object the node
writes; never Deflated, which some archives and dciodvfy cannot read) and one that only takes Implicit still gets
the object (pynetdicom re-encodes between the two uncompressed syntaxes).

Outcome mapping (``SendStatus``), with the reason kept for ``dicom-node status``:

=====================================================  ==========  ==============================================
what happened                                          status      why
=====================================================  ==========  ==============================================
0x0000 Success                                         SUCCESS
0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007          WARNING     stored with coercion / discarded elements /
                                                                   data set does not match SOP class: the peer
                                                                   holds it; counts as delivered, recorded as a
                                                                   warning
0xA7xx Refused: out of resources                       RETRY       the peer's disk or queue is full: transient
0xA9xx Error: data set does not match SOP class        FAILED      the peer judged the content; resending the
                                                                   same bytes cannot change its mind
0x0122 SOP class not supported, 0x0124 not            FAILED      permanent configuration mismatch
authorized, 0x0117 invalid object instance,
0x0211 unrecognized operation
0xCxxx Error: cannot understand, 0x0110 processing     RETRY       archives use these for internal/transient
failure, any other failure status                                  faults as well; bounded by export.max_attempts
no accepted presentation context for the SOP class     FAILED      the peer does not take that SOP class at all
association rejected, aborted, connection refused,    RETRY       the peer is down, busy or misconfigured right
timeout, no response                                               now; bounded by export.max_attempts
the file cannot be read                                FAILED      nothing to send
=====================================================  ==========  ==============================================
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.presentation import build_context

from dicom_node.settings import ConfigError, Destination
from dicom_node.tls import client_context
from dicom_node.types import SendResult, SendStatus

log = logging.getLogger(__name__)

WARNING_STATUSES = frozenset({0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007})
PERMANENT_STATUSES = frozenset({0x0117, 0x0122, 0x0124, 0x0211})


def destination_key(destination: Destination) -> str:
    """How a destination is named in the outbox and the logs: ``AE@host:port``."""
    return f"{destination.ae_title}@{destination.host}:{destination.port}"


def classify_status(status: int) -> tuple[SendStatus, str]:
    """Map a C-STORE response status to what the outbox does with it, and a short reason."""
    if status == 0x0000:
        return SendStatus.SUCCESS, "success"
    if status in WARNING_STATUSES:
        names = {
            0x0001: "warning",
            0x0107: "attribute list error",
            0x0116: "attribute value out of range",
            0xB000: "coercion of data elements",
            0xB006: "elements discarded",
            0xB007: "data set does not match SOP class",
        }
        return SendStatus.WARNING, f"warning 0x{status:04X} ({names[status]})"
    if status & 0xFF00 == 0xA700:
        return SendStatus.RETRY, f"refused 0x{status:04X}: out of resources"
    if status & 0xFF00 == 0xA900:
        return SendStatus.FAILED, f"error 0x{status:04X}: data set does not match SOP class"
    if status in PERMANENT_STATUSES:
        names = {
            0x0117: "invalid object instance",
            0x0122: "SOP class not supported",
            0x0124: "not authorized",
            0x0211: "unrecognized operation",
        }
        return SendStatus.FAILED, f"failure 0x{status:04X}: {names[status]}"
    if status & 0xF000 == 0xC000:
        return SendStatus.RETRY, f"error 0x{status:04X}: cannot understand"
    if status == 0xFE00:
        return SendStatus.RETRY, "cancelled by the peer (0xFE00)"
    return SendStatus.RETRY, f"failure status 0x{status:04X}"


def send(path: Path, destination: Destination, calling_ae_title: str, timeout_s: float) -> SendResult:
    """C-STORE the one DICOM file ``path`` to ``destination`` (``send_many`` of one file)."""
    return next(iter(send_many([path], destination, calling_ae_title, timeout_s)))


def send_many(
    paths: Sequence[Path], destination: Destination, calling_ae_title: str, timeout_s: float
) -> Generator[SendResult, None, None]:
    """C-STORE the DICOM files ``paths`` to ``destination`` over one association, in order; never raises for
    network or peer trouble.

    Yields one result per file, as each C-STORE is answered. When the association cannot be made, every file gets
    the same RETRY result (each was tried, as it would have been on its own). When the association is lost
    mid-way, the file it was lost on gets RETRY and the iteration stops: the files after it were not tried, and
    the caller puts them back untouched. One association per batch rather than per file: a job's overlay series
    is a few dozen images, and each association costs a TCP (and TLS) handshake and an A-ASSOCIATE negotiation
    on both sides.

    ``calling_ae_title`` is used unless the destination names its own; ``timeout_s`` bounds the TCP connect, the
    association negotiation, each DIMSE response and network silence. A destination with ``tls`` is reached over
    DICOM TLS (its certificate verified against its ``ca_certificates``); the context is built for each
    association, so renewed certificate files are used without a restart.
    """
    name = destination_key(destination)
    sop_classes: list[str | None] = []  # None: unreadable, reported with ``unreadable``'s reason in its turn
    unreadable: dict[int, str] = {}
    for i, path in enumerate(paths):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
            sop_classes.append(str(header.SOPClassUID))
        except (OSError, AttributeError, pydicom.errors.InvalidDicomError) as exc:
            sop_classes.append(None)
            unreadable[i] = f"cannot read {path}: {exc}"
    tls_args = None
    if destination.tls is not None:
        try:
            tls_args = (client_context(destination.tls, f"destination {name}: tls"), destination.host)
        except ConfigError as exc:  # a file gone since start-up: retried, so a restored file is picked up
            yield from (SendResult(name, SendStatus.RETRY, None, str(exc)) for _ in paths)
            return

    ae = AE(ae_title=destination.calling_ae_title or calling_ae_title)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.requested_contexts = [  # a batch holds a few SOP classes (SEG, SR, overlay): far below the 128 allowed
        build_context(sop_class, [syntax])
        for sop_class in dict.fromkeys(c for c in sop_classes if c is not None)
        for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    ]
    if not ae.requested_contexts:  # nothing readable: no association needed to say so
        yield from (SendResult(name, SendStatus.FAILED, None, unreadable[i]) for i in range(len(paths)))
        return
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    except (OSError, RuntimeError, ValueError) as exc:
        yield from (SendResult(name, SendStatus.RETRY, None, f"association failed: {exc}") for _ in paths)
        return
    if not assoc.is_established:
        reason = _not_established(assoc, tls_args is not None)
        yield from (SendResult(name, SendStatus.RETRY, None, reason) for _ in paths)
        return
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        for i, (path, sop_class) in enumerate(zip(paths, sop_classes, strict=True)):
            if sop_class is None:
                yield SendResult(name, SendStatus.FAILED, None, unreadable[i])
                continue
            if sop_class not in accepted:
                yield SendResult(
                    name, SendStatus.FAILED, None, f"destination accepts no presentation context for {sop_class}"
                )
                continue
            try:
                ds = pydicom.dcmread(path)
            except (OSError, pydicom.errors.InvalidDicomError) as exc:
                yield SendResult(name, SendStatus.FAILED, None, f"cannot read {path}: {exc}")
                continue
            result = _store(assoc, ds, name)
            yield result
            if not assoc.is_established:  # lost: the files after this one were not tried
                return
    finally:
        if assoc.is_established:
            assoc.release()


def _not_established(assoc: Any, over_tls: bool) -> str:
    if assoc.is_rejected:
        reason = "association rejected"
        rsp: Any = getattr(assoc.acceptor, "primitive", None)
        with contextlib.suppress(AttributeError, KeyError, TypeError, ValueError):
            reason += f" ({rsp.result_str}, source {rsp.source_str}: {rsp.reason_str})"
        return reason
    # pynetdicom reports a refused or timed-out TCP connection as an abort, too
    reason = "no association: connection refused, unreachable or timed out, or aborted by the peer"
    if over_tls:
        reason += ", or the TLS handshake failed (certificate not verified by destinations[].tls)"
    return reason


def _store(assoc: Any, ds: pydicom.Dataset, name: str) -> SendResult:
    """One C-STORE on an established association, its answer mapped by ``classify_status``."""
    try:
        status_ds = assoc.send_c_store(ds)
    except (OSError, RuntimeError, ValueError, AttributeError) as exc:
        return SendResult(name, SendStatus.RETRY, None, f"C-STORE could not be sent: {exc}")
    if status_ds is None or "Status" not in status_ds:
        why = "aborted" if assoc.is_aborted else "no response (timeout or connection lost)"
        return SendResult(name, SendStatus.RETRY, None, f"C-STORE {why}")
    status = int(status_ds.Status)
    outcome, reason = classify_status(status)
    comment = status_ds.get("ErrorComment")
    if comment:
        reason += f": {comment}"
    return SendResult(name, outcome, status, reason)
