"""Ed25519 signatures over checkpoint manifests.

The trainer holds the private key and signs every manifest it publishes;
serving nodes hold only public keys and verify before they load anything.
The manifest carries the SHA-256 of its weights, so one signature covers the
weights too.

**What is signed** (:func:`canonical_bytes`): the manifest with
``signature`` set to ``null``, validated as ``manifest.v1`` and encoded as
compact JSON with every object's keys sorted (``msgspec`` with
``order="sorted"``). Validation first normalises types (a metric given as
``1`` is the float ``1.0``), so the signer and a verifier that decoded the
manifest from the wire encode the same bytes. A verifier in another language
must reproduce this encoding; floats are written in their shortest
round-trip form.

A verifier checks only the fields it knows: a manifest with fields added by
a newer writer does not verify on an older reader (it fails closed), so
adding a manifest field needs a new schema version, or readers that know it
first. An optional field added later (``variant``, ``layout``) is left out of the signed
bytes while it is ``null``, so manifests without it sign exactly as they did
before it existed, and older readers verify them.

>>> from stream_learner.events import CheckpointManifest, WeightsInfo
>>> private_pem, public_pem = generate_keypair()
>>> signer, verifier = load_private_key(private_pem), load_public_key(public_pem)
>>> manifest = CheckpointManifest(
...     model="churn", version=1, parent=None, created_at=0, input_offsets=[], counts={},
...     metrics={}, drift_state={}, feature_spec=["age"], architecture={},
...     weights=WeightsInfo(format="safetensors", size=1, chunks=1, sha256="0" * 64))
>>> signed = sign_manifest(manifest, signer)
>>> signed.signature.key_id == key_id(verifier)
True
>>> verify_manifest(signed, verifier)
>>> import msgspec
>>> verify_manifest(msgspec.structs.replace(signed, version=2), verifier)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
stream_learner.checkpoint.errors.SignatureError: manifest churn v2: signature does not verify with key ...
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..events import CheckpointManifest, Signature
from .errors import SignatureError

ALG: Literal["ed25519"] = "ed25519"

_canonical = msgspec.json.Encoder(order="sorted")
#: Optional fields added to manifest.v1 after it was first signed, in the order they came.
_LATER_FIELDS = ("variant", "layout")
_plain = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(CheckpointManifest)

KeySource = bytes | str | os.PathLike[str]


def generate_keypair() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as ``(private PKCS#8 PEM, public SubjectPublicKeyInfo PEM)``.

    The private PEM is unencrypted: store it like any secret (file mode
    0600, a secret manager). Give serving nodes only the public PEM.
    """
    private = Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem


def _pem(path_or_pem: KeySource) -> bytes:
    # PEM text is recognised by its armour; anything else is a file path.
    if isinstance(path_or_pem, bytes) and path_or_pem.lstrip().startswith(b"-----BEGIN"):
        return path_or_pem
    if isinstance(path_or_pem, str) and path_or_pem.lstrip().startswith("-----BEGIN"):
        return path_or_pem.encode()
    path = Path(os.fsdecode(path_or_pem))
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SignatureError(f"cannot read key file {path}: {exc.strerror or exc}") from None


def load_private_key(path_or_pem: KeySource, password: bytes | None = None) -> Ed25519PrivateKey:
    """The trainer's signing key, from PEM bytes/text or a PEM file path.

    Raises :class:`SignatureError` if it is unreadable or not Ed25519.
    """
    try:
        key = serialization.load_pem_private_key(_pem(path_or_pem), password=password)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"checkpoint signing needs an Ed25519 key, got {type(key).__name__}")
    return key


def load_public_key(path_or_pem: KeySource) -> Ed25519PublicKey:
    """A verification key, from PEM bytes/text or a PEM file path.

    Raises :class:`SignatureError` if it is unreadable or not Ed25519.
    """
    try:
        key = serialization.load_pem_public_key(_pem(path_or_pem))
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"checkpoint verification needs an Ed25519 key, got {type(key).__name__}")
    return key


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """A short id of a key pair: the first 16 hex digits of SHA-256 of the raw public key.

    Given a private key, the id of its public half (the same id).
    """
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def canonical_bytes(manifest: CheckpointManifest) -> bytes:
    """The bytes a manifest's signature covers (see the module docstring).

    Raises :class:`SignatureError` naming the problem if the manifest is not
    a valid ``manifest.v1``: such a manifest can be neither signed nor trusted.
    """
    return signed_bytes(manifest, _decoder, "manifest.v1", optional=_LATER_FIELDS)


