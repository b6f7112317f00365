"""Delta checkpoints on the real broker: a LoRA trainer on a frozen base publishes deltas and full versions;
nodes holding the base verify and apply them, in order, across a restart; a delta on another base is refused
and counted while the last good model stays."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch

from stream_learner.bus import make_producer
from stream_learner.checkpoint import publish_checkpoint, weights_info
from stream_learner.checkpoint.signing import generate_keypair, load_private_key, load_public_key
from stream_learner.config import Settings, settings_env
from stream_learner.events import encode
from stream_learner.learn.frozen import load_base
from stream_learner.learn.manifest import weights_bytes
from stream_learner.learn.trainer import Trainer
from stream_learner.local import free_port
from stream_learner.metrics import Metrics
from stream_learner.serving import CheckpointSubscriber

from ..learn.streams import AGRAWAL_FEATURES, agrawal_examples
from ..learn.test_frozen_base import ARCH, LORA, write_base
from .conftest import step_until, wait_for
from .test_node import call

EVERY = 320  # examples per version
ROWS = [ex.features for ex in agrawal_examples(40, seed=21)]


def failures(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("stream_learner_serving_swap_failures_total", {"reason": reason}) or 0.0


@pytest.fixture
def lsettings(settings: Settings, tmp_path: Path) -> Settings:
    private_pem, public_pem = generate_keypair()
    (tmp_path / "k.pem").write_bytes(private_pem)
    (tmp_path / "k.pub.pem").write_bytes(public_pem)
    base = write_base(tmp_path / "base.safetensors")
    return msgspec.structs.replace(
        settings,
        trainer_model="m",
        trainer_features=AGRAWAL_FEATURES,
        trainer_classes=["0", "1"],
        trainer_architecture=ARCH,
        trainer_seed=3,
        trainer_base_weights=str(base),
        trainer_trainable="lora",
        trainer_lora_layers=list(LORA),
        trainer_lora_rank=4,
        trainer_lora_alpha=8.0,
        trainer_head_modules=["head"],
        trainer_full_checkpoint_every=3,
        trainer_signing_key=str(tmp_path / "k.pem"),
        trainer_state_dir=str(tmp_path / "state"),
        trainer_checkpoint_every_examples=EVERY,
        trainer_checkpoint_every_s=3600,
        trainer_max_wait_ms=200,
        trainer_group_id=f"{settings.topic_examples}-trainer",
        serving_public_keys=[str(tmp_path / "k.pub.pem")],
        serving_allowed_architectures=[ARCH],
        serving_base_weights=str(base),
        serving_state_dir=str(tmp_path / "serving-state"),
    )


class Run:
    """The trainer, fed in phases; what its learner predicts for ROWS at each version."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stream = agrawal_examples(12 * EVERY, seed=5)
        self.produced = 0
        self.predicted: dict[int, list[Any]] = {}
        self.one: dict[int, Any] = {}  # ROWS[0] alone: a node answers a one-row request with a batch of one
        self.trainer = Trainer(settings, on_checkpoint=self._published)

    def _published(self, manifest: Any) -> None:
        self.predicted[manifest.version] = self.trainer.learner.predictor.predict(ROWS)
        self.one[manifest.version] = self.trainer.learner.predictor.predict(ROWS[:1])[0]

    def versions(self, n: int) -> None:
        """Produce and learn ``n`` more versions' worth of examples."""
        producer = make_producer(self.settings)
        for ex in self.stream[self.produced : self.produced + n * EVERY]:
            producer.send(self.settings.topic_examples, key=ex.request_id.encode(), value=encode(ex))
        producer.flush()
        producer.close()
        self.produced += n * EVERY
        for _ in range(10_000):
            self.trainer.step()
            if sum(self.trainer.offsets.values()) >= self.produced and not self.trainer.buffer:
                return
        raise AssertionError("the trainer did not catch up")


def node(settings: Settings, served: list[int], metrics: Metrics | None = None, **over: Any) -> CheckpointSubscriber:
    s = msgspec.structs.replace(settings, **over)
    return CheckpointSubscriber(
        s,
        load_public_key(settings.serving_public_keys[0]),
        metrics=metrics or Metrics(),
        on_swap=lambda new, old: served.append(new.version),
    )


