"""DICOM TLS (PS3.15 Annex B): the ``ssl.SSLContext`` of the node's TLS listener and of its TLS destinations.

Both sides ask for TLS 1.2 or later (BCP 195, which the Annex's current profiles follow) and leave the cipher
choice to OpenSSL's defaults for that floor. The listener verifies a client certificate against
``node.tls.ca_certificates`` (required by default: mutual authentication, as IHE ATNA asks of a secure node);
the client side always verifies the destination's certificate against its ``ca_certificates`` and, unless told
otherwise, that it names the destination's host.

The listener's handshake does not run in pynetdicom's accept loop (which would make one slow or silent client
stall every other TLS connection): :class:`DeferredHandshakeContext` hands the socket over un-handshaken and
the SCP completes the handshake in the association's own thread (:func:`handshake`), with a timeout, so a
failure is logged, recorded and counted instead of vanishing inside the server loop.

A certificate or key that cannot be loaded is a :class:`~dicom_node.settings.ConfigError` naming the file: the
node does not start with a TLS configuration it cannot use.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import cast

from dicom_node.settings import ConfigError, DestinationTls, Settings, TlsListener

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class DeferredHandshakeContext(ssl.SSLContext):
    """An ``SSLContext`` whose server sockets are wrapped without the handshake; :func:`handshake` does it."""

    def wrap_socket(  # type: ignore[override]
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=False,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=server_hostname,
            session=session,
        )


def _load_chain(context: ssl.SSLContext, certificate: Path, private_key: Path, key: str) -> None:
    try:
        context.load_cert_chain(certfile=str(certificate), keyfile=str(private_key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{key}: cannot load certificate {certificate} with private key {private_key}: {_why(exc)}"
        ) from exc


def _load_cas(context: ssl.SSLContext, ca_certificates: Path, key: str) -> None:
    try:
        context.load_verify_locations(cafile=str(ca_certificates))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{key}: cannot load CA certificates {ca_certificates}: {_why(exc)}") from exc


_HINTS = {
    "WRONG_VERSION_NUMBER": " (not TLS: a plain DICOM association on the TLS port?)",
    "HTTP_REQUEST": " (not TLS: a plain connection on the TLS port?)",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": " (node.tls.require_client_certificate is true)",
}


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower() + _HINTS.get(str(exc.reason), "")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def server_context(tls: TlsListener) -> DeferredHandshakeContext:
    """The listener's context (``node.tls``)."""
    context = DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    _load_chain(context, tls.certificate, tls.private_key, "node.tls")
    if tls.ca_certificates is not None:
        _load_cas(context, tls.ca_certificates, "node.tls.ca_certificates")
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(tls: DestinationTls, key: str = "destinations[].tls") -> ssl.SSLContext:
    """The context of one TLS destination (built per association, so renewed files are picked up)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = MINIMUM_VERSION
    context.check_hostname = tls.check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    _load_cas(context, tls.ca_certificates, f"{key}.ca_certificates")
    if tls.certificate is not None and tls.private_key is not None:
        _load_chain(context, tls.certificate, tls.private_key, key)
    return context


def handshake(sock: ssl.SSLSocket, timeout_s: float) -> str | None:
    """Complete a deferred server-side handshake; None when it succeeded, else why it failed. The socket is left
    blocking, as pynetdicom expects it."""
    sock.settimeout(timeout_s)
    try:
        sock.do_handshake()
    except TimeoutError:
        return f"no TLS handshake within {timeout_s:g} s"
    except ssl.SSLError as exc:
        return f"TLS handshake failed: {_why(exc)}"
    except OSError as exc:
        return f"TLS handshake failed: {exc.strerror or exc}"
    sock.settimeout(None)
    return None


def peer_subject(sock: ssl.SSLSocket) -> str | None:
    """The client certificate's subject as ``CN=...,O=...``, when it presented one."""
    cert = sock.getpeercert()
    if not cert:
        return None
    subject = cast("tuple[tuple[tuple[str, str], ...], ...]", cert.get("subject", ()))
    parts = [f"{_short(k)}={v}" for rdn in subject for k, v in rdn]
    return ",".join(parts) or None


def _short(name: str) -> str:
    return {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C"}.get(
        name, name
    )


def check_configuration(settings: Settings) -> None:
    """Load every configured certificate, key and CA file once, at start: a ConfigError naming the file now,
    rather than a listener that cannot start or a send that cannot succeed later."""
    if settings.node.tls is not None:
        server_context(settings.node.tls)
    for d in settings.destinations:
        if d.tls is not None:
            client_context(d.tls, f"destination {d.ae_title}@{d.host}:{d.port}: tls")
