"""Certificates and SuperNode keys for a TLS deployment on this machine (tests, trials), in Python.

Made with ``cryptography`` (a dependency of Flower), so no ``openssl`` or ``ssh-keygen`` is needed: a CA,
the SuperLink's certificate for the given host names and addresses, and one ECDSA P-384 key pair per
SuperNode in OpenSSH format (what ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode
register`` read). For real deployments use your institution's CA; docs/flower.md has the openssl commands.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    # a private key is created readable by its owner only: never world-readable, not even for a moment
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def make_certificates(folder: str | Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
                      days: int = 30) -> dict[str, Path]:
    """A CA and a server certificate for ``hosts``; returns paths ``ca``, ``cert``, ``key``."""
    folder = Path(folder)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "feddiff test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))  # the extensions strict verification (Python >= 3.13) asks for
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return {
        "ca": _write(folder / "ca.crt", ca.public_bytes(pem)),
        "cert": _write(folder / "server.pem", cert.public_bytes(pem)),
        "key": _write(folder / "server.key", key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                                               serialization.NoEncryption()), private=True),
    }


def make_node_key(path: str | Path) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format: (private key file, ``.pub`` file)."""
    path = Path(path)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return _write(path, private, private=True), _write(path.with_name(path.name + ".pub"), public + b"\n")


__all__ = ["make_certificates", "make_node_key"]