@pytest.mark.slow
def test_deltas_are_verified_applied_in_order_across_a_restart_and_refused_on_another_base(
    lsettings: Settings, tmp_path: Path
) -> None:
    run = Run(lsettings)
    try:
        run.versions(3)  # v1, v2 deltas, v3 full
        layouts = {m.version: m.layout for m in run.trainer.published}
        assert [layouts[v].delta for v in (1, 2, 3)] == [True, True, False]
        assert {lay.base_sha256 for lay in layouts.values()} == {run.trainer.learner.config.base.sha256}
        sizes = {m.version: m.weights.size for m in run.trainer.published}
        assert sizes[1] * 4 < sizes[3]  # a delta is the adapters and the head, a full one everything

        served: list[int] = []
        first = node(lsettings, served)
        step_until(first, lambda: first.version == 3, what="v3 at start")
        run.versions(1)  # v4: a delta, followed
        step_until(first, lambda: first.version == 4, what="v4 followed")
        assert first.current.manifest.layout.delta
        assert first.current.predict(ROWS) == run.predicted[4]
        first.stop()

        run.versions(3)  # v5 delta, v6 full, v7 delta: published while the node is down
        served_again: list[int] = []
        second = node(lsettings, served_again)
        # The restarted node finds the newest version, a delta, and applies it to its base.
        step_until(second, lambda: second.version == 7, what="v7 at restart")
        assert second.current.manifest.layout.delta and second.current.predict(ROWS) == run.predicted[7]
        for v in (8, 9):  # then the deltas to come, each verified and applied, in order
            run.versions(1)
            step_until(second, lambda v=v: second.version == v, what=f"v{v}")
            assert second.current.predict(ROWS) == run.predicted[v]
        assert served_again == [7, 8, 9] and second.status()["failures"] == 0
        # Rollback to a delta: any version is the base plus its own delta, no chain to replay.
        assert second.pin(8).predict(ROWS) == run.predicted[8] and second.version == 8
        second.unpin()
        assert second.version == 9 and second.current.predict(ROWS) == run.predicted[9]

        # A signed delta on another base (a trainer given another base file): refused, counted, v9 stays.
        other = write_base(tmp_path / "other.safetensors", seed=8)
        latest = run.trainer.published[-1]
        assert latest.version == 9 and not latest.layout.delta  # every third version is full
        layout = msgspec.structs.replace(latest.layout, base_sha256=load_base(other).sha256, delta=True)
        state = run.trainer.session.store.load()
        data = weights_bytes(state.tensors, "m", layout)  # v9's state, as a delta
        wrong = msgspec.structs.replace(
            latest,
            version=10,
            parent=9,
            layout=layout,
            weights=weights_info(data, lsettings.trainer_chunk_bytes),
            signature=None,
        )
        producer = make_producer(lsettings)
        try:
            publish_checkpoint(
                producer,
                lsettings.topic_models,
                wrong,
                data,
                load_private_key(lsettings.trainer_signing_key),
                chunk_bytes=lsettings.trainer_chunk_bytes,
            )
        finally:
            producer.close()
        metrics = second.metrics
        step_until(second, lambda: failures(metrics, "no_base") == 1, what="the delta on another base refused")
        assert second.version == 9 and second.current.predict(ROWS) == run.predicted[9]

        # A node holding a third base refuses the newest version, a delta, and serves the newest full one.
        third_metrics = Metrics()
        third = node(
            lsettings,
            [],
            third_metrics,
            serving_base_weights=str(write_base(tmp_path / "third.safetensors", seed=9)),
            serving_state_dir=str(tmp_path / "third-state"),
        )
        step_until(third, lambda: third.version is not None, what="a version at start")
        assert third.version == 9 and not third.current.manifest.layout.delta
        assert third.current.predict(ROWS) == run.predicted[9]
        assert failures(third_metrics, "no_base") == 1, third.status()
        third.stop()
        second.stop()
    finally:
        run.trainer.close()


@pytest.mark.slow
def test_the_serve_process_applies_deltas_across_a_sigkill_and_refuses_a_missing_device(
    lsettings: Settings, tmp_path: Path
) -> None:
    port = free_port()
    env = settings_env(msgspec.structs.replace(lsettings, serving_port=port))
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "stream_learner.cli", "serve"]
    run = Run(lsettings)

    def serving(proc: subprocess.Popen, version: int) -> bool:
        try:
            return call(url, "GET", "/health")[1].get("version") == version
        except OSError:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            return False

    def check(version: int) -> None:
        """The node serves exactly that version's published weights, a delta on the base, and predicts what
        the learner did at that version (to float32 rounding: the node's torch may use other threads)."""
        _, model = call(url, "GET", "/model")
        published = next(m for m in run.trainer.published if m.version == version)
        assert model["weights_sha256"] == published.weights.sha256 and model["layout"]["delta"], model
        got = call(url, "POST", "/predict", {"features": ROWS[0]})[1]["prediction"]
        assert got == pytest.approx(run.one[version], rel=1e-6, abs=1e-9)

    procs: list[subprocess.Popen] = []
    try:
        run.versions(4)  # v3 full, v4 a delta
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        wait_for(lambda: serving(procs[-1], 4), timeout_s=90, what="the node to serve the delta v4")
        check(4)
        procs[-1].send_signal(signal.SIGKILL)
        procs[-1].wait(10)
        run.versions(3)  # v5, v7 deltas, v6 full, while the node is down
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        wait_for(lambda: serving(procs[-1], 7), timeout_s=90, what="the restarted node to serve the delta v7")
        check(7)
        run.versions(1)
        wait_for(lambda: serving(procs[-1], 8), timeout_s=60, what="the next delta, v8")
        check(8)
        _, model = call(url, "GET", "/model")
        assert model["status"]["failures"] == 0, model
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.communicate(timeout=30)
        run.trainer.close()
    if not torch.cuda.is_available():  # a device this machine lacks: a clear error at start
        out = subprocess.run(
            cmd,
            env=settings_env(msgspec.structs.replace(lsettings, serving_device="cuda", serving_port=free_port())),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 1 and "no CUDA device" in out.stdout + out.stderr, out.stdout + out.stderr
