"""Ed25519 manifest signatures: what verifies, and every way one must not."""

from __future__ import annotations

import base64
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from stream_learner import events
from stream_learner.checkpoint import (
    SignatureError,
    canonical_bytes,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    sign_manifest,
    verify_manifest,
)
from stream_learner.errors import EventError
from stream_learner.events import Signature

from .conftest import manifest_for


@pytest.fixture
def signed(keypair):
    private, _ = keypair
    manifest = manifest_for(b"weights" * 10, version=3)
    weights = msgspec.structs.replace(manifest.weights, chunk_offsets=[12, 13])
    return sign_manifest(msgspec.structs.replace(manifest, weights=weights), private)


def test_round_trip_through_the_wire(keypair, signed) -> None:
    _, public = keypair
    verify_manifest(signed, public)
    wire = events.encode(signed)
    decoded = events.MANIFEST.decode(wire)
    assert decoded == signed
    verify_manifest(decoded, public)
    assert signed.signature.alg == "ed25519" and signed.signature.key_id == key_id(public)
    assert len(base64.b64decode(signed.signature.value)) == 64


def test_canonical_bytes_are_deterministic_and_exclude_the_signature(signed) -> None:
    reordered = msgspec.structs.replace(signed, counts=dict(reversed(list(signed.counts.items()))), signature=None)
    assert canonical_bytes(reordered) == canonical_bytes(signed)
    text = canonical_bytes(signed)
    assert b'"signature":null' in text and signed.signature.value.encode() not in text
    assert text.index(b'"architecture"') < text.index(b'"weights"')  # keys sorted
    assert b'"labeled":30,"pseudo":3' in text and b'"drifts":0,"n":3' in text  # nested dicts too


def test_types_are_normalised_so_python_built_manifests_verify_after_decoding(keypair) -> None:
    private, public = keypair
    # An int metric is encoded "1" but decodes as the float 1.0: the signature must not care.
    signed = sign_manifest(manifest_for(b"w", metrics={"accuracy": 1}), private)
    verify_manifest(events.MANIFEST.decode(events.encode(signed)), public)


def _mutations(data: bytes):
    """Every single-byte change of a digit or letter into another of its kind."""
    for i, b in enumerate(data):
        c = chr(b)
        if c.isdigit():
            yield i, str((int(c) + 1) % 10).encode()
        elif c.isascii() and c.isalpha():
            base = ord("a") if c.islower() else ord("A")
            yield i, bytes([base + (b - base + 1) % 26])


def test_tampering_with_any_byte_of_any_field_is_detected(keypair, signed) -> None:
    _, public = keypair
    wire = events.encode(signed)
    detected = refused_by_decoder = 0
    for i, replacement in _mutations(wire):
        tampered = wire[:i] + replacement + wire[i + 1 :]
        try:
            manifest = events.MANIFEST.decode(tampered)
        except EventError:
            refused_by_decoder += 1  # e.g. a field name changed: not a manifest any more
            continue
        if manifest == signed:
            # Only an ignored unknown key changed (e.g. "chunk_offsets" renamed
            # while empty): the signed content is the same, and still verifies.
            verify_manifest(manifest, public)
            continue
        with pytest.raises(SignatureError):
            verify_manifest(manifest, public)
        detected += 1
    # The test has teeth: most mutations give a valid manifest that only the signature catches.
    assert detected > 300 and detected > refused_by_decoder, (detected, refused_by_decoder)


@pytest.mark.parametrize(
    "field, value",
    [
        ("version", 4),
        ("parent", None),
        ("created_at", 1),
        ("counts", {"labeled": 31, "pseudo": 3}),
        ("metrics", {"accuracy": 0.91, "log_loss": 0.25}),
        ("feature_spec", ["tenure_months", "age"]),
        ("drift_state", {}),
        ("architecture", {"kind": "mlp", "hidden": [1025]}),
        ("input_offsets", []),
    ],
)
def test_changing_any_field_breaks_the_signature(keypair, signed, field, value) -> None:
    with pytest.raises(SignatureError, match="does not verify"):
        verify_manifest(msgspec.structs.replace(signed, **{field: value}), keypair[1])


def test_changing_the_weights_digest_or_offsets_breaks_the_signature(keypair, signed) -> None:
    for change in ({"sha256": "0" * 64}, {"chunk_offsets": [7]}, {"size": 1}):
        tampered = msgspec.structs.replace(signed, weights=msgspec.structs.replace(signed.weights, **change))
        with pytest.raises(SignatureError, match="does not verify"):
            verify_manifest(tampered, keypair[1])


def test_wrong_key_missing_signature_and_bad_values(keypair, other_keypair, signed) -> None:
    _, public = keypair
    other_private, other_public = other_keypair
    with pytest.raises(SignatureError, match="trusted keys"):
        verify_manifest(signed, other_public)
    forged = sign_manifest(signed, other_private)  # re-signed by someone else
    with pytest.raises(SignatureError, match="trusted keys"):
        verify_manifest(forged, public)
    # ... even if the forger claims the trusted key's id.
    claimed_sig = msgspec.structs.replace(forged.signature, key_id=key_id(public))
    claimed = msgspec.structs.replace(forged, signature=claimed_sig)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_manifest(claimed, public)
    with pytest.raises(SignatureError, match="not signed"):
        verify_manifest(msgspec.structs.replace(signed, signature=None), public)
    for value in ("!!!not-base64", base64.b64encode(b"short").decode()):
        bad = msgspec.structs.replace(signed, signature=Signature(alg="ed25519", key_id=key_id(public), value=value))
        with pytest.raises(SignatureError):
            verify_manifest(bad, public)


def test_several_trusted_keys_for_rotation(keypair, other_keypair, signed) -> None:
    verify_manifest(signed, [other_keypair[1], keypair[1]])
    with pytest.raises(SignatureError):
        verify_manifest(signed, [])


def test_keys_load_from_pem_bytes_text_and_files(tmp_path: Path) -> None:
    private_pem, public_pem = generate_keypair()
    (tmp_path / "k.pem").write_bytes(private_pem)
    (tmp_path / "k.pub").write_bytes(public_pem)
    privates = [
        load_private_key(private_pem),
        load_private_key(private_pem.decode()),
        load_private_key(tmp_path / "k.pem"),
        load_private_key(str(tmp_path / "k.pem")),
    ]
    publics = [load_public_key(public_pem), load_public_key(tmp_path / "k.pub")]
    ids = {key_id(k) for k in privates + publics}
    assert len(ids) == 1 and len(ids.pop()) == 16
    assert b"PRIVATE KEY" in private_pem and b"PRIVATE" not in public_pem


def test_wrong_keys_are_refused(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_pem = ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(SignatureError, match="Ed25519"):
        load_private_key(ec_pem)
    with pytest.raises(SignatureError, match="Ed25519"):
        load_public_key(
            ec_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    with pytest.raises(SignatureError, match="cannot read key file"):
        load_public_key(tmp_path / "missing.pem")
    with pytest.raises(SignatureError, match="not a PEM public key"):
        load_public_key(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")


def test_an_invalid_manifest_cannot_be_signed(keypair) -> None:
    with pytest.raises(SignatureError, match="not a valid manifest"):
        sign_manifest(manifest_for(b"w", version=0), keypair[0])
