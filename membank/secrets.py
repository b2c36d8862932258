"""Secrets given as files (token files for gRPC auth), shared by the bank server and the device,
and the development secrets of a one-host stack (`membank dev-secrets`: a self-signed TLS
certificate and random tokens, as docker-compose.yml runs with)."""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
from pathlib import Path


def read_secret(path: str) -> str:
    """A token file's content, surrounding whitespace removed (an argparse `type` for
    *-token-file)."""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {e.strerror}") from None
    if not token:
        raise argparse.ArgumentTypeError(f"{path} is empty")
    return token


# -- development secrets: a self-signed certificate and tokens for a one-host stack -----------
def _write_private(path: Path, data: bytes) -> None:
    """Create `path` 0600 from the first byte; an existing file is never replaced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def self_signed_cert(names: list[str], days: int = 365) -> tuple[bytes, bytes]:
    """(certificate PEM, PKCS#8 key PEM): an EC P-256 certificate naming `names` (DNS names, or
    IP addresses where a name parses as one), self-signed and marked a CA, so that clients pin
    the certificate itself as their CA (`--tls-ca`)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if not names:
        raise ValueError("a certificate needs at least one name")
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def write_dev_secrets(out_dir: str | Path, names: list[str]) -> dict[str, Path]:
    """Write what a one-host stack (docker-compose.yml) runs TLS and tokens with into `out_dir`
    (created 0700): tls.crt / tls.key (self_signed_cert of `names`), read-token, admin-token
    (random, 0600). Existing files are kept, so a rerun changes nothing. Production uses its
    own CA and Secrets (deploy/README.md, "TLS, tokens and signing keys")."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = {k: out / k for k in ("tls.crt", "tls.key", "read-token", "admin-token")}
    if not (paths["tls.crt"].exists() and paths["tls.key"].exists()):
        cert, key = self_signed_cert(names)
        paths["tls.key"].unlink(missing_ok=True)
        _write_private(paths["tls.key"], key)
        paths["tls.crt"].write_bytes(cert)
    for k in ("read-token", "admin-token"):
        if not paths[k].exists():
            _write_private(paths[k], secrets.token_urlsafe(32).encode() + b"\n")
    return paths