def signed_bytes(
    record: msgspec.Struct, decoder: msgspec.json.Decoder[Any], schema: str, *, optional: tuple[str, ...] = ()
) -> bytes:
    """The bytes the signature of any signed record (a manifest, a registry record) covers.

    ``record`` is a struct with a ``signature`` field; it is encoded without
    its signature, decoded back with ``decoder`` (which validates and
    normalises it as ``schema``) and encoded compactly with sorted keys. The
    ``optional`` fields are left out while they are ``null`` (fields added
    after the schema was first signed). One mechanism for every record a
    trainer's key signs: the record's own schema keeps one kind of record
    from passing for another (a registry record does not decode as a
    manifest).
    """
    unsigned = msgspec.structs.replace(record, signature=None)
    try:
        # A JSON round trip validates and normalises types (int -> float for
        # float fields), so this is the same for a struct built in Python and
        # one decoded from the wire.
        normalised = decoder.decode(_plain.encode(unsigned))
    except (msgspec.ValidationError, msgspec.EncodeError) as exc:
        raise SignatureError(f"{schema.split('.')[0]} is not a valid {schema}: {exc}") from None
    absent = [name for name in optional if getattr(normalised, name) is None]
    if absent:
        # Fields added after the schema was first signed are signed only when set (see the module
        # docstring): the bytes of a record without them are those older writers signed.
        fields = msgspec.to_builtins(normalised)
        for name in absent:
            del fields[name]
        return _canonical.encode(fields)
    return _canonical.encode(normalised)


S = TypeVar("S", bound=msgspec.Struct)


def sign_record(record: S, message: bytes, decoder: msgspec.json.Decoder[S], private_key: Ed25519PrivateKey) -> S:
    """``record`` normalised from ``message`` (its :func:`signed_bytes`) and signed by ``private_key``."""
    normalised = decoder.decode(message)
    value = base64.b64encode(private_key.sign(message)).decode("ascii")
    return msgspec.structs.replace(normalised, signature=Signature(alg=ALG, key_id=key_id(private_key), value=value))


def sign_manifest(manifest: CheckpointManifest, private_key: Ed25519PrivateKey) -> CheckpointManifest:
    """A copy of ``manifest`` carrying an Ed25519 signature by ``private_key``.

    Any previous signature is replaced. Fields are normalised exactly as
    :func:`canonical_bytes` does, so the returned manifest, once encoded and
    decoded anywhere, still verifies.
    """
    return sign_record(manifest, canonical_bytes(manifest), _decoder, private_key)


def verify_signature(
    what: str,
    signature: Signature | None,
    message: Callable[[], bytes],
    public_key: Ed25519PublicKey | Iterable[Ed25519PublicKey],
) -> None:
    """Check that a trusted key signed ``message()``, or raise :class:`SignatureError` naming ``what``.

    ``public_key`` may be several keys (during a key rotation); the one whose
    :func:`key_id` the signature names is used. Raises for a missing
    signature, an unknown algorithm, a key id no trusted key has, a malformed
    signature value, or a signature that does not verify.
    """
    keys = [public_key] if isinstance(public_key, Ed25519PublicKey) else list(public_key)
    sig = signature
    if sig is None:
        raise SignatureError(f"{what} is not signed")
    if sig.alg != ALG:
        raise SignatureError(f"{what}: signature algorithm {sig.alg!r}, expected {ALG!r}")
    trusted = {key_id(k): k for k in keys}
    key = trusted.get(sig.key_id)
    if key is None:
        raise SignatureError(f"{what}: signed by key {sig.key_id!r}, trusted keys are {sorted(trusted)}")
    try:
        raw = base64.b64decode(sig.value, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{what}: signature value is not base64") from None
    # Base64 has spare bits before the padding; accept only the canonical
    # spelling, so no two different records carry the same signature.
    if base64.b64encode(raw).decode("ascii") != sig.value:
        raise SignatureError(f"{what}: signature value is not canonical base64")
    try:
        key.verify(raw, message())
    except InvalidSignature:
        raise SignatureError(f"{what}: signature does not verify with key {sig.key_id!r}") from None


def verify_manifest(manifest: CheckpointManifest, public_key: Ed25519PublicKey | Iterable[Ed25519PublicKey]) -> None:
    """Check that a trusted key signed exactly this manifest, or raise :class:`SignatureError`.

    See :func:`verify_signature` for the keys and what is refused.
    """
    verify_signature(
        f"manifest {manifest.model} v{manifest.version}",
        manifest.signature,
        lambda: canonical_bytes(manifest),
        public_key,
    )
