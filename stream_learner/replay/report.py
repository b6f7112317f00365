"""Comparing a replayed lineage with the live one over the same range.

The live lineage's manifests are read from the model topic (manifest records
only, by header; each signature verified). The live manifest compared with
is, for an examples replay that started at the beginning of the examples
topic, the one whose ``input_offsets`` equal the replay's end offsets: both
then learned exactly the same records, and their weights must be equal,
which the report checks by digest (the replay's weights digest as if
published under the live name, since the file's metadata names the model).
Otherwise (an events replay, whose inputs are the prediction and label
topics, or a range that is not a prefix of the live run's) it is the newest
live manifest, and only metrics and counts are set side by side.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..bus import TopicPartition
from ..checkpoint.errors import SignatureError
from ..checkpoint.reader import make_reader_consumer
from ..checkpoint.signing import verify_manifest
from ..config import Settings
from ..events import MANIFEST, CheckpointManifest
from .ranges import tp_from_name

_COUNTS = ("labeled", "pseudo", "late", "skipped", "duplicates", "rollbacks", "batches")


def live_manifests(settings: Settings, model: str, public_key: Ed25519PublicKey) -> list[CheckpointManifest]:
    """Every verified manifest of ``model`` on the model topic, in topic order."""
    consumer = make_reader_consumer(settings)
    try:
        topic = settings.topic_models
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        out: list[CheckpointManifest] = []
        empty = 0
        while any(consumer.position(tp) < ends[tp] for tp in tps) and empty < 50:
            batch = consumer.poll(timeout_ms=200)
            empty = 0 if batch else empty + 1
            for records in batch.values():
                for r in records:
                    headers = dict(r.headers or [])
                    if headers.get("sl-type") != b"manifest" or headers.get("sl-model") != model.encode():
                        continue
                    manifest = MANIFEST.decode(r.value)
                    try:
                        verify_manifest(manifest, public_key)
                    except SignatureError:
                        continue
                    out.append(manifest)
        return out
    finally:
        consumer.close()


def compare(summary: dict[str, Any], live: list[CheckpointManifest], examples_topic: str) -> dict[str, Any]:
    """The comparison of a replay's summary with the live lineage's manifests (JSON-able)."""
    report: dict[str, Any] = {
        "replay": {
            k: summary[k]
            for k in (
                "replay_id",
                "lineage",
                "source",
                "version",
                "final_sha256",
                "final_sha256_as_live",
                "metrics",
                "records_in_ranges",
                "counts",
            )
        }
    }
    report["replay"]["learner_counts"] = {k: summary["learner_counts"].get(k) for k in summary["learner_counts"]}
    if not live:
        report.update(live=None, inputs_match=False, reason="no verified live manifest on the model topic")
        return report
    chosen, inputs_match, reason = live[-1], False, "newest live manifest (the inputs differ)"
    ranges = summary["ranges"]["ranges"]
    if summary["source"] == "examples":
        ends = {tp_from_name(n).partition: e for n, (s, e) in ranges.items() if e > s}
        from_start = all(s == 0 for s, _ in ranges.values())
        for m in reversed(live):
            offsets = {src.partition: src.offset for src in m.input_offsets if src.topic == examples_topic}
            if from_start and offsets == ends:
                chosen, inputs_match, reason = m, True, "the live run applied exactly this range"
                break
        else:
            reason = (
                "no live manifest applied exactly this range (it must start at the beginning and end "
                "where a live checkpoint was taken); compared with the newest"
            )
    else:
        reason = "an events replay's inputs are the prediction and label topics; live manifests name examples"
    live_applied = sum(src.offset for src in chosen.input_offsets if src.topic == examples_topic)
    report["live"] = {
        "model": chosen.model,
        "version": chosen.version,
        "sha256": chosen.weights.sha256,
        "metrics": chosen.metrics,
        "counts": chosen.counts,
        "input_offsets": [[s.topic, s.partition, s.offset] for s in chosen.input_offsets],
        "records_applied": live_applied,
    }
    report["inputs_match"] = inputs_match
    report["reason"] = reason
    report["digest_equal"] = (summary["final_sha256_as_live"] == chosen.weights.sha256) if inputs_match else None
    report["metrics"] = {
        k: {"replay": summary["metrics"].get(k), "live": chosen.metrics.get(k)}
        for k in sorted(set(summary["metrics"]) | set(chosen.metrics))
    }
    lc = summary["learner_counts"]
    replay_counts = {
        "labeled": lc["labeled"],
        "pseudo": lc["pseudo"],
        "late": lc["late"],
        "skipped": lc["duplicates"] + lc["other_model"] + lc["rejected"] + lc["pseudo_skipped"],
        "duplicates": lc["duplicates"],
        "rollbacks": lc["rollbacks"],
        "batches": lc["batches"],
    }
    report["counts"] = {k: {"replay": replay_counts.get(k), "live": chosen.counts.get(k)} for k in _COUNTS}
    # Records of the examples topic (offsets), not examples: a batch record holds many (events.batch).
    report["records_applied"] = {"replay": summary["records_read"], "live": live_applied}
    return report


def to_markdown(report: dict[str, Any]) -> str:
    """The report as a short markdown document."""
    r = report["replay"]
    lines = [
        f"# Replay {r['replay_id']} ({r['source']}) vs live",
        "",
        (
            f"- replayed lineage `{r['lineage']}` v{r['version']}, weights sha256 `{r['final_sha256']}` "
            f"(as live name: `{r['final_sha256_as_live']}`)"
        ),
    ]
    live = report.get("live")
    if live is None:
        lines += [f"- live: {report['reason']}", ""]
        return "\n".join(lines)
    lines += [
        f"- live `{live['model']}` v{live['version']}, weights sha256 `{live['sha256']}`",
        f"- inputs match: **{report['inputs_match']}** ({report['reason']})",
        f"- digest equal: **{report['digest_equal']}**",
        "- records applied: replay {replay}, live {live}".format(**report["records_applied"]),
        "",
        "| metric | replay | live |",
        "|---|---|---|",
    ]
    for k, v in report["metrics"].items():
        lines.append(f"| {k} | {_fmt(v['replay'])} | {_fmt(v['live'])} |")
    lines += ["", "| count | replay | live |", "|---|---|---|"]
    for k, v in report["counts"].items():
        lines.append(f"| {k} | {v['replay']} | {v['live']} |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
