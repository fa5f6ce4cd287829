"""The box's own TLS certificate, and clients that pin it.

No certificate authority can sign for a box on an offline LAN, so the box makes its own
(P-256, self-signed) and clients trust it by its public key's SHA-256, written as curl's
`--pinnedpubkey` takes it (`sha256//BASE64`). The operator learns that fingerprint out of
band, from the key note on the boot partition or the console; discovery announces it too,
and a client checks it against the certificate the box presents.

The certificate names the box (its host name, NAME.local, localhost) but no address:
addresses change with DHCP, and a pinned client checks the key, not the name.

A certificate directory holds (each file 0600; `prefix` is "tls_" where systemd hands the
directory over as credentials):

    device.pem    the certificate presented now, and its key (one file: one rename swaps both)
    next.pem      one made by a rotation, presented from the time in
    next-after    (seconds since the epoch): until then clients pinned to the old key keep
                  working, and can learn the new one over a connection the old one secures
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from edgellm.errors import EdgeError
from edgellm.files import write_atomic

NEXT_AFTER = "next-after"
WATCH_INTERVAL = 2.0  # seconds between looks at the certificate directory (a rotation's time)

log = logging.getLogger("edgellm.tls")


class TLSError(EdgeError):
    """A certificate that cannot be made, read or trusted; one line for the operator."""

    code = "tls_error"


class PinMismatch(TLSError):
    """The box presents another key than the fingerprint the client pinned."""

    code = "tls_pin_mismatch"


def make(names: list[str]) -> tuple[bytes, bytes]:
    """A new P-256 key and a self-signed certificate for `names`: (certificate PEM, key PEM).

    Valid from 2000 to 9999: a board without a clock may boot in 1970 or in the future, and
    what a client trusts is the pinned key, not the dates."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0]),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgellm")])
    public = key.public_key()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC))
            .not_valid_after(datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dict.fromkeys(names)]), False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def fingerprint(cert: bytes) -> str:
    """sha256//BASE64 of the certificate's public key (PEM or DER), as curl --pinnedpubkey takes it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        parsed = (x509.load_pem_x509_certificate(cert) if cert.lstrip().startswith(b"-----")
                  else x509.load_der_x509_certificate(cert))
    except ValueError as e:
        raise TLSError(f"not an X.509 certificate: {e}") from None
    spki = parsed.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256//" + base64.b64encode(hashlib.sha256(spki).digest()).decode()


def box_names(hostname: str = "") -> list[str]:
    """The names a box's certificate carries: its host name, NAME.local and localhost."""
    short = (hostname or socket.gethostname()).split(".")[0] or "edgellm"
    return [short, f"{short}.local", "localhost"]


@dataclass(frozen=True)
class Presented:
    """The certificate a directory says to present now, and the next one if a rotation waits."""

    file: Path  # the certificate, and its key unless `key` names another file
    fingerprint: str
    next_fingerprint: str = ""
    next_after: float = 0.0
    key: Path | None = None


