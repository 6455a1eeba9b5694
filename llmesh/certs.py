"""``llmesh certs``: a local CA, one certificate per service, and the mesh secret.

For mTLS between services where no PKI exists yet (compose's ``certs`` service runs it
into a shared volume; in Kubernetes its folder becomes a Secret). Each service's
certificate is valid as server and as client, for its own name, ``localhost`` and
127.0.0.1 (so in-container health checks verify it), plus any extra names given
(``router=router.llmesh.svc``). Re-running keeps what exists and adds what is missing,
so a restarted init step does not invalidate running services; ``--force`` renews all.
Keys and the secret are written owner-only.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import sys
from pathlib import Path

from llmesh.mesh_secret import MESH_SECRET_FILE, write_secret

CA_CERT, CA_KEY = "ca.pem", "ca.key"
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,62})$")


def _write(path: Path, data: bytes, private: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "llmesh"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _load_ca(out: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate((out / CA_CERT).read_bytes())
    key = serialization.load_pem_private_key((out / CA_KEY).read_bytes(), password=None)
    return cert, key


def make_ca(out: Path, days: int):
    """A self-signed CA (``ca.pem``, ``ca.key``); returns (certificate, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    key = _new_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    name = _name("llmesh local CA")
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write(out / CA_KEY, _pem_key(key), private=True)
    _write(out / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return cert, key


def make_leaf(out: Path, name: str, hosts: list[str], ca_cert, ca_key, days: int) -> None:
    """``<name>.pem`` / ``<name>.key``: a server-and-client certificate for ``name``, ``localhost``,
    127.0.0.1 and ``hosts``, signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = _new_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([name, "localhost", *hosts, "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write(out / f"{name}.key", _pem_key(key), private=True)
    _write(out / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM), private=False)


def parse_service(spec: str) -> tuple[str, list[str]]:
    """``name`` or ``name=host,host`` → (name, extra hosts)."""
    name, _, extra = spec.partition("=")
    name = name.strip()
    if not _NAME_RE.match(name):
        raise ValueError(f"service name {name!r} must be lower-case letters, digits, '.' or '-' (it names the "
                         "files and the certificate's DNS name)")
    return name, [h.strip() for h in extra.split(",") if h.strip()]


def write_certs(out: str | Path, services: list[str], *, days: int = 365, force: bool = False) -> list[str]:
    """CA, per-service certificates and the mesh secret in ``out``; returns the files written."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    parsed = [parse_service(s) for s in services]
    written: list[str] = []
    if force or not (folder / CA_CERT).exists() or not (folder / CA_KEY).exists():
        ca_cert, ca_key = make_ca(folder, days)
        written += [CA_CERT, CA_KEY]
        force = True  # leaves of an older CA would no longer verify
    else:
        ca_cert, ca_key = _load_ca(folder)
    for name, hosts in parsed:
        if force or not (folder / f"{name}.pem").exists() or not (folder / f"{name}.key").exists():
            make_leaf(folder, name, hosts, ca_cert, ca_key, days)
            written += [f"{name}.pem", f"{name}.key"]
    if force or not (folder / MESH_SECRET_FILE).exists():
        write_secret(folder / MESH_SECRET_FILE)
        written.append(MESH_SECRET_FILE)
    return written


def _cmd_certs(args: argparse.Namespace) -> int:
    try:
        written = write_certs(args.out, args.services, days=args.days, force=args.force)
    except (ValueError, OSError) as e:
        print(f"llmesh certs: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: wrote {', '.join(written)}" if written else f"{args.out}: everything already there")
    return 0


def add_certs_command(sub) -> None:
    p = sub.add_parser("certs", help="write a local CA, per-service certificates (mTLS) and the mesh secret")
    p.add_argument("services", nargs="+", metavar="SERVICE[=HOST,...]",
                   help="one certificate per service, valid for its name, localhost, 127.0.0.1 and HOSTs")
    p.add_argument("--out", required=True, help="folder to write into (kept: existing files are reused)")
    p.add_argument("--days", type=int, default=365, help="validity of new certificates")
    p.add_argument("--force", action="store_true", help="renew the CA, every certificate and the secret")
    p.set_defaults(fn=_cmd_certs)
