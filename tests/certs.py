"""Certificates made by the tests (``cryptography``): a CA, leaf certificates it signs for 127.0.0.1 and
localhost, and a rogue CA whose leaves the node must refuse. PEM files, keys unencrypted, valid for a day."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class KeyPair:
    certificate: Path
    private_key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    """The CA certificate (PEM) that signed node, client and pacs."""
    node: KeyPair
    client: KeyPair
    pacs: KeyPair
    rogue: KeyPair
    """Signed by another CA: the node and its destinations must refuse it."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _window() -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)


def _ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _window()
    usage = x509.KeyUsage(
        digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False,
    )  # fmt: skip
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(common_name: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, out: Path) -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _window()
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pair = KeyPair(out / f"{common_name}.pem", out / f"{common_name}.key")
    pair.certificate.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.private_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    return pair


def make_pki(out: Path) -> Pki:
    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca("dicom-node test CA")
    (out / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    rogue_key, rogue_cert = _ca("rogue CA")
    return Pki(
        ca=out / "ca.pem",
        node=_leaf("node", ca_key, ca_cert, out),
        client=_leaf("client", ca_key, ca_cert, out),
        pacs=_leaf("pacs", ca_key, ca_cert, out),
        rogue=_leaf("rogue", rogue_key, rogue_cert, out),
    )
