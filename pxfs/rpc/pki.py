"""The cluster CA and the credentials it issues: who a peer is comes from its certificate alone.

A credential is a directory holding ``ca.pem`` (the cluster CA), ``cert.pem`` and ``key.pem``
(0600). The certificate says who its holder is:
  subject CN                       the identity (a node id for nodes, a free label for clients)
  subject OU                       the role: node | admin | mount
  SAN URI ``pxfs:volume:NAME``     (mount only, repeated) the volumes it may mount; none: every volume
The serial number names it for revocation (``pxfs credential revoke``).

The cluster directory keeps the CA key (``ca.key``, 0600) beside ``ca.pem``; whoever holds it can
issue credentials, so it stays on the operator's machine and never goes to a mount host.
"""

from __future__ import annotations

import datetime
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pxfs.durable import replace_file
from pxfs.errors import Invalid, NotFound, Unauthorized
from pxfs.paths import is_name

ROLES = ("node", "admin", "mount")
VOLUME_URI = "pxfs:volume:"
CA_DAYS = 3650
DEFAULT_DAYS = 365


@dataclass(frozen=True)
class Identity:
    """A peer as its certificate names it."""

    name: str
    role: str
    serial: int
    volumes: frozenset[str] | None = None  # mount: the volumes it may use; None: every volume

    def may_use(self, volume: str) -> bool:
        return self.role in ("node", "admin") or self.volumes is None or volume in self.volumes

    def __str__(self) -> str:
        return f"{self.role} {self.name!r} (credential {self.serial:x})"


def identity_of(der: bytes) -> Identity:
    """The identity a (chain-verified) certificate names; Unauthorized when it names none."""
    cert = x509.load_der_x509_certificate(der)
    try:
        name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        role = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value
    except IndexError:
        raise Unauthorized(f"credential {cert.serial_number:x}", "names no pxfs identity (CN and OU)") from None
    if role not in ROLES:
        raise Unauthorized(f"credential {cert.serial_number:x}", f"unknown role {role!r}")
    volumes: frozenset[str] | None = None
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
        named = {u.removeprefix(VOLUME_URI) for u in uris if u.startswith(VOLUME_URI)}
        volumes = frozenset(named) if named else None
    except x509.ExtensionNotFound:
        pass
    return Identity(name=str(name), role=str(role), serial=cert.serial_number, volumes=volumes)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    replace_file(path, pem, mode=0o600)


def make_ca(directory: Path, cluster_name: str) -> None:
    """``ca.key`` (0600) and ``ca.pem`` in ``directory``: the root every credential chains to."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pxfs cluster {cluster_name} CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    _write_key(directory / "ca.key", key)
    replace_file(directory / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def issue(cluster_dir: Path, out: Path, name: str, role: str, volumes: list[str] | None = None,
          days: float = DEFAULT_DAYS) -> Identity:
    """A credential for ``name`` in ``role`` written to ``out`` (0700), signed by the cluster CA."""
    if role not in ROLES:
        raise Invalid(f"credential role {role!r}", f"must be one of {', '.join(ROLES)}")
    if not is_name(name):
        raise Invalid(f"credential name {name!r}", "must be 1-63 letters, digits, '_', '.', '-'")
    for v in volumes or []:
        if not is_name(v):
            raise Invalid(f"volume {v!r}", "not a volume name")
    if volumes and role != "mount":
        raise Invalid(f"credential {name!r}", "--volume applies to the mount role only")
    if not 0 < days <= CA_DAYS:
        raise Invalid(f"credential {name!r}", f"validity must be 1 to {CA_DAYS} days")
    try:
        ca_key = serialization.load_pem_private_key((cluster_dir / "ca.key").read_bytes(), password=None)
        ca_pem = (cluster_dir / "ca.pem").read_bytes()
    except FileNotFoundError:
        raise NotFound(f"cluster directory {str(cluster_dir)!r}",
                       "holds no CA key (ca.key): credentials are issued where the cluster was initialised") from None
    ca = x509.load_pem_x509_certificate(ca_pem)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    serial = x509.random_serial_number()
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)]))
               .issuer_name(ca.subject).public_key(key.public_key()).serial_number(serial)
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]),
                              critical=False))
    if volumes:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(VOLUME_URI + v) for v in sorted(set(volumes))]),
            critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    _write_key(out / "key.pem", key)
    replace_file(out / "cert.pem", cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    replace_file(out / "ca.pem", ca_pem, mode=0o644)
    return identity_of(cert.public_bytes(serialization.Encoding.DER))


@dataclass
class Credential:
    """A loaded credential directory and the TLS contexts made from it (made once, reused)."""

    path: Path
    identity: Identity
    _contexts: dict[str, ssl.SSLContext] = field(default_factory=dict, repr=False)

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        ctx = ssl.create_default_context(purpose, cafile=str(self.path / "ca.pem"))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(str(self.path / "cert.pem"), str(self.path / "key.pem"))
        # Peers are named by the identity in their certificate, not by a host name: a node's
        # address is whatever it listens on. The chain to the cluster CA is what is checked.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def server_context(self) -> ssl.SSLContext:
        if "server" not in self._contexts:
            self._contexts["server"] = self._context(ssl.Purpose.CLIENT_AUTH)
        return self._contexts["server"]

    def client_context(self) -> ssl.SSLContext:
        if "client" not in self._contexts:
            self._contexts["client"] = self._context(ssl.Purpose.SERVER_AUTH)
        return self._contexts["client"]


def load(path: Path) -> Credential:
    """The credential in directory ``path``; NotFound / Invalid with what is wrong with it."""
    what = f"credential {str(path)!r}"
    try:
        cert_pem = (path / "cert.pem").read_bytes()
        for part in ("key.pem", "ca.pem"):
            if not (path / part).exists():
                raise NotFound(what, f"has no {part}")
    except FileNotFoundError:
        raise NotFound(what, "has no cert.pem (issue one with `pxfs credential issue`)") from None
    except PermissionError:
        raise Invalid(what, "not readable by this user (its key is mode 0600)") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise Invalid(what, f"cert.pem is not a PEM certificate: {exc}") from None
    if cert.not_valid_after_utc < datetime.datetime.now(datetime.UTC):
        raise Invalid(what, f"expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    cred = Credential(path=path, identity=identity_of(cert.public_bytes(serialization.Encoding.DER)))
    try:
        cred.client_context()
    except (ssl.SSLError, OSError) as exc:
        raise Invalid(what, f"unusable: {exc}") from None
    return cred
