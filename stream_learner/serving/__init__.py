"""The serving side: follow the model topic, verify, load and atomically swap the model.

A serving node embeds one :class:`CheckpointSubscriber` per model it serves
and answers every request with ``subscriber.current.predict_one(features)``.

**What the subscriber does, in order**

1. *Start.* It takes the end offsets of every partition of the model
   topic and follows from there at once; the newest good version before
   them is found by a :class:`~stream_learner.checkpoint.scan.LatestScan`
   reading back from the end in bounded steps between polls: every manifest
   it meets is verified, what it refuses is passed over (unsigned, forged,
   unparseable, replayed, below the floor), and a broker error loses none
   of its progress (:mod:`.follower`, :mod:`.startscan`).
2. *Follow.* One consumer without a group (manual assignment, as the reader
   uses) reads every partition of the topic forward. Records are sorted by
   their headers first, which is cheap: another model's records are
   skipped; this model's chunks are kept in a bounded window (records and
   bytes; so a manifest's chunks, read just before it, are not fetched
   twice); a manifest of a version not above the newest one followed is
   ignored, one below the floor refused.
3. *Load.* A newer manifest record is verified and its weights loaded by
   :func:`~stream_learner.checkpoint.reader.load_manifest_record`
   (signature, chunks, digest, safetensors), then built into a
   :class:`ServedModel`: a fresh ``nn.Module`` from the signed
   architecture, weights loaded strictly, eval mode, a smoke prediction
   that must be finite. It predicts through the learner's own
   :class:`~stream_learner.learn.predictor.Predictor`, so a served
   prediction is the learner's by construction.
4. *Swap.* Only then does ``current`` change, by one reference assignment:
   a request sees the old model or the new one, never a half-loaded one.
   ``on_swap(new, old)`` runs after the swap, outside the lock.

**Never backwards.** While following, only a version strictly greater than
the newest one followed is loaded: an older manifest replayed onto the
topic (a downgrade attack, or an honest duplicate) is counted and ignored.
At start, a version below the *floor* (the highest good version this node
served, kept under ``serving_state_dir``: :mod:`.state`) is refused as
``downgrade``, and a replayed manifest loses to any newer version between
it and its chunks (see ``LatestScan``), so a restarting node serves the
last good version whatever was appended. :meth:`CheckpointSubscriber.pin`
(alias ``rollback``) is the only way back to an older version;
:meth:`~CheckpointSubscriber.unpin` returns to the newest. While pinned,
newer versions are still verified and loaded in the background (so that
unpinning is immediate), but not served.

**The registry.** Signed registry records on the same topic
(:mod:`stream_learner.checkpoint.registry`) name versions by alias and may
pin one fleet-wide; the subscriber finds the newest valid one at start
(nothing is served before) and follows them (:mod:`.registry`). What it
serves: its own pin, else the registry's pin, else its alias's version
(``serving_alias``), else the newest.

**Failures** (a refused signature or key, a missing or foreign chunk, a
digest mismatch, weights that are not safetensors, an architecture that
does not match its weights, a non-finite smoke prediction, a broker error)
keep the last good model current. Each is logged, counted by reason
(:func:`failure_reason`) in ``stream_learner_serving_swap_failures_total{reason}``
and kept as ``status()["last_error"]``; the subscriber goes on following.
A broker error while loading re-reads the same manifest after a back-off,
so a version is not skipped because the broker was briefly away. If the
newest checkpoint is refused at start, the scan goes on below it (never
below the floor). A record too large to receive is skipped and counted.

**Threads.** :meth:`CheckpointSubscriber.start` runs the loop on a daemon
thread that never dies of an exception; :meth:`~CheckpointSubscriber.poll_once`
runs one step on the caller's thread instead. ``current`` is safe to read
from any number of threads; a :class:`ServedModel`'s network and statistics
are never mutated, so concurrent ``predict`` calls share it freely (only its
featurizer's missing-value counters are bumped, without a lock). Which lock
guards what: :mod:`stream_learner.serving.subscriber`.

**Trust.** Only manifests signed by a key in ``public_keys`` are loaded,
and a key is trusted with weights, not code or unbounded work: a node
builds only the built-in architectures and the factories named in
``serving_allowed_architectures``, and bounds everything before building
(:mod:`.model`, :class:`~stream_learner.checkpoint.assemble.LoadLimits`).
The README's Security section is the threat model.

**Modules**, by concept:

* :mod:`.model` — :class:`ServedModel`, :func:`load_served_model`: a verified
  checkpoint built into a model ready to serve;
* :mod:`.failures` — :class:`ModelLoadError`, :func:`failure_reason`: how a
  refusal is named and counted;
* :mod:`.window` — the bounded window of chunk records the follower keeps;
* :mod:`.clients` — the subscriber's two Kafka consumers;
* :mod:`.follower` — the loop's work: position at the end, then follow the topic;
* :mod:`.startscan` — the start scan: the newest good version before the end, read back in bounded steps;
* :mod:`.versions` — the swap decisions: never backwards, the pin;
* :mod:`.choice` — which version to ask for: this node's pin, the registry's pin or alias, the newest;
* :mod:`.trust` — the keys a node trusts and the bounds on what it builds (:func:`public_keys_from_settings`);
* :mod:`.state` — the floor and the registry record a node remembers across restarts;
* :mod:`.registry` — the model registry as a subscriber follows it: aliases, a fleet-wide pin;
* :mod:`.telemetry` — the serving side's own metrics, a limit on repeated log lines;
* :mod:`.subscriber` — :class:`CheckpointSubscriber`: the loop, its thread, swaps and ``status()``;
* :mod:`.node` — :class:`ServingNode`, the HTTP service behind ``stream-learner serve``;
* :mod:`.http` — the asyncio HTTP front and ``NodeLimits``, what bounds a client;
* :mod:`.requests` — a ``POST /predict`` body, the work it asks for, its total parser;
* :mod:`.shadow` — the challenger answered off the request path and logged (``serving_shadow``).
"""

from .failures import ModelLoadError, failure_reason
from .model import ServedModel, load_served_model
from .node import ServingNode, cold_start_model, run_node
from .subscriber import CheckpointSubscriber
from .trust import public_keys_from_settings

__all__ = [
    "CheckpointSubscriber",
    "ModelLoadError",
    "ServedModel",
    "ServingNode",
    "cold_start_model",
    "failure_reason",
    "load_served_model",
    "public_keys_from_settings",
    "run_node",
]
