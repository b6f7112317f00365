"""``stream-learner models``: what the model topic holds, and the registry changes an operator makes.

:func:`catalog` reads the model topic back from its end (bounded by the
start scan's settings) and collects every *verified* manifest (models,
versions, variants) and every verified registry record (the state of each
model's aliases and pin: the highest ``seq``, the first in the log of equal
ones, as a follower applies them). :func:`list_models` and
:func:`show_model` shape it for the operator.

The changes (:func:`set_alias`, :func:`pin`, :func:`unpin`, :func:`rollback`)
each write one signed registry record
(:func:`~stream_learner.checkpoint.registry.write_registry`) after checking
that the version they name is a verified checkpoint on the topic; every
serving node of the model follows it (:mod:`stream_learner.serving.registry`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..bus import TopicPartition, make_producer
from ..config import Settings
from ..events import CheckpointManifest
from .errors import CheckpointError, CheckpointNotFoundError
from .fetch import Overflow, RecordReader, record_bytes, record_header
from .publish import H_TYPE, TYPE_MANIFEST
from .reader import make_reader_consumer, read_version
from .registry import (
    REGISTRY_PARTITION,
    Found,
    RegistryRecord,
    is_registry_record,
    verify_registry_record,
    write_registry,
)
from .scan import ScanLimits
from .verify import verify_record

__all__ = ["Catalog", "catalog", "list_models", "pin", "rollback", "set_alias", "show_model", "unpin"]

#: How long one listing may read the topic, at most (seconds).
READ_TIMEOUT_S = 600.0

#: The alias ``rollback`` moves unless told another.
CHAMPION = "champion"


@dataclass
class Catalog:
    """What a read of the model topic found (see the module docstring)."""

    manifests: dict[str, dict[int, CheckpointManifest]] = field(default_factory=dict)  # lineage -> version -> manifest
    registry: dict[str, list[Found]] = field(default_factory=dict)  # model -> its records, in log order
    refused: int = 0  # records that claimed to be manifests or registry records and did not verify
    complete: bool = True  # False: the bounds stopped the read before the beginning

    def state(self, model: str) -> Found | None:
        """The registry state of ``model``: the highest seq, the first of equal ones (what followers apply)."""
        best: Found | None = None
        for found in self.registry.get(model, []):
            if best is None or found.record.seq > best.record.seq:
                best = found
        return best

    def models(self) -> list[str]:
        """Model names with versions or a registry, variants (``m#x``) left out."""
        names = {lineage for lineage in self.manifests if "#" not in lineage} | set(self.registry)
        return sorted(names)

    def variants(self, model: str) -> dict[str, list[int]]:
        """Variant name -> its versions, for ``model``."""
        out: dict[str, list[int]] = {}
        for lineage, versions in self.manifests.items():
            base, sep, name = lineage.partition("#")
            if sep and base == model:
                out[name] = sorted(versions)
        return out


def catalog(settings: Settings, keys: list[Ed25519PublicKey], *, limits: ScanLimits | None = None) -> Catalog:
    """Read the model topic back from its end, every partition, within ``limits`` (default: the scan's settings)."""
    limits = limits or ScanLimits(
        max_records=settings.serving_scan_max_records, max_bytes=settings.serving_scan_max_bytes
    )
    topic = settings.topic_models
    found = Catalog()
    consumer = make_reader_consumer(settings)
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise CheckpointError(f"topic {topic!r} does not exist or has no partitions")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        begin, end = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
        reader = RecordReader(consumer, topic, time.monotonic() + READ_TIMEOUT_S, offsets=(begin, end))
        records = read_bytes = 0
        by_model: dict[str, list[Found]] = {}
        for tp in tps:
            cursor, size = end[tp], 64
            while cursor > begin[tp]:
                if records >= limits.max_records or read_bytes >= limits.max_bytes:
                    found.complete = False
                    break
                lo = max(begin[tp], cursor - size)
                try:
                    window = reader.read_range(tp, lo, cursor, max_bytes=limits.window_bytes if size > 1 else None)
                except Overflow as over:
                    size = max(1, (over.position - lo) // 2)
                    continue
                records += max(len(window), 1)
                read_bytes += sum(record_bytes(r) for r in window)
                cursor, size = lo, min(size * 2, 8192)
                for record in reversed(window):
                    _visit(found, by_model, topic, record, keys)
        for model, items in by_model.items():
            found.registry[model] = sorted(items, key=lambda f: f.offset)
    finally:
        consumer.close()
    return found


def _visit(
    found: Catalog, by_model: dict[str, list[Found]], topic: str, record: Any, keys: list[Ed25519PublicKey]
) -> None:
    kind = record_header(record, H_TYPE)
    if kind == TYPE_MANIFEST:
        try:
            manifest = verify_record(topic, record, {}, keys).manifest
        except Exception:  # noqa: BLE001 - an operator's listing counts what it cannot trust, and goes on
            found.refused += 1
            return
        found.manifests.setdefault(manifest.model, {}).setdefault(manifest.version, manifest)
    elif is_registry_record(record):
        if record.partition != REGISTRY_PARTITION:
            found.refused += 1
            return
        try:
            registry = verify_registry_record(topic, record, keys)
        except CheckpointError:
            found.refused += 1
            return
        by_model.setdefault(registry.model, []).append(Found(registry, record.offset))


def list_models(found: Catalog) -> dict[str, Any]:
    """``models list``: each model with its versions, aliases, pin and variants."""
    out = []
    for model in found.models():
        versions = sorted(found.manifests.get(model, {}))
        state = found.state(model)
        out.append(
            {
                "model": model,
                "versions": len(versions),
                "oldest": versions[0] if versions else None,
                "newest": versions[-1] if versions else None,
                "aliases": dict(state.record.aliases) if state is not None else {},
                "pin": state.record.pin if state is not None else None,
                "registry_seq": state.record.seq if state is not None else None,
                "variants": {name: vs[-1] for name, vs in found.variants(model).items()},
            }
        )
    return {"models": out, "refused_records": found.refused, "complete": found.complete}


def show_model(found: Catalog, model: str) -> dict[str, Any]:
    """``models show``: one model's versions (with their variants and aliases), aliases, pin, registry history."""
    if model not in found.models():
        raise CheckpointNotFoundError(
            f"no checkpoint or registry record of model {model!r} on the topic; it holds "
            f"{', '.join(repr(m) for m in found.models()) or 'none'}"
        )
    state = found.state(model)
    record = state.record if state is not None else None
    variants = found.variants(model)
    aliases_of: dict[int, list[str]] = {}
    for alias, version in (record.aliases if record is not None else {}).items():
        aliases_of.setdefault(version, []).append(alias)
    versions = []
    for version, manifest in sorted(found.manifests.get(model, {}).items()):
        versions.append(
            {
                "version": version,
                "parent": manifest.parent,
                "created_at": manifest.created_at,
                "metrics": manifest.metrics,
                "counts": manifest.counts,
                "variants": sorted(name for name, vs in variants.items() if version in vs),
                "aliases": sorted(aliases_of.get(version, [])),
                "pinned": record is not None and record.pin == version,
            }
        )
    return {
        "model": model,
        "aliases": dict(record.aliases) if record is not None else {},
        "pin": record.pin if record is not None else None,
        "history": dict(record.history) if record is not None else {},
        "registry_seq": record.seq if record is not None else None,
        "versions": versions,
        "registry_changes": [
            {"seq": f.record.seq, "change": f.record.change, "created_at": f.record.created_at, "offset": f.offset}
            for f in found.registry.get(model, [])
        ],
        "refused_records": found.refused,
        "complete": found.complete,
    }


# -- changes ----------------------------------------------------------------------------------


def _check_version(settings: Settings, key: Ed25519PrivateKey, model: str, version: int) -> None:
    """Refuse to name a version that is not a verified, loadable checkpoint of ``model`` on the topic."""
    read_version(settings, settings.topic_models, key.public_key(), version, model)


def _write(
    settings: Settings,
    key: Ed25519PrivateKey,
    model: str,
    change: Callable[[RegistryRecord | None], tuple[dict[str, int], int | None, dict[str, list[int]], str]],
) -> Found:
    consumer = make_reader_consumer(settings)
    producer = make_producer(settings)
    try:
        return write_registry(
            consumer,
            producer,
            settings.topic_models,
            key,
            model,
            change,
            limits=_limits(settings),
        )
    finally:
        consumer.close()
        producer.close()


def _limits(settings: Settings) -> ScanLimits:
    """The registry search's bounds: the serving start scan's settings."""
    return ScanLimits(max_records=settings.serving_scan_max_records, max_bytes=settings.serving_scan_max_bytes)


def _parts(state: RegistryRecord | None) -> tuple[dict[str, int], int | None, dict[str, list[int]]]:
    if state is None:
        return {}, None, {}
    return dict(state.aliases), state.pin, {a: list(v) for a, v in state.history.items()}


def set_alias(settings: Settings, key: Ed25519PrivateKey, model: str, alias: str, version: int) -> Found:
    """Point ``alias`` of ``model`` at ``version`` (its previous version kept for :func:`rollback`)."""
    _check_version(settings, key, model, version)

    def change(state: RegistryRecord | None) -> tuple[dict[str, int], int | None, dict[str, list[int]], str]:
        aliases, pinned, history = _parts(state)
        old = aliases.get(alias)
        aliases[alias] = version
        if old is not None and old != version:
            history.setdefault(alias, []).append(old)
        return aliases, pinned, history, f"alias {alias} {f'v{old}' if old else 'unset'} -> v{version}"

    return _write(settings, key, model, change)


def pin(settings: Settings, key: Ed25519PrivateKey, model: str, version: int) -> Found:
    """Pin ``model`` to ``version`` on every node that follows it, whatever alias a node follows."""
    _check_version(settings, key, model, version)

    def change(state: RegistryRecord | None) -> tuple[dict[str, int], int | None, dict[str, list[int]], str]:
        aliases, pinned, history = _parts(state)
        return aliases, version, history, f"pin {f'v{pinned}' if pinned else 'none'} -> v{version}"

    return _write(settings, key, model, change)


def unpin(settings: Settings, key: Ed25519PrivateKey, model: str) -> Found:
    """Remove the fleet-wide pin of ``model``: nodes serve their alias (or the newest) again."""

    def change(state: RegistryRecord | None) -> tuple[dict[str, int], int | None, dict[str, list[int]], str]:
        aliases, pinned, history = _parts(state)
        if pinned is None:
            raise CheckpointError(f"model {model!r} is not pinned: nothing to unpin")
        return aliases, None, history, f"unpin v{pinned}"

    return _write(settings, key, model, change)


def rollback(
    settings: Settings, key: Ed25519PrivateKey, model: str, *, alias: str = CHAMPION, to: int | None = None
) -> Found:
    """Move ``alias`` back: to ``to``, else to the version it named before (its history), else to the
    version before the one it names. The version it leaves is not remembered (a second rollback goes
    further back, not forth)."""
    consumer = make_reader_consumer(settings)
    try:
        from .registry import scan_registry

        scan, _ = scan_registry(consumer, settings.topic_models, key.public_key(), model, limits=_limits(settings))
    finally:
        consumer.close()
    state = scan.found.record if scan.found is not None else None
    current = state.aliases.get(alias) if state is not None else None
    if current is None:
        raise CheckpointError(f"alias {alias!r} of model {model!r} is not set: nothing to roll back")
    previous = list(state.history.get(alias, [])) if state is not None else []
    target = to if to is not None else (previous[-1] if previous else current - 1)
    if target < 1 or target == current:
        raise CheckpointError(
            f"alias {alias!r} of model {model!r} names v{current}: no earlier version to roll back to"
        )
    _check_version(settings, key, model, target)

    def change(now: RegistryRecord | None) -> tuple[dict[str, int], int | None, dict[str, list[int]], str]:
        aliases, pinned, history = _parts(now)
        was = aliases.get(alias)
        if was != current:
            raise CheckpointError(
                f"alias {alias!r} of model {model!r} moved meanwhile (v{current} -> v{was}): run again"
            )
        kept = history.get(alias, [])
        # Back through the history to the target: what lay after it is dropped with it.
        history[alias] = kept[: len(kept) - 1 - kept[::-1].index(target)] if target in kept else kept
        aliases[alias] = target
        return aliases, pinned, history, f"rollback {alias} v{current} -> v{target}"

    return _write(settings, key, model, change)
