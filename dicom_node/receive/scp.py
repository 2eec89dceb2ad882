"""The DIMSE service: C-ECHO SCP and C-STORE SCP for CT, on pynetdicom.

Listeners: ``node.port`` (plain TCP) and, with ``node.tls``, a DICOM TLS port beside it (or instead of it); the
TLS handshake runs in the connection's own thread (:mod:`dicom_node.tls`), a failed one is recorded
(``tls_refused``) and counted. Callers: pynetdicom rejects calling AE titles that neither
``node.allowed_calling_ae_titles`` nor ``node.allowed_callers`` names; a title bound to hosts
(:mod:`dicom_node.receive.callers`) calling from elsewhere is rejected here when its A-ASSOCIATE-RQ arrives. Each
rejection is recorded with its reason and counted by reason (:class:`ReceptionCounters`).

Receive path of one C-STORE (in the association's thread):

1. SOP class: CT Image Storage / Enhanced CT Image Storage are stored; any other class was refused at
   negotiation, or (``node.accept_other_sop_classes``) accepted, logged, not stored and answered Success.
2. Free space below ``storage.min_free_bytes`` -> 0xA700 Out of Resources.
3. The header is parsed from the encoded bytes (never the pixel data, never decoded): UIDs, modality, geometry,
   frames. Unreadable -> quarantined with the reason, 0xC000. Where the dataset's own SOP Class / Instance UID
   is empty, the command's Affected SOP Class / Instance UID stands; an empty or malformed Study or Series
   Instance UID -> quarantined, 0xA900 with an ErrorComment.
4. File meta + the dataset bytes exactly as received go to the spool (temp, fsync, rename, fsync folder).
5. The instance row is committed (the same transaction opens the series' job if needed).
6. Only then Success (0x0000); the ``on_stored`` hook (the daemon's pre-decoder) gets the record just before,
   and only queues it.
"""

from __future__ import annotations

import io
import itertools
import logging
import ssl
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import data_element_generator
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    EnhancedCTImageStorage,
    Verification,
)

from dicom_node import __version__
from dicom_node.db import Database, is_disk_full
from dicom_node.receive.callers import CallerPolicy
from dicom_node.receive.spool import DiskFull, Spool
from dicom_node.series.headers import InstanceUIDs, clean_uid, header_facts, instance_uids
from dicom_node.settings import Settings
from dicom_node.tls import handshake, peer_subject, server_context
from dicom_node.types import HeaderFacts, InstanceRecord

log = logging.getLogger(__name__)

CT_SOP_CLASSES = (str(CTImageStorage), str(EnhancedCTImageStorage))
TRANSFER_SYNTAXES = [
    str(ExplicitVRLittleEndian),
    str(ImplicitVRLittleEndian),
    str(DeflatedExplicitVRLittleEndian),
    str(JPEGBaseline8Bit),
    str(JPEGExtended12Bit),
    str(JPEGLossless),
    str(JPEGLosslessSV1),
    str(JPEGLSLossless),
    str(JPEGLSNearLossless),
    str(JPEG2000Lossless),
    str(JPEG2000),
    str(RLELossless),
]
"""What PACS send CT in. Explicit VR Big Endian (retired) is left out on purpose."""

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1506.1"
IMPLEMENTATION_VERSION = f"DICOMNODE_{__version__}"[:16]

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110

_HEADER_TAGS = [
    Tag(0x0008, 0x0016), Tag(0x0008, 0x0018), Tag(0x0008, 0x0060), Tag(0x0020, 0x000D), Tag(0x0020, 0x000E),
    Tag(0x0020, 0x0013), Tag(0x0020, 0x0032), Tag(0x0020, 0x0037), Tag(0x0028, 0x0008), Tag(0x0008, 0x0005),
]  # fmt: skip
_PIXEL_GROUP = 0x7FE0


