"""Key material for a federation, in the formats Flower reads, made with `cryptography` (no openssl CLI).

- The coordinator's CA and TLS server certificate: ``ca.crt``/``ca.key`` (the CA the sites trust) and
  ``server.crt``/``server.key`` (the SuperLink's certificate, signed by the CA, with subject alternative
  names localhost, 127.0.0.1, ::1 and any extra host names or addresses).
- A site's SuperNode authentication key pair: ECDSA P-384, the private key in OpenSSH format (mode 600)
  and the public key as one OpenSSH line (``ecdsa-sha2-nistp384 AAAA... NAME``), which the coordinator
  registers (``uharmony fed register``).

Every file is written to a temporary name and renamed into place; private keys are created 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import tempfile
from pathlib import Path

from uharmony.errors import ExitCode, OutputError, UHarmonyError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")
CA_DAYS = 3650
SERVER_DAYS = 825


def _write(path: Path, data: bytes, *, private: bool, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise OutputError("exists already (use --overwrite to replace it)", path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    except OSError as e:
        raise OutputError(f"cannot be written ({e.strerror or e})", path) from None
    try:
        os.fchmod(fd, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _san_entry(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
            raise UHarmonyError(f"--host {host!r} is neither an IP address nor a DNS name", code=ExitCode.USAGE) from None
        return x509.DNSName(host)


def make_ca(out: str | os.PathLike, hosts: list[str] | None = None, *, overwrite: bool = False) -> dict[str, Path]:
    """Write ca.crt, ca.key, server.crt, server.key into `out`; returns their paths by name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out)
    names = {n: out / n for n in ("ca.crt", "ca.key", "server.crt", "server.key")}
    if not overwrite:
        for p in names.values():
            if p.exists():
                raise OutputError("exists already (use --overwrite to replace the CA and server certificate)", p)
    sans = list(dict.fromkeys([*DEFAULT_SANS, *(hosts or [])]))
    san_entries = [_san_entry(h) for h in sans]
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "UHarmony federation CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=CA_DAYS))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False),
                              critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA384()))

    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv_cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[3] if len(sans) > 3
                                                            else "localhost")]))
                .issuer_name(ca_name).public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(san_entries), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA384()))

    pem = serialization.Encoding.PEM
    key_fmt = {"encoding": pem, "format": serialization.PrivateFormat.PKCS8,
               "encryption_algorithm": serialization.NoEncryption()}
    _write(names["ca.key"], ca_key.private_bytes(**key_fmt), private=True, overwrite=overwrite)
    _write(names["server.key"], srv_key.private_bytes(**key_fmt), private=True, overwrite=overwrite)
    _write(names["ca.crt"], ca_cert.public_bytes(pem), private=False, overwrite=overwrite)
    _write(names["server.crt"], srv_cert.public_bytes(pem), private=False, overwrite=overwrite)
    return names


def make_site_key(name: str, out: str | os.PathLike, *, overwrite: bool = False) -> tuple[Path, Path, str]:
    """Write OUT/NAME (private, 0600, OpenSSH) and OUT/NAME.pub; returns (private, public, public line)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not NAME_RE.match(name):
        raise UHarmonyError(f"site name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (no leading "
                            "punctuation)", code=ExitCode.USAGE)
    out = Path(out)
    private, public = out / name, out / f"{name}.pub"
    if not overwrite:
        for p in (private, public):
            if p.exists():
                raise OutputError("exists already (use --overwrite to replace it)", p)
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode("ascii") + f" {name}"
    _write(private, priv, private=True, overwrite=overwrite)
    _write(public, (line + "\n").encode("ascii"), private=False, overwrite=overwrite)
    return private, public, line


def _read_key_file(p: Path, what: str) -> bytes:
    """The bytes of a key or certificate file, or a one-line usage error naming it."""
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise UHarmonyError(f"{what} file does not exist", p, code=ExitCode.USAGE) from None
    except OSError as e:
        raise UHarmonyError(f"cannot be read ({e.strerror or e})", p, code=ExitCode.USAGE) from None


def check_public_key(path: str | os.PathLike) -> str:
    """Read a site's public key file; returns its one line, or a one-line error naming the file."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    p = Path(path)
    data = _read_key_file(p, "public key")
    try:
        key = load_ssh_public_key(data.strip())
    except (ValueError, TypeError, UnicodeError):
        raise UHarmonyError("is not an OpenSSH public key (make one with `uharmony fed keys site`)", p,
                            code=ExitCode.USAGE) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise UHarmonyError("is not an ECDSA public key (Flower's SuperNode authentication needs ECDSA; make one "
                            "with `uharmony fed keys site`)", p, code=ExitCode.USAGE)
    return data.decode("ascii").strip()


def check_private_key(path: str | os.PathLike) -> None:
    """A site's private key must exist, be an OpenSSH ECDSA key and not be readable by others."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    p = Path(path)
    data = _read_key_file(p, "private key")
    try:
        key = load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnicodeError):
        raise UHarmonyError("is not an unencrypted OpenSSH private key (make one with `uharmony fed keys site`)", p,
                            code=ExitCode.USAGE) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UHarmonyError("is not an ECDSA private key", p, code=ExitCode.USAGE)
    if os.name == "posix" and p.stat().st_mode & 0o077:
        raise UHarmonyError("private key is readable by other users (chmod 600 it)", p, code=ExitCode.USAGE)


def check_certificate(path: str | os.PathLike, what: str = "certificate") -> None:
    from cryptography import x509

    p = Path(path)
    try:
        x509.load_pem_x509_certificate(_read_key_file(p, what))
    except ValueError:
        raise UHarmonyError(f"is not a PEM {what}", p, code=ExitCode.USAGE) from None
