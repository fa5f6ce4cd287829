"""Ed25519 signatures in minisign's formats, so operators can use either tool.

An operator may sign a bundle with Debian's `minisign` and edgellm verifies
it; edgellm's own signatures verify with `minisign -V`. The formats
(https://jedisct1.github.io/minisign/), all base64 after a comment line:

    public key   "Ed" | key id (8) | public key (32)
    secret key   "Ed" | kdf "\\0\\0" (unencrypted) | "B2" | salt (32) | opslimit (8) |
                 memlimit (8) | key id (8) | secret key (64) | checksum (32)
    signature    "ED" | key id (8) | ed25519(blake2b-512(message)) (64)
                 then "trusted comment: TEXT" and ed25519(signature | TEXT) (64)

Legacy "Ed" signatures (over the message itself) are verified as well. Keys
that minisign encrypted with a password are refused with a message: the
appliance has nobody to type one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from edgellm.errors import InvalidRequest


class SignatureError(InvalidRequest):
    """A key or signature that cannot be used; the message says which file and why."""

    code = "bad_signature"


def key_id_text(key_id: bytes) -> str:
    return key_id[::-1].hex().upper()  # minisign prints the id as a little-endian 64-bit number


@dataclass(frozen=True)
class PublicKey:
    key_id: bytes
    key: bytes
    source: str = ""

    @property
    def id(self) -> str:
        return key_id_text(self.key_id)

    def text(self) -> str:
        blob = base64.b64encode(b"Ed" + self.key_id + self.key).decode()
        return f"untrusted comment: minisign public key {self.id}\n{blob}\n"


@dataclass(frozen=True)
class SecretKey:
    key_id: bytes
    seed: bytes  # the 32-byte ed25519 seed
    public: bytes

    def text(self) -> str:
        sk = self.seed + self.public
        checksum = hashlib.blake2b(b"Ed" + self.key_id + sk, digest_size=32).digest()
        blob = b"Ed" + b"\0\0" + b"B2" + bytes(32) + bytes(16) + self.key_id + sk + checksum
        return f"untrusted comment: minisign secret key (unencrypted, made by edgellm keygen)\n" \
               f"{base64.b64encode(blob).decode()}\n"

    def public_key(self) -> PublicKey:
        return PublicKey(self.key_id, self.public)

    def sign(self, message: bytes, trusted_comment: str) -> str:
        """A .minisig file's text for `message`."""
        if "\n" in trusted_comment or "\r" in trusted_comment:
            raise ValueError("a trusted comment is one line")
        private = Ed25519PrivateKey.from_private_bytes(self.seed)
        signature = private.sign(hashlib.blake2b(message, digest_size=64).digest())
        global_signature = private.sign(signature + trusted_comment.encode())
        return (f"untrusted comment: signature from edgellm secret key {key_id_text(self.key_id)}\n"
                f"{base64.b64encode(b'ED' + self.key_id + signature).decode()}\n"
                f"trusted comment: {trusted_comment}\n"
                f"{base64.b64encode(global_signature).decode()}\n")


def generate() -> SecretKey:
    private = Ed25519PrivateKey.generate()
    seed = private.private_bytes_raw()
    public = private.public_key().public_bytes_raw()
    return SecretKey(os.urandom(8), seed, public)


def _lines(text: str) -> list[str]:
    """minisign's lines end in \n (or \r\n); other line breaks belong to the text."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _payload(text: str, source: str, what: str) -> bytes:
    lines = _lines(text)
    if len(lines) < 2 or not lines[0].startswith("untrusted comment:"):
        raise SignatureError(f"{source}: not a minisign {what} (it must start with 'untrusted comment:')")
    try:
        return base64.b64decode(lines[1].strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{source}: not a minisign {what} (bad base64)") from None


def _read_key(path: str | Path, what: str) -> bytes:
    """The decoded payload of a minisign key file."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SignatureError(f"{path}: cannot read the {what} ({getattr(e, 'strerror', None) or e})") from None
    return _payload(text, str(path), what)


def read_public_key(path: str | Path) -> PublicKey:
    source = str(path)
    blob = _read_key(path, "public key")
    if len(blob) != 42 or blob[:2] != b"Ed":
        raise SignatureError(f"{source}: not an ed25519 minisign public key")
    return PublicKey(blob[2:10], blob[10:], source)


