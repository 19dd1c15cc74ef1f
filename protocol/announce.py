"""Bundle announcements: what a fleet's operator tells devices and workers to run, signed.

An announcement names one bundle by everything a receiver needs to fetch it and to trust what
it fetched: the bundle id, the ``.tar.gz``'s size and sha256, the sha256 of every file inside
it (``manifest.json`` too), how the archive is cut into chunks and each chunk's sha256, and
optionally a URL to fetch it from instead of the chunk topics.  It also names the bundle it
replaces (``previous``), so ``edgesplit fleet rollback`` can announce that one again.

On the wire (JSON, retained on ``edgesplit/v1/<fleet>/announce`` or a device's ``announce``)::

    {"v": 1, "key_id": "<16 hex>", "signature": "<base64>", "body": "<the announcement as JSON text>"}

``signature`` is Ed25519 over ``b"edgesplit announcement v1\\n" + body`` (UTF-8) with the fleet's
signing key, which ``edgesplit broker config`` makes (``fleet/fleet.key``; devices and workers get
``fleet.pub``).  The body is signed as the exact text sent, so no canonical JSON is needed.
``seq`` grows with every announcement of a fleet: a receiver acts on an announcement only if its
seq is above the last one it acted on, so an old announcement replayed cannot take a fleet back.

Ed25519 comes from the ``cryptography`` package, imported only when a key is used: a device
needs it to take updates (Raspberry Pi OS ships it as ``python3-cryptography``; docs/fleet.md).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import math
import os
from pathlib import Path
from typing import Annotated, Literal, Optional

import msgspec

from protocol.errors import UpdateError, UpdateReason, UsageError

__all__ = ["BundleRef", "Announcement", "SigningKey", "VerifyKey", "bundle_ref", "encode", "decode",
           "generate_keys", "load_signing_key", "load_verify_key", "MAX_BUNDLE_BYTES", "MAX_CHUNKS",
           "DEFAULT_CHUNK_SIZE", "PRIVATE_NAME", "PUBLIC_NAME"]

VERSION = 1
DOMAIN = b"edgesplit announcement v1\n"
PRIVATE_NAME = "fleet.key"
PUBLIC_NAME = "fleet.pub"
DEFAULT_CHUNK_SIZE = 64 * 1024
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 1 << 20
MAX_BUNDLE_BYTES = 1 << 30
MAX_CHUNKS = 16384
MAX_PAYLOAD_BYTES = 2 << 20          # an announcement of MAX_CHUNKS chunks is about 1.1 MB

_Hex16 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{16}$")]
_Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
_FileName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")]
_Id = Annotated[str, msgspec.Meta(pattern=r"^[^\s+#/:\x00]{1,64}$")]
_Dim = Annotated[int, msgspec.Meta(ge=1, le=1 << 24)]


class BundleRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One bundle as an announcement names it: enough to fetch it and check every byte."""

    bundle_id: _Hex16
    model: str
    cut: str
    input_shape: tuple[_Dim, ...]
    size: Annotated[int, msgspec.Meta(ge=1, le=MAX_BUNDLE_BYTES)]       # bytes of the .tar.gz
    sha256: _Sha256                                                     # of the .tar.gz
    files: dict[_FileName, _Sha256]                                     # every file in it, manifest.json too
    chunk_size: Annotated[int, msgspec.Meta(ge=MIN_CHUNK_SIZE, le=MAX_CHUNK_SIZE)]
    chunks: Annotated[list[_Sha256], msgspec.Meta(max_length=MAX_CHUNKS)]
    url: Optional[str] = None                                           # fetch from here instead of chunks

    def __post_init__(self):
        if len(self.chunks) != math.ceil(self.size / self.chunk_size):
            raise ValueError(f"{len(self.chunks)} chunk hashes for {self.size} bytes in chunks of {self.chunk_size}")
        if self.url is not None and not self.url.startswith(("http://", "https://", "file://")):
            raise ValueError(f"url {self.url[:60]!r} is not http(s):// or file://")

    def chunk_length(self, index: int) -> int:
        """Bytes of chunk ``index`` (the last one is shorter)."""
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def describe(self) -> str:
        return f"{self.bundle_id} ({self.model} cut at {self.cut}, {self.size:,} B)"