class _ReactorClock:
    """Stands in for the ``time`` module inside pynetdicom's association and DUL reactors.

    Both reactors poll: the association loop sleeps 1 ms per turn and the DUL loop 1 ms when idle, so every
    C-STORE waits for several polls (measured: about 3 ms per instance, more than the store itself). While
    instances are flowing (an association was accepted or a store answered in the last second) those sleeps
    are cut to 50 us; an idle association polls at pynetdicom's own pace, so idle connections cost no CPU.
    """

    FAST_S = 0.00005
    BUSY_WINDOW_S = 1.0

    def __init__(self) -> None:
        self.busy_until = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds <= 0.001 and time.monotonic() < self.busy_until:
            time.sleep(self.FAST_S)
        else:
            time.sleep(seconds)

    def mark_busy(self) -> None:
        self.busy_until = time.monotonic() + self.BUSY_WINDOW_S


REACTOR_CLOCK = _ReactorClock()


def install_fast_reactors() -> None:
    """Point pynetdicom's reactors at :data:`REACTOR_CLOCK` (idempotent, process-wide)."""
    import pynetdicom.association
    import pynetdicom.dul

    pynetdicom.association.time = REACTOR_CLOCK  # type: ignore[assignment,attr-defined]
    pynetdicom.dul.time = REACTOR_CLOCK  # type: ignore[assignment,attr-defined]


def _tolerant_uid(value: str) -> tuple[bool, str]:
    """pynetdicom's UI validator, except that a UID longer than 64 characters passes. pynetdicom checks the
    command's Affected SOP Instance UID while decoding a C-STORE request and drops the association (no response)
    when it fails; let through, the request reaches :meth:`StorageSCP._store`, which refuses the instance with
    0xA900, an ErrorComment and a recorded refusal, and keeps the association."""
    ok, reason = _DEFAULT_UI_VALIDATOR(value)
    if not ok and len(value) > 64 and not value.strip("0123456789."):
        return True, ""
    return ok, reason


_DEFAULT_UI_VALIDATOR = pynetdicom_config.VALIDATORS["UI"]


def install_tolerant_uid_validation() -> None:
    """Make pynetdicom accept over-long UIDs in DIMSE commands (idempotent, process-wide: pynetdicom keeps its
    validators in one module-level table). The node still refuses such instances, itself."""
    pynetdicom_config.VALIDATORS["UI"] = _tolerant_uid


class Refused(Exception):
    """The instance cannot be stored; ``status`` goes back to the sender with the message as ErrorComment."""

    def __init__(self, status: int, reason: str, *, quarantine: bool = True) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.quarantine = quarantine


@dataclass(frozen=True, slots=True)
class Header:
    uids: InstanceUIDs
    facts: HeaderFacts


PIXEL_DATA = Tag(0x7FE0, 0x0010)


class _StopAtPixels:
    """``stop_when`` for pydicom's element reader: stop at the pixel data group, noting the Pixel Data element's
    declared length (0xFFFFFFFF: encapsulated) without reading its value."""

    def __init__(self) -> None:
        self.pixel_data_length: int | None = None

    def __call__(self, tag: Any, vr: Any, length: int) -> bool:
        if tag == PIXEL_DATA:
            self.pixel_data_length = int(length)
        return bool(tag.group >= _PIXEL_GROUP)


class _StrictReader(io.BytesIO):
    """A BytesIO whose short reads are errors: pydicom quietly accepts a value cut off by the end of the data,
    which would let a truncated or overlong element pass as a readable header."""

    def read(self, n: int | None = -1, /) -> bytes:
        out = super().read(n)
        if n is not None and n > 0 and len(out) < n and not (n == 8 and not out):
            raise EOFError(f"element at offset {self.tell() - len(out)} runs past the end ({n} bytes wanted)")
        return out


