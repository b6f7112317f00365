"""The simulated application: requests over HTTP to the serving node, then their labels through the SDK.

Requests come from River's Agrawal generator, whose concept changes abruptly
at a known request (classification function 0 -> 2). Each response is scored
against the truth, so the served accuracy is what users would have seen. The
true label follows after a random delay, after the join window for a
fraction of requests, and for another fraction never.
"""

from __future__ import annotations

import heapq
import http.client
import itertools
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ...sdk import PredictionLogger

FEATURES = ["salary", "commission", "age", "elevel", "car", "zipcode", "hvalue", "hyears", "loan"]
MODEL = "demo"
PROBE = "demo-probe"  # the warm-up request's model: the trainer skips it as another model's

Row = tuple[dict[str, float], int]  # a request's features and its true class


@dataclass(frozen=True)
class DemoConfig:
    """What the simulated application does. Defaults take about 80 s on a quiet machine (README)."""

    rate: float = 400.0  # requests per second
    seconds: float = 60.0  # of traffic
    drift_at: float = 0.5  # the fraction of requests served before the concept changes
    label_missing: float = 0.10  # never labeled
    label_late: float = 0.05  # labeled after the join window closed
    label_delay_s: tuple[float, float] = (0.05, 1.2)  # the others' delay, uniform
    window_ms: int = 2000  # the joiner's label window
    checkpoint_every_s: float = 1.0  # the trainer's; freshness waits for the next checkpoint
    clients: int = 2  # concurrent application threads
    seed: int = 7
    out: Path = Path("demo-report")
    # Requests in the rolling accuracy: the one window of the progress line, the plot and the summary.
    rolling_window: int = 500
    # Serving variants the trainer derives from every version (trainer_variants) and the report replays.
    # Not pruned: for the demo's 64-wide MLP it is skipped as not faster, as the student is, at the cost
    # of a fine-tune per version in the trainer's loop (README, "Serving variants").
    variants: tuple[str, ...] = ("int8", "sparse", "student")

    @property
    def requests(self) -> int:
        """How many requests the application sends."""
        return int(self.rate * self.seconds)

    @property
    def drift_index(self) -> int:
        """The first request drawn from the new concept."""
        return int(self.requests * self.drift_at)


def demo_rows(config: DemoConfig) -> list[Row]:
    """The requests and their true classes: Agrawal function 0, then function 2 from the drift on."""
    from river.datasets import synth

    before = synth.Agrawal(classification_function=0, seed=config.seed)
    after = synth.Agrawal(classification_function=2, seed=config.seed + 1)
    rows = list(itertools.islice(before, config.drift_index))
    rows += itertools.islice(after, config.requests - config.drift_index)
    return [({k: float(v) for k, v in x.items()}, int(y)) for x, y in rows]


@dataclass
class Served:
    """What the application saw for one request: when the answer came (s after the start), from which
    model version, whether it was right, and how long the node took to answer (HTTP round trip)."""

    sent_at: float
    version: int
    correct: bool
    latency_s: float = 0.0


class LabelSender(threading.Thread):
    """Sends each label when its delay is over, through the SDK, as an application would."""

    def __init__(self, sdk: PredictionLogger) -> None:
        super().__init__(name="demo-labels", daemon=True)
        self.sdk = sdk
        self.heap: list[tuple[float, str, str]] = []
        self.cond = threading.Condition()
        self.sent_at: dict[str, float] = {}  # label event id -> when it was sent
        self.done = False

    def schedule(self, due: float, request_id: str, label: str) -> None:
        """Send ``label`` for ``request_id`` at wall-clock time ``due``."""
        with self.cond:
            heapq.heappush(self.heap, (due, request_id, label))
            self.cond.notify()

    def finish(self) -> None:
        """Send what is scheduled, then stop."""
        with self.cond:
            self.done = True
            self.cond.notify()
        self.join()

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.heap and not self.done:
                    self.cond.wait()
                if not self.heap:
                    return
                due, request_id, label = self.heap[0]
                wait = due - time.time()
                if wait > 0:
                    self.cond.wait(wait)
                    continue
                heapq.heappop(self.heap)
            event_id = self.sdk.log_label(request_id, label, model=MODEL)
            if event_id is not None:
                self.sent_at[event_id] = time.time()


class Application:
    """``config.clients`` threads sending ``rows`` at ``config.rate`` to the node on ``port``.

    :meth:`start` starts the labels and the clients; :meth:`finish` waits for
    every request and then every scheduled label. Meanwhile ``served`` (per
    request, ``None`` until answered), ``failures`` and ``drift_time`` fill in.
    """

    def __init__(self, config: DemoConfig, rows: list[Row], port: int, sdk: PredictionLogger) -> None:
        self.config, self.rows, self.port = config, rows, port
        # Every random draw up front, in this order, so a seed fixes the fates whatever the timing.
        rng = random.Random(config.seed)
        self.fates = [rng.random() for _ in rows]
        self.delays = [rng.uniform(*config.label_delay_s) for _ in rows]
        late = config.window_ms / 1000
        self.late_delays = [rng.uniform(late * 1.5, late * 2.5) for _ in rows]
        self.served: list[Served | None] = [None] * len(rows)
        self.failures = Counter[str]()
        self.drift_time: list[float] = []  # when the first request of the new concept went out
        self.labels = LabelSender(sdk)
        self.t0 = 0.0
        self._next_index = itertools.count()
        self._lock = threading.Lock()
        self._clients: list[threading.Thread] = []

    @property
    def drift_wall(self) -> float | None:
        """The wall-clock time of the drift, once it happened."""
        return self.drift_time[0] if self.drift_time else None

    def start(self) -> None:
        """Start the labels, then the clients; ``t0`` is when traffic starts."""
        self.labels.start()
        self.t0 = time.time()
        self._clients = [
            threading.Thread(target=self._client, name=f"demo-client-{n}", daemon=True)
            for n in range(self.config.clients)
        ]
        for c in self._clients:
            c.start()

    def finish(self) -> None:
        """Wait until every request was sent and every scheduled label too."""
        for c in self._clients:
            c.join()
        self.labels.finish()

    def _client(self) -> None:
        config, rows = self.config, self.rows
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while True:
            with self._lock:
                i = next(self._next_index)
            if i >= len(rows):
                break
            due = self.t0 + i / config.rate
            if (wait := due - time.time()) > 0:
                time.sleep(wait)
            if i == config.drift_index:
                self.drift_time.append(time.time())
            features, y = rows[i]
            request_id = f"req-{i}"
            asked = time.perf_counter()
            try:
                conn.request(
                    "POST",
                    "/predict",
                    json.dumps({"request_id": request_id, "features": features}),
                    {"Content-Type": "application/json"},
                )
                resp = conn.getresponse()
                body = json.loads(resp.read())
                if resp.status != 200:
                    with self._lock:
                        self.failures[f"http_{resp.status}"] += 1
                    continue
            except (OSError, http.client.HTTPException, ValueError) as exc:
                with self._lock:
                    self.failures[type(exc).__name__] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                continue
            latency = time.perf_counter() - asked
            probs = body["prediction"]
            self.served[i] = Served(
                time.time() - self.t0, int(body["model_version"]), int(max(probs, key=probs.get)) == y, latency
            )
            fate = self.fates[i]
            if fate < config.label_missing:
                continue
            delay = self.late_delays[i] if fate < config.label_missing + config.label_late else self.delays[i]
            self.labels.schedule(time.time() + delay, request_id, str(y))
        conn.close()