class Announcement(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Run bundle ``bundle_id`` (in ``fleet``; only on ``devices`` when it names some).

    ``bundle`` says how to fetch it; a rollback to a bundle the devices keep may go without
    (the bundle a fleet started with, which was never announced).
    """

    fleet: _Id
    seq: Annotated[int, msgspec.Meta(ge=1)]            # grows with every announcement of the fleet
    issued_us: Annotated[int, msgspec.Meta(ge=0)]
    action: Literal["install", "rollback"]
    bundle_id: _Hex16
    bundle: Optional[BundleRef] = None
    previous_id: str = ""                               # what it replaces (a rollback announces it again)
    previous: Optional[BundleRef] = None
    devices: Optional[list[_Id]] = None                 # None: every device of the fleet
    rollout: str = ""                                    # an id shared by a rollout's announcements
    v: int = VERSION

    def __post_init__(self):
        if self.bundle is not None and self.bundle.bundle_id != self.bundle_id:
            raise ValueError(f"bundle_id {self.bundle_id} but the reference is of {self.bundle.bundle_id}")
        if self.bundle is None and self.action == "install":
            raise ValueError("an install announcement must say how to fetch the bundle")

    def addresses(self, device_id: str) -> bool:
        return self.devices is None or device_id in self.devices


class _Envelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    v: int
    key_id: str
    signature: str
    body: str


_envelope_decoder = msgspec.json.Decoder(_Envelope)
_body_decoder = msgspec.json.Decoder(Announcement)
_encoder = msgspec.json.Encoder()


# --------------------------------------------------------------------------- keys

def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise UsageError("bundle announcements are signed with Ed25519, which needs the 'cryptography' package",
                         fix="on Raspberry Pi OS: sudo apt-get install python3-cryptography; "
                             "elsewhere: pip install cryptography") from None
    return ed25519, serialization, InvalidSignature


def key_id(public_raw: bytes) -> str:
    """A public key's short name: the first 16 hex characters of the sha256 of its 32 raw bytes."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


class VerifyKey:
    """A fleet's public key: checks announcement signatures."""

    def __init__(self, key):
        _, serialization, _ = _crypto()
        self._key = key
        self.raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = key_id(self.raw)

    def verify(self, signature: bytes, body: bytes) -> bool:
        _, _, invalid = _crypto()
        try:
            self._key.verify(signature, DOMAIN + body)
            return True
        except invalid:
            return False

    def pem(self) -> bytes:
        _, serialization, _ = _crypto()
        return self._key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class SigningKey:
    """A fleet's private key (the operator's): signs announcements."""

    def __init__(self, key):
        self._key = key
        self.public = VerifyKey(key.public_key())
        self.key_id = self.public.key_id

    def sign(self, body: bytes) -> bytes:
        return self._key.sign(DOMAIN + body)


def generate_keys(directory: str | os.PathLike, *, keep: bool = True) -> tuple[Path, Path, bool]:
    """``directory/fleet.key`` (private, 0600) and ``fleet.pub``; kept when they exist and ``keep``.

    Returns (private path, public path, made anew?).
    """
    ed25519, serialization, _ = _crypto()
    d = Path(directory)
    priv, pub = d / PRIVATE_NAME, d / PUBLIC_NAME
    if keep and priv.is_file():
        key = load_signing_key(priv)
        if not pub.is_file() or load_verify_key(pub).key_id != key.key_id:
            _write(pub, key.public.pem(), 0o644)
        return priv, pub, False
    d.mkdir(parents=True, exist_ok=True)
    raw = ed25519.Ed25519PrivateKey.generate()
    _write(priv, raw.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()), 0o600)
    _write(pub, SigningKey(raw).public.pem(), 0o644)
    return priv, pub, True


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _read_pem(path, what: str) -> bytes:
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"the fleet {what} {p} does not exist",
                         fix="`edgesplit broker config --out DIR` writes DIR/fleet/fleet.key and gives every device "
                             "and cloud user fleet.pub") from None
    except OSError as exc:
        raise UsageError(f"cannot read the fleet {what} {p}: {exc}", fix="check the file and its permissions") from None


def load_signing_key(path: str | os.PathLike) -> SigningKey:
    """The operator's Ed25519 private key (PEM, PKCS8, unencrypted)."""
    ed25519, serialization, _ = _crypto()
    data = _read_pem(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{path} is not an unencrypted PEM private key ({exc})",
                         fix="give the fleet.key `edgesplit broker config` wrote") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise UsageError(f"{path} holds a {type(key).__name__}, not an Ed25519 key",
                         fix="give the fleet.key `edgesplit broker config` wrote")
    return SigningKey(key)


def load_verify_key(path: str | os.PathLike) -> VerifyKey:
    """A fleet's Ed25519 public key (PEM)."""
    ed25519, serialization, _ = _crypto()
    data = _read_pem(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{path} is not a PEM public key ({exc})",
                         fix="give the fleet.pub `edgesplit broker config` wrote") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise UsageError(f"{path} holds a {type(key).__name__}, not an Ed25519 key",
                         fix="give the fleet.pub `edgesplit broker config` wrote")
    return VerifyKey(key)


# --------------------------------------------------------------------------- references and messages