def parse_header(data: bytes, transfer_syntax: str) -> Dataset:
    """Parse the elements before the pixel data of an encoded dataset; raise ValueError when unreadable, or when
    it has a Pixel Data element of length 0 (an image that can never be reconstructed)."""
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        try:
            data = zlib.decompress(data, -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise ValueError(f"deflated dataset does not inflate: {exc}") from exc
    implicit = transfer_syntax == ImplicitVRLittleEndian
    little = transfer_syntax != ExplicitVRBigEndian
    fp = _StrictReader(data)
    stop = _StopAtPixels()
    try:
        raw = {e.tag: e for e in data_element_generator(fp, implicit, little, stop_when=stop)}
        ds = Dataset(raw)
        for tag in _HEADER_TAGS:  # force the values we use to be converted now, inside the try
            if tag in ds:
                _ = ds[tag].value
    except Exception as exc:
        raise ValueError(f"dataset cannot be parsed: {type(exc).__name__}: {exc}") from exc
    if len(ds) == 0:
        raise ValueError("dataset is empty or cannot be parsed")
    if stop.pixel_data_length == 0:
        raise EmptyPixelData("Pixel Data (7FE0,0010) is empty: an image without pixels cannot be reconstructed")
    return ds


class EmptyPixelData(ValueError):
    """The dataset is readable but its Pixel Data element holds nothing."""


def read_header(data: bytes, transfer_syntax: str, cmd_class: str, cmd_instance: str) -> Header:
    """The routing facts of one received dataset (through :mod:`dicom_node.series.headers`), or
    :class:`Refused` with the reason."""
    try:
        ds = parse_header(data, transfer_syntax)
    except EmptyPixelData as exc:
        raise Refused(STATUS_DATASET_MISMATCH, str(exc)) from exc
    except ValueError as exc:
        raise Refused(STATUS_CANNOT_UNDERSTAND, str(exc)) from exc
    uids = instance_uids(ds, sop_class_uid=cmd_class, sop_instance_uid=cmd_instance)
    problem = uids.problem()
    if problem is not None:
        raise Refused(STATUS_DATASET_MISMATCH, problem)
    if uids.sop_instance_uid != cmd_instance and cmd_instance:
        raise Refused(
            STATUS_DATASET_MISMATCH,
            f"SOPInstanceUID {uids.sop_instance_uid} in the dataset differs from the command's {cmd_instance}",
        )
    return Header(uids, header_facts(ds))


def encode_file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble + 'DICM' + group 0002 for a received dataset."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae[:16]
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buf.getvalue()


def _status(code: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        # ErrorComment is LO: 64 characters at most, no backslash.
        ds.ErrorComment = comment.replace("\\", "/")[:64]
    return ds


@dataclass
class _AssocState:
    id: str
    calling_ae: str
    address: str
    started: float
    listener: str = "plain"
    stored: int = 0
    bytes: int = 0
    refused: int = 0
    ignored: int = 0
    series: dict[str, int] = field(default_factory=dict)


class ReceptionCounters(Protocol):
    """What reception counts as it goes. The node's metrics (``dicom_node.ops.metrics.NodeMetrics``) implement it;
    reception names no metrics library and nothing above it, so it runs alone in a test or a tool."""

    def association_accepted(self, listener: str) -> None: ...
    def association_rejected(self, reason: str) -> None: ...
    def bytes_received(self, count: int) -> None: ...
    def instance_received(self) -> None: ...
    def instance_refused(self, status: int) -> None: ...
    def store_seconds(self, seconds: float) -> None: ...


class NoCounters:
    """:class:`ReceptionCounters` that count nothing, for an SCP run without the node's metrics."""

    def association_accepted(self, listener: str) -> None:
        pass

    def association_rejected(self, reason: str) -> None:
        pass

    def bytes_received(self, count: int) -> None:
        pass

    def instance_received(self) -> None:
        pass

    def instance_refused(self, status: int) -> None:
        pass

    def store_seconds(self, seconds: float) -> None:
        pass


class StorageSCP:
    """The AE, its handlers, and the bookkeeping the daemon needs to stop it cleanly."""

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        db: Database,
        *,
        on_released: Callable[[], None] | None = None,
        on_stored: Callable[[InstanceRecord], None] | None = None,
        metrics: ReceptionCounters | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.db = db
        self.metrics: ReceptionCounters = metrics or NoCounters()
        self.callers = CallerPolicy.from_settings(settings.node)
        self.on_released = on_released
        self.on_stored = on_stored
        """Called with each instance once durable and recorded, just before its Success goes back: it must only
        queue work (the pre-decoder does), never do it in the association's thread."""
        self._ids = itertools.count(1)
        self._assocs: dict[int, _AssocState] = {}
        self._lock = threading.Lock()
        self._in_flight = 0
        self._in_flight_cv = threading.Condition()
        self._server: Any = None
        self._tls_server: Any = None
        self._accepting = True
        install_fast_reactors()
        install_tolerant_uid_validation()
        self.ae = self._build_ae()

    # -- setup ---------------------------------------------------------------------------------------------
    def _build_ae(self) -> AE:
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_pdu_size = node.max_pdu_size
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        ae.maximum_associations = node.max_associations
        if self.callers.known:
            ae.require_calling_aet = sorted(self.callers.known)
        ae.add_supported_context(Verification)
        for sop in CT_SOP_CLASSES:
            ae.add_supported_context(sop, TRANSFER_SYNTAXES)
        if node.accept_other_sop_classes:
            from pynetdicom import StoragePresentationContexts

            for cx in StoragePresentationContexts:
                if cx.abstract_syntax and cx.abstract_syntax not in CT_SOP_CLASSES:
                    ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        return ae

    def _handlers(self, listener: str) -> list[Any]:
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REQUESTED, self._on_requested, [listener]),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        if listener == "tls":
            handlers.append((evt.EVT_CONN_OPEN, self._on_tls_open))
        return handlers

    def start(self) -> int:
        """Listen (non-blocking) on the plain port and, when configured, the TLS port; returns the plain port
        (the TLS port when ``node.tls.only``)."""
        node = self.settings.node
        tls = node.tls
        if tls is None or not tls.only:
            self._server = self.ae.start_server(
                (node.host, node.port), block=False, evt_handlers=self._handlers("plain")
            )
            self._server.block_on_close = False  # we wait for associations ourselves, with a deadline
            log.info("listening", extra={"ae_title": node.ae_title, "port": self.port, "host": node.host})
        if tls is not None:
            self._tls_server = self.ae.start_server(
                (node.host, tls.port), block=False, ssl_context=server_context(tls), evt_handlers=self._handlers("tls")
            )
            self._tls_server.block_on_close = False
            log.info(
                "listening (DICOM TLS)",
                extra={
                    "ae_title": node.ae_title, "port": self.tls_port, "host": node.host,
                    "client_certificate": "required" if tls.require_client_certificate else "optional",
                },
            )  # fmt: skip
        return self.port or self.tls_port

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server is not None else 0

    @property
    def tls_port(self) -> int:
        return int(self._tls_server.server_address[1]) if self._tls_server is not None else 0

    def listeners(self) -> str:
        """Where the node listens, for people: ``COVIDSEG@0.0.0.0 port 11112, TLS port 2762``."""
        node = self.settings.node
        parts = [f"port {self.port}"] if self.port else []
        if self.tls_port:
            parts.append(f"TLS port {self.tls_port}")
        return f"{node.ae_title}@{node.host} " + (", ".join(parts) or "nothing")

    def listener_problem(self) -> str | None:
        """None while every configured listener has its socket open; else which one does not."""
        tls = self.settings.node.tls
        wanted = [] if tls is not None and tls.only else [("DIMSE", self._server)]
        if tls is not None:
            wanted.append(("DICOM TLS", self._tls_server))
        for name, server in wanted:
            if not self._accepting:
                return "not accepting associations (the node is stopping)"
            if server is None or server.socket is None or server.socket.fileno() < 0:
                return f"the {name} listener is not open"
        return None

    def stop_accepting(self) -> None:
        """Close the listening sockets; associations already open go on."""
        self._accepting = False
        for server in (self._server, self._tls_server):
            if server is not None:
                server.shutdown()
        self._server = self._tls_server = None

    def active_associations(self) -> int:
        return len([a for a in self.ae.active_associations if a.is_acceptor and a.is_established])

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no association is open (True) or ``timeout`` passed (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.active_associations() == 0:
                return True
            time.sleep(0.05)
        return self.active_associations() == 0

    def abort_all(self) -> None:
        """Abort what is still open, after the store in flight of each has been answered."""
        with self._in_flight_cv:
            self._in_flight_cv.wait_for(lambda: self._in_flight == 0, timeout=30)
        for assoc in self.ae.active_associations:
            if assoc.is_acceptor:
                assoc.abort()
        self.ae.shutdown()

    # -- association events --------------------------------------------------------------------------------
    def _state(self, assoc: Any) -> _AssocState:
        key = id(assoc)
        st = self._assocs.get(key)
        if st is None:
            with self._lock:
                st = self._assocs.get(key)
                if st is None:
                    rq = assoc.requestor
                    st = _AssocState(
                        id=f"a{next(self._ids)}-{int(time.time() * 1000) % 10**8}",
                        calling_ae=str(rq.ae_title).strip(),
                        address=f"{rq.address}:{rq.port}",
                        started=time.monotonic(),
                    )
                    self._assocs[key] = st
        return st

    def _on_tls_open(self, event: Any) -> None:
        """Finish the TLS handshake the listener deferred (:mod:`dicom_node.tls`), in this connection's thread.

        A failure (a plain DICOM client on the TLS port, a client certificate the CA did not sign, none when one
        is required) closes the connection before any DICOM is read, and is logged, recorded and counted.
        """
        sock = event.assoc.dul.socket.socket
        peer = f"{event.address[0]}:{event.address[1]}" if event.address else "?"
        if not isinstance(sock, ssl.SSLSocket):
            return
        problem = handshake(sock, self.settings.node.acse_timeout_s)
        if problem is None:
            log.debug(f"TLS {sock.version()} with {peer}: client {peer_subject(sock) or 'without certificate'}")
            return
        reason = f"TLS connection from {peer} refused: {problem}"
        log.warning(reason, extra={"peer": peer})
        self.metrics.association_rejected("tls_handshake")
        try:
            self.db.record_event("tls_refused", reason)
        except Exception as exc:  # the refusal stands even if we cannot record it
            log.error(f"cannot record TLS refusal: {exc}")
        # No A-ASSOCIATE-RQ can arrive now: let the association thread give up at once instead of waiting
        # node.acse_timeout_s for one (it would hold a slot of node.max_associations meanwhile).
        event.assoc.acse_timeout = 0.01
        sock.close()

    def _on_requested(self, event: Any, listener: str) -> None:
        """A-ASSOCIATE-RQ received: reject a calling AE title bound to other hosts (``node.allowed_callers``);
        every other check is pynetdicom's, at negotiation."""
        st = self._state(event.assoc)
        st.listener = listener
        rq = event.assoc.requestor
        calling = str(rq.primitive.calling_ae_title).strip()
        st.calling_ae = calling
        refusal = self.callers.host_refusal(calling, str(rq.address))
        if refusal is None:
            return
        reason = f"association rejected: {refusal}"
        log.warning(reason, extra={"association": st.id, "calling_ae": calling, "peer": st.address})
        self.metrics.association_rejected("caller_host")
        self._assocs.pop(id(event.assoc), None)
        # Rejected permanent, by the service user, "calling AE title not recognised": the closest of PS3.8's
        # reasons; pynetdicom then skips negotiation. kill() returns once the answer is sent and the peer has
        # closed, as after pynetdicom's own rejections. Recorded after the answer, so the sender does not wait.
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)
        event.assoc.kill()
        try:
            self.db.record_event("association_rejected", reason, calling_ae_title=calling, association_id=st.id)
        except Exception as exc:
            log.error(f"cannot record rejection: {exc}", extra={"association": st.id})

    def _on_accepted(self, event: Any) -> None:
        REACTOR_CLOCK.mark_busy()
        st = self._state(event.assoc)
        self.metrics.association_accepted(st.listener)
        refused = [cx for cx in event.assoc.rejected_contexts]
        if not refused:
            return
        classes = sorted({str(cx.abstract_syntax) for cx in refused})
        accepted = {str(cx.abstract_syntax) for cx in event.assoc.accepted_contexts}
        log.debug(f"presentation contexts refused: {', '.join(classes)}", extra={"association": st.id})
        if not accepted - {str(Verification)}:
            # Nothing this sender proposed can be stored here: say so where an operator looks.
            reason = f"SOP classes not accepted (refused at negotiation): {', '.join(classes)[:400]}"
            log.warning(reason, extra={"association": st.id, "calling_ae": st.calling_ae})
            self.db.record_event("context_refused", reason, calling_ae_title=st.calling_ae, association_id=st.id)

    def _on_rejected(self, event: Any) -> None:
        st = self._state(event.assoc)
        node = self.settings.node
        answer = event.assoc.acceptor.primitive
        why = (getattr(answer, "result_source", None), getattr(answer, "diagnostic", None))
        if why == (0x03, 0x02):
            label = "too_many_associations"
            reason = f"association rejected: node.max_associations={node.max_associations} associations are open"
        elif why == (0x01, 0x07):
            label = "called_ae_title"
            called = str(getattr(event.assoc.requestor.primitive, "called_ae_title", "")).strip()
            reason = f"association rejected: called AE title {called!r} is not ours ({node.ae_title})"
        elif why == (0x01, 0x03) or (self.callers.known and st.calling_ae not in self.callers.known):
            label = "calling_ae_title"
            lists = "node.allowed_calling_ae_titles" + (" or node.allowed_callers" if node.allowed_callers else "")
            reason = f"association rejected: calling AE title {st.calling_ae!r} is not in {lists}"
        else:
            label = "other"
            reason = f"association rejected (source {why[0]}, reason {why[1]})"
        self.metrics.association_rejected(label)
        log.warning(reason, extra={"association": st.id, "calling_ae": st.calling_ae, "peer": st.address})
        self.db.record_event("association_rejected", reason, calling_ae_title=st.calling_ae, association_id=st.id)
        self._assocs.pop(id(event.assoc), None)

    def _finish(self, event: Any, how: str) -> _AssocState | None:
        st = self._assocs.pop(id(event.assoc), None)
        if st is None:
            return None
        secs = time.monotonic() - st.started
        for series_uid, count in st.series.items():
            log.info(
                "instances stored",
                extra={"association": st.id, "series_uid": series_uid, "count": count, "calling_ae": st.calling_ae},
            )
        level = logging.INFO if how == "released" else logging.WARNING
        log.log(
            level,
            f"association {how}",
            extra={
                "association": st.id, "calling_ae": st.calling_ae, "peer": st.address, "stored": st.stored,
                "refused": st.refused, "ignored": st.ignored, "bytes": st.bytes, "seconds": round(secs, 3),
            },
        )  # fmt: skip
        return st

    def _on_released(self, event: Any) -> None:
        st = self._finish(event, "released")
        if st is not None and st.series:
            self.db.association_released(st.id, list(st.series), time.time())
            if self.on_released is not None:
                self.on_released()

    def _on_aborted(self, event: Any) -> None:
        self._finish(event, "aborted")

    def _on_closed(self, event: Any) -> None:
        # A connection that dropped without release or abort PDU.
        self._finish(event, "closed")

    def _on_echo(self, event: Any) -> int:
        return STATUS_SUCCESS

    # -- C-STORE -------------------------------------------------------------------------------------------
    def _on_store(self, event: Any) -> Any:
        with self._in_flight_cv:
            self._in_flight += 1
        t0 = time.perf_counter()
        try:
            return self._store(event)
        finally:
            self.metrics.store_seconds(time.perf_counter() - t0)
            REACTOR_CLOCK.mark_busy()
            with self._in_flight_cv:
                self._in_flight -= 1
                self._in_flight_cv.notify_all()

    def _refuse(self, st: _AssocState, exc: Refused, data: bytes | None, meta: bytes | None, sop: str) -> Dataset:
        st.refused += 1
        self.metrics.instance_refused(exc.status)
        qpath = None
        if exc.quarantine and data is not None:
            try:
                qpath = self.spool.quarantine(exc.reason, meta or b"", data)
            except OSError as qexc:
                log.error(f"cannot quarantine: {qexc}", extra={"association": st.id})
        log.warning(
            f"instance refused: {exc.reason}",
            extra={
                "association": st.id, "calling_ae": st.calling_ae, "sop_uid": sop, "status": f"0x{exc.status:04X}",
                "quarantine": str(qpath) if qpath else None,
            },
        )  # fmt: skip
        try:
            self.db.record_event(
                "instance_refused", exc.reason, calling_ae_title=st.calling_ae, association_id=st.id,
                sop_instance_uid=sop, status=exc.status, path=qpath,
            )  # fmt: skip
        except Exception as dbexc:  # the refusal stands even if we cannot record it
            log.error(f"cannot record refusal: {dbexc}", extra={"association": st.id})
        return _status(exc.status, exc.reason)

    def _store(self, event: Any) -> Any:
        st = self._state(event.assoc)
        req = event.request
        cmd_class = clean_uid(req.AffectedSOPClassUID)
        cmd_instance = clean_uid(req.AffectedSOPInstanceUID)
        ts = str(event.context.transfer_syntax)
        if cmd_class not in CT_SOP_CLASSES:
            # Only negotiable with node.accept_other_sop_classes.
            st.ignored += 1
            log.info(
                "non-CT instance accepted and ignored (node.accept_other_sop_classes)",
                extra={"association": st.id, "sop_class": cmd_class, "sop_uid": cmd_instance},
            )
            return STATUS_SUCCESS
        data: bytes = event.encoded_dataset(include_meta=False)
        self.metrics.bytes_received(len(data))
        try:
            self.spool.check_space(len(data) + 1024)
        except DiskFull as exc:
            refusal = Refused(STATUS_OUT_OF_RESOURCES, str(exc), quarantine=False)
            return self._refuse(st, refusal, None, None, cmd_instance)
        try:
            header = read_header(data, ts, cmd_class, cmd_instance)
        except Refused as exc:
            meta = encode_file_meta(cmd_class or "1.2.3", cmd_instance or "1.2.3", ts, st.calling_ae)
            return self._refuse(st, exc, data, meta, cmd_instance)
        try:
            meta = encode_file_meta(header.uids.sop_class_uid, header.uids.sop_instance_uid, ts, st.calling_ae)
            path, size = self.spool.store(
                header.uids.study_instance_uid,
                header.uids.series_instance_uid,
                header.uids.sop_instance_uid,
                meta,
                data,
            )
            rec = InstanceRecord(
                sop_instance_uid=header.uids.sop_instance_uid,
                sop_class_uid=header.uids.sop_class_uid,
                study_instance_uid=header.uids.study_instance_uid,
                series_instance_uid=header.uids.series_instance_uid,
                transfer_syntax_uid=ts,
                path=path,
                size=size,
                calling_ae_title=st.calling_ae,
                association_id=st.id,
                received_at=time.time(),
            )
            stored = self.db.add_instance(rec, header.facts, self.settings.series.on_new_instances_after_done)
        except OSError as exc:
            log.exception(
                "cannot store instance", extra={"association": st.id, "sop_uid": header.uids.sop_instance_uid}
            )
            reason = f"cannot store: {exc.strerror or exc}"
            return self._refuse(st, Refused(STATUS_OUT_OF_RESOURCES, reason, quarantine=False), None, None,
                                header.uids.sop_instance_uid)  # fmt: skip
        except Exception as exc:
            full = is_disk_full(exc)
            (log.error if full else log.exception)(
                f"cannot record instance: {exc}",
                extra={"association": st.id, "sop_uid": header.uids.sop_instance_uid},
            )
            reason = f"cannot record: {type(exc).__name__}: {exc}"
            status = STATUS_OUT_OF_RESOURCES if full else STATUS_PROCESSING_FAILURE
            return self._refuse(st, Refused(status, reason, quarantine=False), None, None,
                                header.uids.sop_instance_uid)  # fmt: skip
        if stored.previous_path is not None and self.spool.contains(stored.previous_path):
            stored.previous_path.unlink(missing_ok=True)
        st.stored += 1
        st.bytes += size
        self.metrics.instance_received()
        if self.on_stored is not None:
            try:
                self.on_stored(rec)
            except Exception:  # the instance is stored; a failed hand-off only costs its job a decode
                log.exception("on_stored hook failed", extra={"association": st.id, "sop_uid": rec.sop_instance_uid})
        st.series[header.uids.series_instance_uid] = st.series.get(header.uids.series_instance_uid, 0) + 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "instance stored",
                extra={
                    "association": st.id, "sop_uid": header.uids.sop_instance_uid,
                    "series_uid": header.uids.series_instance_uid,
                    "replaced": stored.replaced, "job_id": stored.job_id,
                },
            )  # fmt: skip
        return STATUS_SUCCESS
