"""The real trainer publishes, the subscriber follows: every version served, the trainer's predictions."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from stream_learner.bus import make_producer
from stream_learner.checkpoint.signing import generate_keypair, load_public_key
from stream_learner.config import Settings
from stream_learner.events import encode
from stream_learner.learn.trainer import Trainer
from stream_learner.serving import CheckpointSubscriber

from ..learn.streams import AGRAWAL_FEATURES, agrawal_examples
from .conftest import wait_for


@pytest.mark.slow
def test_a_subscriber_serves_each_checkpoint_the_trainer_publishes(settings: Settings, tmp_path: Path) -> None:
    private_pem, public_pem = generate_keypair()
    (tmp_path / "k.pem").write_bytes(private_pem)
    (tmp_path / "k.pub.pem").write_bytes(public_pem)
    tsettings = msgspec.structs.replace(
        settings,
        trainer_model="m",
        trainer_features=AGRAWAL_FEATURES,
        trainer_classes=["0", "1"],
        trainer_hidden=[16],
        trainer_signing_key=str(tmp_path / "k.pem"),
        trainer_state_dir=str(tmp_path / "state"),
        trainer_checkpoint_every_examples=1000,
        trainer_checkpoint_every_s=3600,
        trainer_max_wait_ms=200,
        trainer_group_id=f"{settings.topic_examples}-trainer",
        serving_public_keys=[str(tmp_path / "k.pub.pem")],
    )
    producer = make_producer(tsettings)
    for ex in agrawal_examples(3000):
        producer.send(tsettings.topic_examples, key=ex.request_id.encode(), value=encode(ex))
    producer.flush()
    producer.close()

    served: list[int] = []
    # Started before anything is published: the model name defaults to trainer_model.
    sub = CheckpointSubscriber(
        tsettings, load_public_key(public_pem), on_swap=lambda new, old: served.append(new.version)
    ).start(wait_s=None)
    trainer = Trainer(tsettings)
    try:
        for _ in range(10_000):
            trainer.step()
            if sum(trainer.offsets.values()) >= 3000 and not trainer.buffer:
                break
        trainer.checkpoint()
        published = [m.version for m in trainer.published]
        assert len(published) >= 3
        # served grows in on_swap, which runs just after the swap itself.
        wait_for(lambda: served and served[-1] == published[-1], what=f"v{published[-1]}")
        # Each version once, in order (the follower may start after v1 if the trainer is quick).
        assert served == published[published.index(served[0]) :]
        model = sub.current
        assert model.manifest == trainer.published[-1] and sub.status()["failures"] == 0

        # The served model predicts what the trainer's learner, in the state it
        # published, predicts for the same rows (it reports its confidence per row).
        rows = agrawal_examples(200, seed=11)
        predictions = model.predict([ex.features for ex in rows])
        result = trainer.learner.process(rows)
        assert [max(p.values()) for p in predictions] == result.confidences
    finally:
        trainer.close()
        sub.stop()
