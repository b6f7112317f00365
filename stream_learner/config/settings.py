"""The settings struct: every setting of every role, its type, bounds and default.

Validation lives here too: each field's annotation bounds its value, and
:meth:`Settings.__post_init__` checks what spans several fields. How the
values are gathered is :mod:`.loading`'s; what they mean, :mod:`.reference`'s
(which reads each field's docstring from this file's source).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from .secrets import is_secret, redact

Port = Annotated[int, Meta(ge=0, le=65535)]
Positive = Annotated[int, Meta(ge=1)]
TopicName = Annotated[str, Meta(min_length=1, max_length=249, pattern=r"^[A-Za-z0-9._-]+$")]


def _has_hash_tag(key: str) -> bool:
    """True if ``key`` holds a Redis Cluster hash tag: a non-empty ``{...}``.

    >>> _has_hash_tag("sl:{j}:"), _has_hash_tag("sl:j:"), _has_hash_tag("sl:{}:")
    (True, False, False)
    """
    start = key.find("{")
    end = key.find("}", start + 1) if start >= 0 else -1
    return end > start + 1


class Settings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every setting of every role.

    Each field's docstring (the string below it) is its meaning: each verb's
    ``--help`` and the README's configuration table are made from them
    (:func:`~.reference.field_docs`), so there is no second description to keep in step.
    """

    # Kafka connection; security settings are passed to kafka-python as they are.
    bootstrap_servers: Annotated[str, Meta(min_length=1)] = "127.0.0.1:9092"
    """Kafka brokers, comma-separated host:port."""
    kafka_client: Literal["kafka-python", "confluent"] = "kafka-python"
    """Kafka client library: kafka-python, or confluent (librdkafka; install the [confluent] extra)."""
    client_id: str = "stream-learner"
    """Kafka client id (broker logs and quotas)."""
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """How to talk to the brokers: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."""
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    """SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (required with SASL_*)."""
    sasl_username: str | None = None
    """SASL user (required with SASL_*)."""
    sasl_password: str | None = None
    """SASL password (required with SASL_*; always shown masked)."""
    ssl_cafile: str | None = None
    """CA certificates (PEM) that verify the brokers."""
    ssl_certfile: str | None = None
    """Client certificate (PEM) for TLS client authentication; with ssl_keyfile."""
    ssl_keyfile: str | None = None
    """Private key (PEM) of ssl_certfile."""
    ssl_password: str | None = None
    """Password of ssl_keyfile (always shown masked)."""
    ssl_check_hostname: bool = True
    """Check that the broker's certificate names its host."""

    # Consumer groups. Tansu waits a whole rebalance timeout (= max poll
    # interval) on every join, so tests and the demo use short values.
    consumer_session_timeout_ms: Annotated[int, Meta(ge=1000)] = 45_000
    """Consumer-group session timeout: a member silent this long is dropped."""
    consumer_max_poll_interval_ms: Annotated[int, Meta(ge=1000)] = 300_000
    """Longest time between two polls of a group member (also the rebalance timeout)."""
    # Apache Kafka answers as soon as a record arrives; Tansu holds the whole
    # wait, which then adds to every hop's latency (the demo sets 50).
    consumer_fetch_max_wait_ms: Annotated[int, Meta(ge=0)] = 500
    """Longest time the broker may hold a fetch while nothing new is there (Tansu always waits it all)."""

    # Redis: rediss:// in the URL turns TLS on; AUTH from the URL or these.
    redis_url: Annotated[str, Meta(pattern=r"^(redis|rediss|unix)://")] = "redis://127.0.0.1:6379/0"
    """Redis of the join state: redis://, rediss:// (TLS) or unix://; a password in it is shown masked."""
    redis_username: str | None = None
    """Redis ACL user (or in the URL)."""
    redis_password: str | None = None
    """Redis AUTH password (or in the URL; always shown masked)."""
    redis_ssl_ca_certs: str | None = None
    """CA certificates (PEM) that verify Redis (rediss:// only)."""
    redis_ssl_certfile: str | None = None
    """Client certificate (PEM) for Redis TLS (rediss:// only)."""
    redis_ssl_keyfile: str | None = None
    """Private key (PEM) of redis_ssl_certfile."""
    redis_cluster: bool = False
    """redis_url names a node of a Redis Cluster: each role talks to the primary owning its keys' slot."""
    redis_wait_replicas: Annotated[int, Meta(ge=0)] = 0
    """Replicas that must have written a join step or a trainer state to their append-only file before it
    counts as durable (WAITAOF numreplicas; 0: the primary's own file). Above 0 a failover loses nothing
    acknowledged; while fewer replicas confirm within a second, the write is retried."""
    redis_sentinel_master: str | None = None
    """The master a Redis Sentinel watches, by name: redis_url then names the Sentinels
    (redis://host1:26379,host2:26379/0) and each role follows the master they name across failovers."""

    # Topics (docs/architecture.md, "Topics").
    topic_predictions: TopicName = "sl.predictions"
    """Prediction events, keyed by request id (applications write, the joiner reads)."""
    topic_labels: TopicName = "sl.labels"
    """Label events, keyed by request id (applications write, the joiner reads)."""
    topic_examples: TopicName = "sl.examples"
    """Joined examples (the joiner writes, the trainer reads)."""
    topic_models: TopicName = "sl.models"
    """Signed checkpoints (the trainer writes, serving nodes read); keep cleanup.policy=delete."""
    topic_drift: TopicName = "sl.drift"
    """Drift events (the trainer writes, for operators)."""
    topic_dlq: TopicName = "sl.dlq"
    """Dead letters: refused records byte for byte, the reason in headers."""
    max_event_bytes: Positive = 1 << 20
    """Larger events are refused unread (dead-lettered)."""
    # Topic creation: `topics create`, or a role at start when told to.
    create_topics: bool = False
    """At start, create the role's topics that do not exist (off: a missing topic stops the role, named)."""
    partitions_input: Positive = 3
    """Partitions of the prediction and label topics, when stream-learner creates them."""
    partitions_examples: Positive = 1
    """Partitions of the examples topic, when stream-learner creates it."""
    replication_factor: Positive = 1
    """Replication factor of the topics stream-learner creates (3 on a real cluster)."""

    # Joiner (README, "The joiner"). Times are event-time milliseconds unless
    # they say wall clock.
    joiner_group_id: str = "stream-learner-joiner"
    """The joiners' consumer group."""
    joiner_window_ms: Positive = 10 * 60 * 1000
    """How long (event time) a prediction waits for its label."""
    joiner_allowed_lateness_ms: Annotated[int, Meta(ge=0)] = 0
    """Watermark delay for out-of-order events within a partition."""
    joiner_late_retention_ms: Annotated[int, Meta(ge=0)] = 24 * 3600 * 1000
    """How long (event time) an expired prediction still takes a late label."""
    joiner_orphan_retention_ms: Annotated[int, Meta(ge=0)] = 3600 * 1000
    """How long (event time) a label waits for its prediction."""
    joiner_state_ttl_ms: Positive = 7 * 24 * 3600 * 1000
    """Wall-clock safety net: Redis drops a request's join state this long after its first event."""
    joiner_idle_timeout_ms: Positive = 60 * 1000
    """Wall clock: a caught-up partition with no record this long is idle and stops holding the watermark back;
    one no joiner reported this long is active (README, the joiner's idle rules)."""
    joiner_idle_advance: bool = True
    """When every input is idle, the watermark follows the wall clock."""
    joiner_max_poll_records: Positive = 5000
    """Records per poll (one Redis call each)."""
    joiner_max_expire_per_poll: Positive = 20000
    """Windows closed and states collected per Redis call, at most."""
    joiner_outbox_lease_ms: Positive = 30 * 1000
    """Wall clock: emissions unacknowledged this long are re-emitted by any joiner."""
    joiner_wait_aof: bool = True
    """WAITAOF (Redis fsynced the step) before committing input offsets; skipped if Redis has no AOF."""
    joiner_redis_prefix: Annotated[str, Meta(min_length=1)] = "sl:{j}:"
    """Prefix of every join key; keep one {hash tag} (Redis Cluster)."""
    examples_format: Literal["json", "batch"] = "json"
    """How the joiner writes the examples topic: json (one example.v2 record per example, keyed by request id)
    or batch (per cycle, one example-batch.v1 record per partition holding its examples). Every reader reads
    both, whatever this says."""

    # Trainer (README, "The trainer"): the model, then how it learns.
    trainer_model: Annotated[str, Meta(min_length=1)] = "default"
    """The model learned (and served); examples of other models are skipped."""
    trainer_task: Literal["binary", "multiclass", "regression"] = "binary"
    """binary, multiclass or regression."""
    trainer_classes: list[str] = msgspec.field(default_factory=lambda: ["0", "1"])
    """Class names, in output order (comma-separated in env and flags)."""
    trainer_features: list[str] = []
    """The feature spec, in order (required to train or cold-start): NAME for a number, or NAME:category:vocab=A|B|C
    (unknown=refuse to refuse unknowns), NAME:category:buckets=N (hashed), NAME:vector:length=N,
    NAME:text:tokenizer=PATH:max_length=N (overflow=refuse to refuse longer texts); README, "Inputs"."""
    trainer_architecture: Annotated[str, Meta(min_length=1)] = "mlp"
    """logreg, mlp, or package.module:function returning an nn.Module."""
    trainer_hidden: list[Annotated[int, Meta(ge=1)]] = msgspec.field(default_factory=lambda: [64])
    """MLP hidden layer widths."""
    trainer_seed: int = 0
    """Weight initialisation seed."""
    # Inputs and the user model's parameters (README, "Inputs"; stream_learner.learn.inputs): recorded in the
    # signed architecture, so a serving node featurizes and builds exactly as the trainer did.
    trainer_architecture_params: dict[str, Any] = {}
    """Keyword arguments of the model factory (JSON in env and flags, a table in TOML); logreg and mlp take
    text_dim only."""
    trainer_collate: str | None = None
    """package.module:function turning a batch of feature dicts into extra tensors for a user model (unset: none)."""
    trainer_batch_size: Positive = 32
    """Examples per mini-batch (a chunk)."""
    trainer_max_wait_ms: Positive = 500
    """Once caught up, a partial batch is trained after this long."""
    trainer_optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    """adam, adamw or sgd."""
    trainer_lr: Annotated[float, Meta(gt=0)] = 0.01
    """Learning rate."""
    trainer_weight_decay: Annotated[float, Meta(ge=0)] = 0.0
    """Weight decay."""
    trainer_clip_norm: Annotated[float, Meta(ge=0)] = 1.0
    """Gradient norm clipping (0: off)."""
    trainer_spike_factor: Annotated[float, Meta(gt=1)] = 5.0
    """A batch loss above this many times its running mean is rolled back, not learned."""
    trainer_spike_warmup_batches: Annotated[int, Meta(ge=0)] = 20
    """Batches before the spike guard starts."""
    trainer_spike_patience: Annotated[int, Meta(ge=0)] = 3
    """After this many spikes in a row the new loss level is accepted (a concept change)."""
    # Small models run faster (and reproducibly) on one thread.
    trainer_torch_threads: Positive = 1
    """Torch CPU threads."""
    run_joiner_process: bool = True
    """`run`: host the joiner in a process of its own (its own interpreter lock: the two roles use two
    cores) rather than a thread of the trainer's process. Its metrics and /health are then on
    metrics_port + 1."""
    # The data-parallel trainer (stream_learner.learn.ranks; docs/architecture.md, "Scale-out").
    trainer_dist_world_size: Positive = 1
    """Ranks learning the one model (above 1: the trainer starts them with torch's elastic launcher, each reading
    the partitions p % N == rank; torchrun's WORLD_SIZE, when set, takes precedence)."""
    trainer_dist_max_restarts: Annotated[int, Meta(ge=0)] = 100
    """Times the launcher restarts the whole group from the last snapshot after a rank fails."""
    trainer_dist_timeout_s: Annotated[float, Meta(gt=0)] = 1800.0
    """A collective that waits longer for a rank fails the group (rank 0 may wait this long for its state store)."""
    trainer_pseudo_enabled: bool = False
    """Learn confident unlabeled examples from their own prediction (zero-distance pseudo-labels); off by default:
    at 10 % labels no recipe tried raised accuracy (bench/README.md, "Pseudo-labels")."""
    trainer_pseudo_threshold: Annotated[float, Meta(ge=0, le=1)] = 0.9
    """Least predicted probability for a pseudo-label step."""
    trainer_pseudo_weight: Annotated[float, Meta(ge=0)] = 0.3
    """Weight of a pseudo-label step."""
    trainer_dedup_window: Positive = 100_000
    """Example ids remembered to drop duplicates."""
    trainer_metrics_window: Positive = 1000
    """Examples in the rolling metrics (manifests and the rolling gauges)."""
    trainer_checkpoint_every_examples: Positive = 10_000
    """Checkpoint after this many examples."""
    trainer_checkpoint_every_s: Annotated[float, Meta(gt=0)] = 30.0
    """Checkpoint at least this often (wall clock)."""
    trainer_state_store: Literal["directory", "redis"] = "directory"
    """Where the trainer's state lives: directory or redis."""
    trainer_state_dir: str = ".stream-learner/trainer-state"
    """The state directory (trainer_state_store=directory)."""
    trainer_signing_key: str | None = None
    """Ed25519 private key (PEM file) that signs checkpoints (required to train)."""
    trainer_group_id: str = "stream-learner-trainer"
    """Group under which applied offsets are committed, for monitoring only."""
    trainer_chunk_bytes: Annotated[int, Meta(ge=1024)] = 512 * 1024
    """Largest checkpoint chunk on the model topic."""
    # Drift (README, "Drift"): ADWIN on the error, Page-Hinkley on the loss,
    # ADWIN on the confidence (label-free); what to do when they fire.
    trainer_drift_enabled: bool = True
    """Run the drift detectors."""
    trainer_drift_challenger_on_warning: bool = False
    """Start a challenger model at a drift warning."""
    trainer_drift_on_drift: list[
        Literal["promote_challenger_if_better", "optimizer_reset", "lr_boost", "checkpoint"]
    ] = msgspec.field(default_factory=lambda: ["promote_challenger_if_better", "lr_boost", "checkpoint"])
    """Actions on a drift, in order: promote_challenger_if_better, optimizer_reset, lr_boost, checkpoint."""
    trainer_drift_lr_boost_factor: Annotated[float, Meta(gt=1)] = 2.0
    """lr_boost multiplies the learning rate by this."""
    trainer_drift_lr_boost_batches: Positive = 100
    """lr_boost lasts this many batches."""

    # Serving variants (README, "Serving variants"; stream_learner.optimize): derived from every
    # version, gated on held-out accuracy and latency, published as <model>#<variant>.
    trainer_variants: list[Literal["int8", "pruned", "sparse", "student"]] = []
    """Variants derived from every version by the trainer and replay: int8, pruned, sparse, student (empty: none)."""
    trainer_student_hidden: list[Annotated[int, Meta(ge=1)]] = []
    """The distilled student's MLP widths (empty: a quarter of the teacher's)."""
    trainer_student_alpha: Annotated[float, Meta(ge=0, le=1)] = 0.5
    """Weight of the distillation term in the student's loss (1 - alpha: the labelled loss)."""
    trainer_student_temperature: Annotated[float, Meta(gt=0)] = 2.0
    """Temperature of the teacher's and the student's softened probabilities."""
    trainer_student_lr: Annotated[float, Meta(gt=0)] | None = None
    """The student's learning rate (unset: the teacher's; README, "Serving variants", on a higher one)."""
    variant_window: Positive = 2000
    """Recent examples kept raw for the variants: fine-tuned on before a version, gated on after it."""
    variant_heldout_examples: Positive = 1000
    """A version's variants are gated once this many labeled examples after it were learned."""
    variant_min_heldout_examples: Positive = 200
    """Fewer held-out labeled examples by the next version: its variants are skipped, counted."""
    variant_max_accuracy_drop: Annotated[float, Meta(ge=0)] = 0.5
    """Largest accuracy drop (points) or RMSE rise (percent) vs the parent for a variant to be published."""
    variant_min_speedup: Annotated[float, Meta(ge=1)] = 1.1
    """A speed variant (int8, pruned, student) must be this many times faster than its parent (p50)."""
    variant_serving_batch: Positive = 1
    """The batch size the speed gate measures at (the serving batch size)."""
    variant_latency_budget_s: Annotated[float, Meta(gt=0)] = 0.3
    """Seconds the gate times each variant and its parent per batch size (paid per variant per version)."""
    variant_int8_min_features: Positive = 16
    """int8: quantize the linear layers with at least this many inputs and outputs."""
    variant_prune_fraction: Annotated[float, Meta(gt=0, lt=1)] = 0.5
    """pruned: the fraction of each hidden layer's units removed."""
    variant_sparse_fraction: Annotated[float, Meta(gt=0, lt=1)] = 0.5
    """sparse: the fraction of each linear layer's weights set to zero."""
    variant_finetune_epochs: Annotated[int, Meta(ge=0)] = 2
    """pruned, sparse: passes of the distillation fine-tune over the recent window."""

    # Large models (README, "Bringing a large model"; stream_learner.learn.frozen): a frozen
    # pretrained base, what learns on it, delta checkpoints, precision and device.
    trainer_base_weights: str = ""
    """A local safetensors file of pretrained tensors named as the model's; its SHA-256 is in every manifest."""
    trainer_trainable: Literal["all", "head", "lora"] = "all"
    """What learns: all, head (trainer_head_modules) or lora (trainer_lora_layers and the head); the rest is frozen."""
    trainer_head_modules: list[str] = []
    """Modules that learn in full with trainer_trainable=head or lora (comma-separated module paths)."""
    trainer_lora_layers: list[str] = []
    """nn.Linear modules given LoRA adapters with trainer_trainable=lora (comma-separated module paths)."""
    trainer_lora_rank: Positive = 8
    """Rank of each LoRA adapter."""
    trainer_lora_alpha: Annotated[float, Meta(gt=0)] = 16.0
    """LoRA scaling: an adapter's output is multiplied by alpha / rank."""
    trainer_full_checkpoint_every: Annotated[int, Meta(ge=0)] = 10
    """With a frozen base, every Nth version is full, the others deltas (only what learns); 0: deltas only."""
    trainer_checkpoint_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Precision of the published weights (the trainer's own state stays float32)."""
    trainer_device: Annotated[str, Meta(pattern=r"^(cpu|cuda(:[0-9]+)?)$")] = "cpu"
    """Where the trainer's model and batches live: cpu, cuda or cuda:N (checked at start)."""
    serving_base_weights: str = ""
    """The base file a node applies deltas to (its SHA-256 must be the manifest's); unset: deltas are refused."""
    serving_device: Annotated[str, Meta(pattern=r"^(cpu|cuda(:[0-9]+)?)$")] = "cpu"
    """Where a node's models run: cpu, cuda or cuda:N (checked at start)."""

    # Replay (README, "Replay").
    replay_state_dir: str = ".stream-learner/replay"
    """Where each replay keeps its resumable state and report (one directory per replay id)."""
    replay_join_step_events: Positive = 5000
    """Input events per join step in a replay: the replayed watermark advances at these boundaries."""

    # Serving side (README, "Serving"): the checkpoint subscriber and `serve`.
    serving_model: str | None = None
    """The model to follow and serve; unset: trainer_model."""
    serving_variant: Literal["int8", "pruned", "sparse", "student"] | None = None
    """Serve this variant of the model; the parent where a version has no passing variant (unset: the parent)."""
    serving_variant_max_lag: Annotated[int, Meta(ge=0)] = 1
    """Serve the parent once the newest variant is more than this many versions behind it."""
    serving_shadow: Literal["challenger"] | None = None
    """Also predict each request with the trainer's challenger (lineage model#challenger) and log it (unset: no)."""
    serving_public_keys: list[str] = []
    """PEM files of the trainer public keys a serving node trusts (comma-separated; required)."""
    serving_pin_version: Annotated[int, Meta(ge=1)] | None = None
    """Serve this version and do not follow newer ones (on this node, above what the registry says)."""
    serving_alias: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    """Serve the version this registry alias names (champion, canary, ...); unset: the newest, or the registry's pin."""
    serving_registry: bool = True
    """Follow the model's registry records (aliases, a fleet-wide pin) on the model topic; false: ignore them."""
    serving_cold_start: bool = False
    """Until the first checkpoint, serve the trainer's untrained model (version 0, from the model settings)."""
    serving_host: str = "127.0.0.1"
    """Where `serve` listens."""
    serving_port: Port = 8080
    """Port `serve` listens on (0: any free port)."""
    # Serving security (README, "Security"): what a node remembers, builds, reads and accepts.
    serving_state_dir: str | None = ".stream-learner/serving-state"
    """Where a node keeps its floor, the highest good version it served (one file per topic and model):
    a restart never serves less. "" in TOML: not kept."""
    serving_allowed_architectures: list[str] = []
    """Model factories and collate hooks (package.module:function) a node may run besides logreg and mlp
    (comma-separated)."""
    serving_max_model_bytes: Positive = 256 * 1024 * 1024
    """Largest weights a manifest may declare (bytes); larger checkpoints are refused before a chunk is read."""
    serving_max_parameters: Positive = 50_000_000
    """Largest network a node builds, counted on the meta device before anything is allocated."""
    serving_max_tensors: Positive = 1024
    """Most tensors a checkpoint's safetensors header may name."""
    serving_max_record_bytes: Annotated[int, Meta(ge=1 << 20)] = 16 * 1024 * 1024
    """Model-topic records larger than this are never received: skipped and counted."""
    serving_window_records: Positive = 4096
    """Chunk records the follower keeps for manifests to come, at most."""
    serving_window_bytes: Positive = 64 * 1024 * 1024
    """Bytes of chunk records the follower keeps, at most (each counted with its key, headers and overhead)."""
    serving_scan_max_records: Positive = 2_000_000
    """How many records the start scan may read back from the end of the topic."""
    serving_scan_max_bytes: Positive = 2 * 1024 * 1024 * 1024
    """How many bytes the start scan may read back from the end of the topic."""
    serving_max_connections: Positive = 1024
    """Open HTTP connections, at most; one more closes the connection idle the longest."""
    serving_workers: Positive = 2
    """Threads that decode and predict large request bodies (small ones have a thread of their own)."""
    serving_max_inflight: Positive = 64
    """Requests admitted at once (and 4 x serving_max_body_bytes of bodies); beyond: 503 with Retry-After."""
    serving_max_body_bytes: Annotated[int, Meta(ge=1024)] = 8 * 1024 * 1024
    """Largest request body (413 beyond)."""
    serving_max_batch_values: Positive = 100_000
    """Most feature values one request may ask for: over its instances, or instances x the model's features (413)."""
    serving_request_timeout_s: Annotated[float, Meta(gt=0)] = 10.0
    """A request must arrive whole, and its answer be taken, within this of its first byte (408 beyond)."""
    serving_idle_timeout_s: Annotated[float, Meta(gt=0)] = 60.0
    """How long a kept-alive connection may wait for its next request."""

    # Observability.
    metrics_port: Port | None = None
    """Serve Prometheus /metrics and /health on this port (off when unset)."""
    health_stall_s: Annotated[float, Meta(gt=0)] = 60.0
    """/health says unhealthy when a role made no progress this long (dependency down, consumer stuck)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """debug, info, warning or error."""
    log_format: Literal["auto", "json", "console"] = "auto"
    """json, console, or auto: json when stderr is not a terminal."""

    def __post_init__(self) -> None:
        if self.security_protocol.startswith("SASL_"):
            if self.sasl_mechanism is None:
                raise ValueError("sasl_mechanism is required when security_protocol is SASL_*")
            if not (self.sasl_username and self.sasl_password):
                raise ValueError("sasl_username and sasl_password are required for SASL")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("ssl_certfile and ssl_keyfile must be set together")
        if self.redis_cluster and self.redis_sentinel_master:
            raise ValueError("redis_cluster and redis_sentinel_master exclude each other (a cluster fails over itself)")
        if self.redis_cluster and not _has_hash_tag(self.joiner_redis_prefix):
            # Without one the join's keys spread over slots and its atomic script cannot run.
            raise ValueError("joiner_redis_prefix needs a hash tag ({...}) when redis_cluster is set")
        if self.joiner_state_ttl_ms < self.joiner_window_ms + self.joiner_late_retention_ms:
            raise ValueError("joiner_state_ttl_ms must be at least joiner_window_ms + joiner_late_retention_ms")

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with secrets masked, for printing and logging.

        Password settings show ``***``; a password inside a URL (``redis_url``,
        or any other value) shows as ``user:***@``.

        >>> Settings(redis_url="redis://app:hunter2@cache:6379/0").redacted()["redis_url"]
        'redis://app:***@cache:6379/0'
        """
        return {k: redact(k, v) for k, v in msgspec.structs.asdict(self).items()}

    @property
    def topics(self) -> dict[str, str]:
        """Role name -> topic name, for every topic of docs/architecture.md."""
        return {
            "predictions": self.topic_predictions,
            "labels": self.topic_labels,
            "examples": self.topic_examples,
            "models": self.topic_models,
            "drift": self.topic_drift,
            "dlq": self.topic_dlq,
        }


FIELDS: tuple[str, ...] = Settings.__struct_fields__

#: Settings whose whole value is a secret: shown as ``***`` wherever printed or logged.
SECRET_FIELDS = frozenset(f for f in FIELDS if is_secret(f))