class Directory:
    """A certificate directory (see the module docstring)."""

    def __init__(self, path: str | Path, prefix: str = "") -> None:
        self.path = Path(path)
        self.prefix = prefix

    def file(self, name: str) -> Path:
        return self.path / (self.prefix + name)

    def exists(self) -> bool:
        return self.file("device.pem").is_file()

    def presented(self, now: float | None = None) -> Presented:
        """What to present at `now`: the rotated certificate once its time has come."""
        now = time.time() if now is None else now
        current = self.file("device.pem")
        after = self._next_after()
        if after is None:
            return Presented(current, _fingerprint_of(current))
        upcoming = self.file("next.pem")
        if now >= after:
            return Presented(upcoming, _fingerprint_of(upcoming))
        return Presented(current, _fingerprint_of(current), next_fingerprint=_fingerprint_of(upcoming),
                         next_after=after)

    def _next_after(self) -> float | None:
        """When the waiting rotation takes over; None when none waits (or its file is gone: a
        power cut between the promotion's two steps)."""
        try:
            after = float(self.file(NEXT_AFTER).read_text().strip())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise TLSError(f"{self.file(NEXT_AFTER)}: unreadable ({e}); delete it to cancel the rotation") from None
        return after if self.file("next.pem").is_file() else None

    def make(self, names: list[str]) -> str:
        """The first certificate; returns its fingerprint."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        cert, key = make(names)
        write_atomic(self.file("device.pem"), cert + key, mode=0o600)
        return fingerprint(cert)

    def rotate(self, names: list[str], grace: float, now: float | None = None) -> Presented:
        """A new certificate, presented after `grace` seconds; the old one until then.

        A rotation already due is completed first; one still waiting is replaced. next.pem is
        whole before next-after names a time, and the promotion is one rename, so a power cut
        leaves the old certificate, or the old one and a waiting next one."""
        now = time.time() if now is None else now
        if not self.exists():
            self.make(names)
            return self.presented(now)
        self.promote(now)
        cert, key = make(names)
        self.file(NEXT_AFTER).unlink(missing_ok=True)
        write_atomic(self.file("next.pem"), cert + key, mode=0o600)
        write_atomic(self.file(NEXT_AFTER), f"{now + grace!r}\n", mode=0o600)
        return self.presented(now)

    def promote(self, now: float | None = None) -> bool:
        """Make a rotation that is due the current certificate on disk (the service presents it
        already); True when there was one."""
        after = self._next_after()
        if after is None or (time.time() if now is None else now) < after:
            return False
        os.replace(self.file("next.pem"), self.file("device.pem"))
        self.file(NEXT_AFTER).unlink()
        _fsync_dir(self.path)
        return True


def _fingerprint_of(path: Path) -> str:
    try:
        return fingerprint(path.read_bytes())
    except OSError as e:
        raise TLSError(f"{path}: cannot read the certificate: {e.strerror}") from None
    except TLSError as e:
        raise TLSError(f"{path}: {e}") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Serving:
    """The certificate the service presents, kept current: when a rotation's time comes, the live
    SSL context takes the new one (new connections get it, open ones keep theirs)."""

    def __init__(self, directory: Directory | None = None, *, cert: str = "", key: str = "") -> None:
        """A certificate directory, or the operator's own files ([server] tls = {cert, key})."""
        self.directory = directory
        if directory is not None:
            self.presented = directory.presented()
        else:
            self.presented = Presented(Path(cert), _fingerprint_of(Path(cert)), key=Path(key) if key else None)
        self._failing = False
        self._seen = self._files()

    def _files(self) -> tuple[tuple[int, int] | None, ...]:
        """The directory's files as stat sees them: what refresh() looks at before parsing anything."""
        if self.directory is None:
            return ()
        found: list[tuple[int, int] | None] = []
        for name in ("device.pem", "next.pem", NEXT_AFTER):
            try:
                st = self.directory.file(name).stat()
                found.append((st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                found.append(None)
        return tuple(found)

    def refresh(self, context: ssl.SSLContext) -> None:
        if self.directory is None:
            return
        files = self._files()
        due = bool(self.presented.next_after) and time.time() >= self.presented.next_after
        if files == self._seen and not due:
            return  # nothing changed on disk and no rotation's time came: no certificate parsed
        now = self.directory.presented()
        if now.fingerprint != self.presented.fingerprint:
            context.load_cert_chain(now.file, now.key)
            log.info("TLS certificate rotated: presenting %s now", now.fingerprint)
        elif now.next_fingerprint and now.next_fingerprint != self.presented.next_fingerprint:
            log.info("TLS certificate %s waits: presented from %s", now.next_fingerprint,
                     time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(now.next_after)))
        self.presented = now
        self._seen = files

    async def watch(self, context: ssl.SSLContext) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                self.refresh(context)
                self._failing = False
            except (TLSError, OSError, ssl.SSLError) as e:  # keep presenting the one that works
                if not self._failing:
                    log.warning("TLS certificate directory: %s; still presenting %s", e, self.presented.fingerprint)
                self._failing = True


# --- clients ---------------------------------------------------------------------------------


def fetch_certificate(host: str, port: int, timeout: float = 5.0) -> bytes:
    """The certificate (DER) a TLS server presents, unverified: only to compare with a pin."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=None) as tls:
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as e:
        raise TLSError(f"{host}:{port}: no TLS answer ({e})") from None
    if not der:
        raise TLSError(f"{host}:{port}: presented no certificate")
    return der


def pinned_context(host: str, port: int, pin: str, timeout: float = 5.0) -> ssl.SSLContext:
    """An SSL context that trusts exactly the certificate `host:port` presents, once its key is
    checked against `pin`; every later connection made with it verifies against that one
    certificate (so a box that changes its key mid-way is refused too). Give it to httpx:
    httpx.Client(verify=context), and so to the openai SDK's http_client."""
    der = fetch_certificate(host, port, timeout)
    found = fingerprint(der)
    if found != pin:
        raise PinMismatch(f"the box at {host}:{port} presents certificate {found}, not {pin} from its key note: "
                          "it is not the box you pinned (or its certificate was rotated: read the new fingerprint "
                          "from the box's console or its key note)")
    context = ssl.create_default_context(cadata=ssl.DER_cert_to_PEM_cert(der))
    context.check_hostname = False  # the pinned key is the identity; addresses and names change
    return context