def sha256_chunks(path: str | os.PathLike, chunk_size: int) -> tuple[str, list[str], int]:
    """(sha256 of the file, sha256 of each chunk, size)."""
    whole = hashlib.sha256()
    chunks, size = [], 0
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            whole.update(block)
            chunks.append(hashlib.sha256(block).hexdigest())
            size += len(block)
    return whole.hexdigest(), chunks, size


def bundle_ref(bundle, tarball: str | os.PathLike, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
               url: str | None = None) -> BundleRef:
    """The reference of a loaded (verified) ``protocol.manifest.Bundle`` whose archive is ``tarball``."""
    from protocol.manifest import MANIFEST_NAME, sha256_file

    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise UsageError(f"chunk size {chunk_size} is outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes",
                         fix=f"use e.g. {DEFAULT_CHUNK_SIZE}")
    whole, chunks, size = sha256_chunks(tarball, chunk_size)
    m = bundle.manifest
    files = {MANIFEST_NAME: sha256_file(bundle.root / MANIFEST_NAME), **m.files}
    try:
        return BundleRef(bundle_id=m.bundle_id, model=m.model, cut=m.cut, input_shape=tuple(m.input.shape),
                         size=size, sha256=whole, files=files, chunk_size=chunk_size, chunks=chunks, url=url)
    except (ValueError, msgspec.ValidationError) as exc:
        raise UsageError(f"cannot announce {tarball}: {exc}",
                         fix=f"bundles up to {MAX_BUNDLE_BYTES >> 20} MiB in at most {MAX_CHUNKS} chunks") from None


def encode(announcement: Announcement, key: SigningKey) -> bytes:
    """The signed message (JSON) for ``announcement``."""
    body = _encoder.encode(announcement)
    sig = base64.b64encode(key.sign(body)).decode("ascii")
    return _encoder.encode(_Envelope(v=VERSION, key_id=key.key_id, signature=sig, body=body.decode("utf-8")))


def _refuse(reason: UpdateReason, message: str, fix: str) -> UpdateError:
    return UpdateError(reason, message, fix=fix)


def decode(payload: bytes, keys: VerifyKey | list[VerifyKey], *, fleet: str | None = None,
           device: str | None = None) -> Announcement:
    """Check and parse an announcement: UpdateError (``bad-announcement``, ``bad-signature``,
    ``not-addressed``) unless it is signed by one of ``keys``, for ``fleet`` and (per device) ``device``."""
    keys = [keys] if isinstance(keys, VerifyKey) else list(keys)
    republish = "publish it again with `edgesplit fleet publish`"
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise _refuse(UpdateReason.TOO_LARGE, f"announcement of {len(payload)} bytes (at most {MAX_PAYLOAD_BYTES})",
                      republish)
    try:
        env = _envelope_decoder.decode(payload)
    except msgspec.MsgspecError as exc:
        raise _refuse(UpdateReason.BAD_ANNOUNCEMENT, f"not a bundle announcement: {exc}", republish) from None
    if env.v != VERSION:
        raise _refuse(UpdateReason.BAD_ANNOUNCEMENT, f"announcement version {env.v}; this edgesplit reads {VERSION}",
                      "run the same edgesplit version on the operator's machine and the fleet")
    key = next((k for k in keys if k.key_id == env.key_id), None)
    if key is None:
        raise _refuse(UpdateReason.BAD_SIGNATURE, f"announcement signed by key {env.key_id[:16]!r}, which is not "
                      f"trusted here (trusted: {', '.join(k.key_id for k in keys) or 'none'})",
                      "sign with the fleet.key whose fleet.pub the devices hold")
    try:
        sig = base64.b64decode(env.signature, validate=True)
    except (binascii.Error, ValueError):
        sig = b""
    body = env.body.encode("utf-8")
    if not key.verify(sig, body):
        raise _refuse(UpdateReason.BAD_SIGNATURE, "the announcement's signature does not verify with the fleet key "
                      f"{key.key_id}: it was altered or signed by another key", republish)
    try:
        ann = _body_decoder.decode(body)
    except (msgspec.MsgspecError, ValueError) as exc:
        raise _refuse(UpdateReason.BAD_ANNOUNCEMENT, f"a signed announcement that does not parse: {exc}",
                      republish) from None
    if fleet is not None and ann.fleet != fleet:
        raise _refuse(UpdateReason.NOT_ADDRESSED, f"announcement for fleet {ann.fleet!r} arrived in fleet {fleet!r}",
                      "publish it on its own fleet's topics")
    if device is not None and not ann.addresses(device):
        raise _refuse(UpdateReason.NOT_ADDRESSED, f"announcement for {', '.join(ann.devices or [])} arrived on "
                      f"the topic of {device!r}", "publish it on the topics of the devices it names")
    return ann
