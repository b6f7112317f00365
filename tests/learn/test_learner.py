from __future__ import annotations

import math
import random

import msgspec
import pytest
import torch

from stream_learner.learn.learner import LearnerConfig, OnlineLearner
from stream_learner.learn.models import ModelSpec

from .streams import AGRAWAL_FEATURES, agrawal_examples


def config(**kw) -> LearnerConfig:
    spec = ModelSpec(
        kind=kw.pop("kind", "mlp"), task="binary", features=AGRAWAL_FEATURES, classes=["0", "1"], hidden=[32]
    )
    # Pseudo-labels are off by default (issue 14); these tests exercise them unless told otherwise.
    kw.setdefault("pseudo_enabled", True)
    return LearnerConfig(model_name="m", spec=spec, **kw)


def chunks(examples, size=64):
    for i in range(0, len(examples), size):
        yield examples[i : i + size]


@pytest.mark.slow
def test_learns_agrawal_better_than_chance() -> None:
    learner = OnlineLearner(config())
    for chunk in chunks(agrawal_examples(6000)):
        learner.process(chunk)
    summary = learner.summary()
    assert summary["accuracy_rolling"] > 0.8, summary
    assert learner.counts["labeled"] == 6000 and learner.counts["batches"] > 80


def test_restore_is_bit_identical() -> None:
    stream = agrawal_examples(3000, unlabeled=0.3)
    a = OnlineLearner(config())
    for chunk in chunks(stream[:1600]):
        a.process(chunk)
    tensors, meta = a.state_dict()
    meta = msgspec.json.decode(msgspec.json.encode(meta))  # as stored
    b = OnlineLearner(config())
    b.load_state_dict({k: v.clone() for k, v in tensors.items()}, meta)
    for chunk in chunks(stream[1600:]):
        a.process(chunk)
        b.process(chunk)
    for (ka, va), (kb, vb) in zip(a.main.model.state_dict().items(), b.main.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert a.counts == b.counts and a.summary() == b.summary()


def test_duplicates_and_other_models_are_not_learned() -> None:
    stream = agrawal_examples(200)
    learner = OnlineLearner(config())
    learner.process(stream[:100] + stream[:50] + agrawal_examples(10, model="other", seed=9))
    assert learner.counts["duplicates"] == 50 and learner.counts["other_model"] == 10
    assert learner.counts["labeled"] == 100


def test_unknown_class_is_rejected_with_a_reason() -> None:
    ex = msgspec.structs.replace(agrawal_examples(1)[0], label="maybe")
    result = OnlineLearner(config()).process([ex])
    assert result.rejected[0].reason.startswith("label 'maybe' is not one of")


def test_pseudo_labels_and_late_correction() -> None:
    learner = OnlineLearner(config(pseudo_threshold=0.0))
    base = agrawal_examples(2000)
    for chunk in chunks(base):
        learner.process(chunk)
    unl = agrawal_examples(64, seed=5, unlabeled=1.0)
    learner.process(unl)
    assert learner.counts["pseudo"] == 64
    late = [msgspec.structs.replace(x, kind="late", label="1", example_id=x.example_id + "-late") for x in unl]
    learner.process(late)
    assert learner.counts["late"] == 64
    assert 0.0 <= learner.summary()["pseudo_precision"] <= 1.0
    assert learner.prequential.scores.means["pseudo_precision"].n == 64


def test_high_threshold_skips_pseudo_steps() -> None:
    learner = OnlineLearner(config(pseudo_threshold=1.01))
    learner.process(agrawal_examples(64, unlabeled=1.0))
    assert learner.counts["pseudo"] == 0 and learner.counts["pseudo_skipped"] == 64


def test_absurd_features_never_reach_the_weights() -> None:
    learner = OnlineLearner(config())
    stream = agrawal_examples(3000)
    poisoned = [
        msgspec.structs.replace(x, features={**x.features, "salary": 1e300}) if i % 100 == 0 else x
        for i, x in enumerate(stream)
    ]
    for chunk in chunks(poisoned):
        learner.process(chunk)
    assert all(torch.isfinite(p).all() for p in learner.main.model.parameters())
    assert learner.featurizer.counts["out_of_range"] == 30
    assert math.isfinite(learner.featurizer.mean.sum())


def test_loss_spike_rolls_back() -> None:
    learner = OnlineLearner(config(spike_warmup_batches=5, spike_factor=3.0))
    stream = agrawal_examples(2000)
    for chunk in chunks(stream):
        learner.process(chunk)
    before = {k: v.clone() for k, v in learner.main.model.state_dict().items()}
    # Damage the weights as a bad update would; the next batch's loss spikes.
    with torch.no_grad():
        for p in learner.main.model.parameters():
            p.mul_(-50)
    learner.process(agrawal_examples(64, seed=3))
    assert learner.counts["rollbacks"] == 1
    # Rolled back to the last good weights: those of before the last good step.
    after = learner.main.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # not the damaged ones either
    assert all((after[k] - before[k]).abs().max() < 1.0 for k in before)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_spike_guard_does_not_refuse_batches_with_few_labels_without_a_drift(seed: int) -> None:
    # 10 % labels, batches of 32: about three labels a batch, one mistake makes their mean loss
    # many times the running mean. Before the guard judged labeled losses per example (at
    # least half of them bad, worse than the worst of the recent ones), it refused 3 and 6 of
    # these ~360 batches; no drift here, so none should be.
    learner = OnlineLearner(config(pseudo_enabled=False))
    for chunk in chunks(agrawal_examples(12000, seed=seed, unlabeled=0.9), 32):
        learner.process(chunk)
    assert learner.counts["batches"] > 300
    assert learner.counts["rollbacks"] <= 0.005 * learner.counts["batches"], learner.counts


def test_spike_guard_compares_labeled_losses_per_example() -> None:
    from stream_learner.learn.parts import SpikeGuard

    g = SpikeGuard(factor=5.0, warmup=3, patience=2)
    healthy = [0.02, 0.01, 0.0, 2.5, 0.03, 0.0, 0.01, 0.04]  # one mistake in eight
    for _ in range(40):
        assert g.check(healthy) == "learn"
        g.learned(healthy)
    assert g.check([]) == "learn"  # pseudo-labels only: nothing to judge
    assert g.check([4.0, 0.0]) == "learn"  # two labels: one mistake is no evidence
    assert g.check([0.0, 3.0, 0.0, 0.0]) == "learn"  # a few bad draws
    assert g.check([3.0, 3.0, 0.01]) == "learn"  # as bad as the worst recent examples, no worse
    damaged = [40.0, 35.0, 0.0, 50.0]  # most examples far off: broken weights
    assert g.check(damaged) == "rollback"
    assert g.check(damaged) == "rollback"
    assert g.check(damaged) == "learn"  # the level persisted (patience 2): a new concept, learned
    g.learned(damaged)
    assert g.loss_ema == pytest.approx(31.25)
    # The state survives a save and load exactly; a state from before the per-example statistics loads.
    tensors: dict[str, torch.Tensor] = {}
    meta = g.save(tensors)
    h = SpikeGuard(factor=5.0, warmup=3, patience=2)
    h.load(tensors, msgspec.json.decode(msgspec.json.encode(meta)))
    assert (h.loss_ema, h.weight, list(h.recent), h.good_batches) == (g.loss_ema, g.weight, list(g.recent), 41)
    old = SpikeGuard(factor=5.0, warmup=3, patience=2)
    old.load({}, {"loss_ema": 0.2, "good_batches": 30, "spikes_in_a_row": 0})
    assert old.check(healthy) == "learn" and old.check(damaged) == "rollback"


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_both_builtin_models_train(kind: str) -> None:
    learner = OnlineLearner(config(kind=kind))
    for chunk in chunks(agrawal_examples(1000)):
        learner.process(chunk)
    assert learner.counts["batches"] > 10


def test_dedup_window_forgets_the_oldest_first_and_snapshots_in_order() -> None:
    from collections import OrderedDict

    from stream_learner.learn.parts import DedupWindow

    rng = random.Random(4)
    window, reference = DedupWindow(50), OrderedDict()
    for _ in range(2000):
        digest = bytes([rng.randrange(120)]) * 16  # repeats, inside and outside the window
        duplicate = digest in reference
        assert window.add(digest) is not duplicate
        if not duplicate:
            reference[digest] = None
            if len(reference) > 50:
                reference.popitem(last=False)
        assert window.snapshot() == b"".join(reference)
    restored = DedupWindow(50)
    restored.restore(window.snapshot())
    assert restored.snapshot() == window.snapshot() and restored.members == window.members


def test_pseudo_labels_survive_a_restore_in_order_old_and_new_layouts() -> None:
    stream = agrawal_examples(1500, unlabeled=0.4)
    odd = [
        msgspec.structs.replace(x, prediction_event_id=f"id\0{i}", example_id=f"odd{i}")
        for i, x in enumerate(agrawal_examples(64, seed=8, unlabeled=1.0))
    ]
    for extra in ([], odd):  # an id with a NUL falls back to pairs in the meta
        a = OnlineLearner(config(pseudo_threshold=0.5))
        for chunk in chunks(stream + extra):
            a.process(chunk)
        assert len(a.prequential.pseudo) > 100
        tensors, meta = a.state_dict()
        assert (meta["pseudo"] is None) == (not extra)
        b = OnlineLearner(config(pseudo_threshold=0.5))
        b.load_state_dict(tensors, msgspec.json.decode(msgspec.json.encode(meta)))
        assert list(b.prequential.pseudo.labels.items()) == list(a.prequential.pseudo.labels.items())
    # A snapshot written before the map moved into tensors keeps it as pairs in the meta.
    old_meta = {**meta, "pseudo": [[k, v] for k, v in a.prequential.pseudo.labels.items()]}
    old_tensors = {k: v for k, v in tensors.items() if not k.startswith("pseudo.")}
    c = OnlineLearner(config(pseudo_threshold=0.5))
    c.load_state_dict(old_tensors, old_meta)
    assert list(c.prequential.pseudo.labels.items()) == list(a.prequential.pseudo.labels.items())


@pytest.mark.parametrize("scale, skipped", [(math.inf, True), (1e20, False)])
def test_non_finite_gradients_skip_the_batch_and_huge_finite_ones_do_not(scale: float, skipped: bool) -> None:
    # A finite loss with non-finite gradients is skipped; gradients that are finite but whose
    # norm overflows float32 are clipped and applied, as clip_grad_norm_ after a per-tensor check did.
    learner = OnlineLearner(config())
    stream = agrawal_examples(640)
    for chunk in chunks(stream[:320]):
        learner.process(chunk)
    hooks = [p.register_hook(lambda g: torch.full_like(g, scale)) for p in learner.main.model.parameters()]
    before = {k: v.clone() for k, v in learner.main.model.state_dict().items()}
    batches = learner.counts["batches"]
    learner.process(stream[320:384])
    for h in hooks:
        h.remove()
    after = learner.main.model.state_dict()
    assert learner.counts["skipped_non_finite"] == int(skipped)
    assert learner.counts["batches"] == batches + (not skipped)
    assert all(torch.equal(before[k], after[k]) for k in before) == skipped
    assert all(torch.isfinite(v).all() for v in after.values())