def read_secret_key(path: str | Path) -> SecretKey:
    source = str(path)
    blob = _read_key(path, "secret key")
    if len(blob) != 158 or blob[:2] != b"Ed" or blob[4:6] != b"B2":
        raise SignatureError(f"{source}: not an ed25519 minisign secret key")
    if blob[2:4] != b"\0\0":
        raise SignatureError(f"{source}: the key is protected by a password; make one without "
                             "(`edgellm keygen`, or `minisign -G -W`)")
    key_id, sk = blob[54:62], blob[62:126]
    return SecretKey(key_id, sk[:32], sk[32:])


@dataclass(frozen=True)
class Signature:
    algorithm: bytes  # b"ED" (prehashed) or b"Ed" (legacy)
    key_id: bytes
    signature: bytes
    trusted_comment: str
    global_signature: bytes


def parse_signature(text: str, source: str) -> Signature:
    lines = _lines(text)
    blob = _payload(text, source, "signature")
    if len(blob) != 74 or blob[:2] not in (b"ED", b"Ed"):
        raise SignatureError(f"{source}: not an ed25519 minisign signature")
    if len(lines) < 4 or not lines[2].startswith("trusted comment: "):
        raise SignatureError(f"{source}: the trusted comment is missing")
    try:
        global_signature = base64.b64decode(lines[3].strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{source}: bad base64 in the trusted comment's signature") from None
    return Signature(blob[:2], blob[2:10], blob[10:], lines[2][len("trusted comment: "):], global_signature)


def verify(message: bytes, signature_text: str, keys: list[PublicKey], *, source: str) -> tuple[PublicKey, str]:
    """The key that made this signature of `message`, and the trusted comment; or SignatureError."""
    sig = parse_signature(signature_text, source)
    key = next((k for k in keys if k.key_id == sig.key_id), None)
    if key is None:
        raise SignatureError(f"{source}: signed by key {key_id_text(sig.key_id)}, which is not trusted here "
                             f"(trusted: {', '.join(k.id for k in keys) or 'none'})")
    public = Ed25519PublicKey.from_public_bytes(key.key)
    signed = hashlib.blake2b(message, digest_size=64).digest() if sig.algorithm == b"ED" else message
    try:
        public.verify(sig.signature, signed)
    except InvalidSignature:
        raise SignatureError(f"{source}: bad signature: the manifest was changed after it was signed "
                             f"(or signed by another key with the same id)") from None
    try:
        public.verify(sig.global_signature, sig.signature + sig.trusted_comment.encode())
    except InvalidSignature:
        raise SignatureError(f"{source}: bad signature on the trusted comment: it was changed") from None
    return key, sig.trusted_comment


UPDATE_KEY = ".update.pub"  # a key that signs software updates (docs/update-format.md), never models


def trusted_keys(directory: str | Path, *, updates: bool = False, model_keys: bool = False) -> \
        tuple[list[PublicKey], list[str]]:
    """Every key among the *.pub in the trusted-keys directory (none if it does not exist), and
    for each file that is not one, why: it is skipped, so that one damaged file does not stop
    the imports signed by the other keys. The callers show the reasons as warnings.

    A key's usage is in its file's name: NAME.update.pub signs software updates and nothing
    else, any other NAME.pub signs model bundles. With `updates`, the update keys are returned,
    and with `model_keys` as well the model keys ([update] model_keys = true): a key that only
    ever signed models cannot put code on the box unless the operator said so.

    Different keys that claim the same key id are all skipped: an id is any 8 bytes its key's
    maker chose, and installed models are pinned to the id of the key that signed them, so an
    id must name one key only."""
    directory = Path(directory)
    by_id: dict[bytes, list[PublicKey]] = {}
    skipped = []
    for path in sorted(directory.glob("*.pub")) if directory.is_dir() else []:
        if path.name.endswith(UPDATE_KEY) != updates and not (updates and model_keys):
            continue
        try:
            key = read_public_key(path)
        except SignatureError as e:
            skipped.append(f"{e}; skipped (the other trusted keys are used)")
            continue
        by_id.setdefault(key.key_id, []).append(key)
    keys = []
    for same in by_id.values():
        if len({k.key for k in same}) > 1:
            skipped.append(f"{', '.join(k.source for k in same)}: different keys with the same key id {same[0].id}; "
                           "all skipped (the other trusted keys are used)")
        else:
            keys.append(same[0])
    return keys, skipped
