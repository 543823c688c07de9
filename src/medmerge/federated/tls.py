"""Local-mode credentials (cryptography): a CA, the SuperLink's certificate for 127.0.0.1/localhost,
one EC P-384 key pair per SuperNode (OpenSSH format, as Flower's node authentication reads) and the
consortium's ed25519 app-publisher key (OpenSSH, as `flower-supernode --trusted-entities` reads).

Every file is created with mode 0600 by `os.open` itself (never readable by others, whatever the
umask, not even for a moment), under a temporary name, then linked into place: an existing key is
never overwritten (FileExistsError)."""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    """Create `path` holding `data`, mode `mode` from its creation on; refuse to replace a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask can only remove bits; this states the mode whatever it was
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic, and fails if `path` exists
    finally:
        tmp.unlink()
    return path


def make_certificates(folder: Path, host: str = "127.0.0.1") -> dict[str, Path]:
    """ca.pem, server.pem, server.key in `folder`; the server certificate names 127.0.0.1, localhost
    and `host` (the SuperLink's address)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "medmerge local CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    if host not in ("localhost", "127.0.0.1"):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return {
        "ca": _write(folder / "ca.pem", ca.public_bytes(pem)),
        "cert": _write(folder / "server.pem", cert.public_bytes(pem)),
        "key": _write(
            folder / "server.key",
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        ),
    }


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """(private, public) OpenSSH EC P-384 keys of one SuperNode."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return _write(folder / f"{name}.key", private), _write(folder / f"{name}.pub", public + b"\n")


def make_publisher_key(folder: Path, name: str = "publisher") -> tuple[Path, Path]:
    """(private, public) OpenSSH ed25519 keys of the app publisher (the consortium): it signs the app
    (FAB) at build time; every SuperNode trusts its public key (`--trusted-entities`)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return _write(folder / f"{name}.key", private), _write(folder / f"{name}.pub", public + b"\n")
