"""Checkpoints: safetensors weights, signed manifests, the model topic, the trainer's state.

* :mod:`.codec` — tensors <-> safetensors bytes (never pickle);
* :mod:`.signing` — Ed25519 keys, signing and verifying manifests;
* :mod:`.publish` — chunks then signed manifest onto the model topic;
* :mod:`.reader` — the newest (or a named) checkpoint, verified, read from the end;
* :mod:`.state` — the trainer's atomic snapshot store (directory or Redis);
* :mod:`.errors` — :class:`CheckpointError` and its subclasses.
"""

from .codec import decode_tensors, encode_tensors, sha256_hex
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    DigestError,
    IncompleteCheckpointError,
    SignatureError,
)
from .publish import DEFAULT_CHUNK_BYTES, publish_checkpoint, weights_info
from .reader import LoadedCheckpoint, make_reader_consumer, read_latest, read_version
from .signing import (
    canonical_bytes,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    sign_manifest,
    verify_manifest,
)
from .state import DirectoryStateStore, RedisStateStore, Snapshot, StateStore

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "CheckpointError",
    "CheckpointNotFoundError",
    "DigestError",
    "DirectoryStateStore",
    "IncompleteCheckpointError",
    "LoadedCheckpoint",
    "RedisStateStore",
    "SignatureError",
    "Snapshot",
    "StateStore",
    "canonical_bytes",
    "decode_tensors",
    "encode_tensors",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "make_reader_consumer",
    "publish_checkpoint",
    "read_latest",
    "read_version",
    "sha256_hex",
    "sign_manifest",
    "verify_manifest",
    "weights_info",
]
