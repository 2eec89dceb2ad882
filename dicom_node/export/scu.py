"""C-STORE SCU: send one file to one destination and say whether to count it delivered, retry, or give up.

Presentation contexts: the object's SOP class twice, Explicit VR Little Endian alone first, then Implicit VR
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
    """C-STORE the DICOM file ``path`` to ``destination``; never raises for network or peer trouble.

    ``calling_ae_title`` is used unless the destination names its own; ``timeout_s`` bounds the TCP connect, the
    association negotiation, each DIMSE response and network silence. A destination with ``tls`` is reached over
    DICOM TLS (its certificate verified against its ``ca_certificates``); the context is built for each send, so
    renewed certificate files are used without a restart.
    """
    name = destination_key(destination)
    try:
        ds = pydicom.dcmread(path)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        return SendResult(name, SendStatus.FAILED, None, f"cannot read {path}: {exc}")
    sop_class = str(ds.SOPClassUID)
    tls_args = None
    if destination.tls is not None:
        try:
            tls_args = (client_context(destination.tls, f"destination {name}: tls"), destination.host)
        except ConfigError as exc:  # a file gone since start-up: retried, so a restored file is picked up
            return SendResult(name, SendStatus.RETRY, None, str(exc))

    ae = AE(ae_title=destination.calling_ae_title or calling_ae_title)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.requested_contexts = [
        build_context(sop_class, [ExplicitVRLittleEndian]),
        build_context(sop_class, [ImplicitVRLittleEndian]),
    ]
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    except (OSError, RuntimeError, ValueError) as exc:
        return SendResult(name, SendStatus.RETRY, None, f"association failed: {exc}")
    if not assoc.is_established:
        if assoc.is_rejected:
            reason = "association rejected"
            rsp: Any = getattr(assoc.acceptor, "primitive", None)
            with contextlib.suppress(AttributeError, KeyError, TypeError, ValueError):
                reason += f" ({rsp.result_str}, source {rsp.source_str}: {rsp.reason_str})"
        else:
            # pynetdicom reports a refused or timed-out TCP connection as an abort, too
            reason = "no association: connection refused, unreachable or timed out, or aborted by the peer"
            if tls_args is not None:
                reason += ", or the TLS handshake failed (certificate not verified by destinations[].tls)"
        return SendResult(name, SendStatus.RETRY, None, reason)
    try:
        if not any(cx.abstract_syntax == sop_class for cx in assoc.accepted_contexts):
            return SendResult(
                name, SendStatus.FAILED, None, f"destination accepts no presentation context for {sop_class}"
            )
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
    finally:
        if assoc.is_established:
            assoc.release()
