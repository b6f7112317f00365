"""Checkpoints: safetensors weights, signed manifests, the model topic, the trainer's state.

* :mod:`.codec` — tensors <-> safetensors bytes (never pickle); :mod:`.digest` — their SHA-256;
* :mod:`.signing` — Ed25519 keys, signing and verifying manifests and registry records;
* :mod:`.publish` — chunks then signed manifest onto the model topic;
* :mod:`.reader` — the newest (or a named) checkpoint, verified, read from the end: the reading API;
  :mod:`.fetch` — reading the topic's records by offset and backwards; :mod:`.verify` — trusting a
  manifest record; :mod:`.assemble` — its chunks checked and joined into weights;
* :mod:`.scan` — where a serving node starts: a verified, bounded, resumable backward scan;
* :mod:`.registry` — signed registry records (aliases, a fleet-wide pin) and their search;
* :mod:`.catalog` — ``stream-learner models``: what the topic holds, the registry changes;
* :mod:`.state` — the trainer's atomic snapshot store (directory or Redis);
* :mod:`.errors` — :class:`CheckpointError` and its subclasses.
"""

from importlib import import_module
from typing import Any

# Names are imported from their module on first use: ``signing`` and ``publish`` must not pull
# in torch (through ``codec``) for the CLI verbs that only handle keys and manifests.
_WHERE = {
    "decode_tensors": "codec",
    "encode_tensors": "codec",
    "sha256_hex": "digest",
    "CheckpointError": "errors",
    "CheckpointNotFoundError": "errors",
    "DigestError": "errors",
    "IncompleteCheckpointError": "errors",
    "SignatureError": "errors",
    "DEFAULT_CHUNK_BYTES": "publish",
    "publish_checkpoint": "publish",
    "weights_info": "publish",
    "LoadedCheckpoint": "reader",
    "make_reader_consumer": "reader",
    "read_latest": "reader",
    "read_version": "reader",
    "canonical_bytes": "signing",
    "generate_keypair": "signing",
    "key_id": "signing",
    "load_private_key": "signing",
    "load_public_key": "signing",
    "sign_manifest": "signing",
    "verify_manifest": "signing",
    "DirectoryStateStore": "state",
    "RedisStateStore": "state",
    "RetryingStateStore": "state",
    "Snapshot": "state",
    "StateStore": "state",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "CheckpointError",
    "CheckpointNotFoundError",
    "DigestError",
    "DirectoryStateStore",
    "IncompleteCheckpointError",
    "LoadedCheckpoint",
    "RedisStateStore",
    "RetryingStateStore",
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
