"""A frozen pretrained base: what learns (head, LoRA), the state kept, deltas and full checkpoints, precision."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import torch

from stream_learner.checkpoint.codec import decode_tensors, encode_tensors
from stream_learner.checkpoint.reader import LoadedCheckpoint
from stream_learner.config import Settings
from stream_learner.errors import ConfigError
from stream_learner.events import CheckpointManifest
from stream_learner.learn.build import build_learner
from stream_learner.learn.frozen import LoRALinear, check_device, load_base
from stream_learner.learn.learner import LearnerConfig, OnlineLearner
from stream_learner.learn.manifest import build_manifest, layout_for, weights_bytes
from stream_learner.learn.models import ModelSpec, build_model
from stream_learner.serving.failures import ModelLoadError
from stream_learner.serving.model import BuildPolicy, load_served_model

from .streams import AGRAWAL_FEATURES, agrawal_examples

ARCH = "stream_learner.learn.encoder:token_encoder"
LORA = ("blocks.0.q", "blocks.0.v", "blocks.1.q", "blocks.1.v")


def plain_spec(seed: int = 3) -> ModelSpec:
    return ModelSpec(kind=ARCH, task="binary", features=AGRAWAL_FEATURES, classes=["0", "1"], seed=seed)


def write_base(path: Path, *, seed: int = 3, dtype: torch.dtype = torch.float32) -> Path:
    """A 'pretrained' base: every tensor of the plain model but its head (which learns)."""
    state = build_model(plain_spec(seed)).state_dict()
    encode = {k: v.to(dtype) for k, v in state.items() if not k.startswith("head.")}
    path.write_bytes(encode_tensors(encode))
    return path


def lora_config(base_path: Path, **kw) -> LearnerConfig:
    spec = ModelSpec(
        kind=ARCH,
        task="binary",
        features=AGRAWAL_FEATURES,
        classes=["0", "1"],
        seed=3,
        lora_layers=LORA,
        lora_rank=4,
        lora_alpha=8.0,
    )
    return LearnerConfig(
        model_name="m",
        spec=spec,
        base=load_base(base_path),
        trainable=kw.pop("trainable", "lora"),
        head_modules=("head",),
        **kw,
    )


def chunks(examples, size=32):
    for i in range(0, len(examples), size):
        yield examples[i : i + size]


def test_lora_learns_only_adapters_and_head(tmp_path: Path) -> None:
    base = write_base(tmp_path / "base.safetensors")
    learner = OnlineLearner(lora_config(base))
    model = learner.main.model
    assert isinstance(model.get_submodule("blocks.0.q"), LoRALinear)
    learning = {n for n, p in model.named_parameters() if p.requires_grad}
    assert learning == {f"{p}.lora_{x}" for p in LORA for x in "AB"} | {"head.weight", "head.bias"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for chunk in chunks(agrawal_examples(640)):
        learner.process(chunk)
    assert learner.counts["batches"] > 10
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == learning, changed ^ learning  # the base stayed, every adapter and the head moved
    # Optimizer state exists only for what learns.
    assert len(learner.main.optimizer.state) == len(learning)
    tensors, meta = learner.state_dict()
    saved = {k[len("main.model.") :] for k in tensors if k.startswith("main.model.")}
    assert saved == learning and meta["main.base"] == load_base(base).sha256
    # The frozen parameters are the base's own tensors, not copies.
    assert model.get_submodule("embed").weight.data_ptr() == learner.config.base.tensors["embed.weight"].data_ptr()


@pytest.mark.slow
def test_restored_lora_learner_is_bit_identical(tmp_path: Path) -> None:
    base = write_base(tmp_path / "base.safetensors")
    stream = agrawal_examples(960, unlabeled=0.2)
    a = OnlineLearner(lora_config(base))
    for chunk in chunks(stream[:480]):
        a.process(chunk)
    tensors, meta = a.state_dict()
    data = encode_tensors(tensors)  # through bytes, as the state store keeps it
    b = OnlineLearner(lora_config(base))
    b.load_state_dict(decode_tensors(data)[0], msgspec.json.decode(msgspec.json.encode(meta)))
    for chunk in chunks(stream[480:]):
        a.process(chunk)
        b.process(chunk)
    ta, tb = a.state_dict()[0], b.state_dict()[0]
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert a.counts == b.counts and a.counts["batches"] > 20


def test_a_state_on_another_base_is_refused(tmp_path: Path) -> None:
    learner = OnlineLearner(lora_config(write_base(tmp_path / "a.safetensors", seed=3)))
    tensors, meta = learner.state_dict()
    other = OnlineLearner(lora_config(write_base(tmp_path / "b.safetensors", seed=4)))
    with pytest.raises(ValueError, match="learned on base"):
        other.load_state_dict(tensors, meta)


def checkpoint(learner: OnlineLearner, version: int, *, dtype="float32", full_every=3, full=False):
    layout = layout_for(learner, version, dtype=dtype, full_every=full_every, full=full)
    tensors, _ = learner.state_dict()
    frozen = learner.frozen_tensors() if layout is not None and not layout.delta else None
    data = weights_bytes(tensors, "m", layout, frozen)
    manifest = build_manifest(
        learner,
        model="m",
        version=version,
        parent=None,
        input_offsets=[],
        weights=data,
        chunk_bytes=1 << 20,
        layout=layout,
    )
    return manifest, data


def served(manifest: CheckpointManifest, data: bytes, policy: BuildPolicy):
    return load_served_model(LoadedCheckpoint(manifest, decode_tensors(data)[0], {}, "t", 0, 0), policy)


def test_deltas_and_full_checkpoints_serve_what_the_learner_predicts(tmp_path: Path) -> None:
    base_path = write_base(tmp_path / "base.safetensors")
    learner = OnlineLearner(lora_config(base_path))
    for chunk in chunks(agrawal_examples(320)):
        learner.process(chunk)
    delta, delta_bytes = checkpoint(learner, 2)
    full, full_bytes = checkpoint(learner, 3)
    assert delta.layout is not None and delta.layout.delta and delta.layout.base_sha256 == load_base(base_path).sha256
    assert full.layout is not None and not full.layout.delta
    assert not checkpoint(learner, 4, full=True)[0].layout.delta  # on demand (the trainer's SIGUSR1)
    delta_names = set(decode_tensors(delta_bytes)[0])
    assert "model.embed.weight" not in delta_names and "model.blocks.0.q.lora_A" in delta_names
    assert "model.embed.weight" in decode_tensors(full_bytes)[0]
    assert len(delta_bytes) < len(full_bytes) / 4
    rows = [ex.features for ex in agrawal_examples(50, seed=9)]
    want = learner.predictor.predict(rows)
    policy = BuildPolicy.of([ARCH], bases=[load_base(base_path)])
    assert served(delta, delta_bytes, policy).predict(rows) == want
    assert served(full, full_bytes, BuildPolicy.of([ARCH])).predict(rows) == want  # a full one needs no base
    # A delta on a base the node does not hold, or on another one, is refused, by reason.
    other = load_base(write_base(tmp_path / "other.safetensors", seed=5))
    for refusing in (BuildPolicy.of([ARCH]), BuildPolicy.of([ARCH], bases=[other])):
        with pytest.raises(ModelLoadError) as err:
            served(delta, delta_bytes, refusing)
        assert err.value.reason == "no_base"
    # The node's base tensors are shared by the models it builds, not copied per version.
    node_base = load_base(base_path)
    one = served(delta, delta_bytes, BuildPolicy.of([ARCH], bases=[node_base]))
    assert one.network.get_submodule("embed").weight.data_ptr() == node_base.tensors["embed.weight"].data_ptr()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision_is_published_and_served(tmp_path: Path, dtype: str) -> None:
    base_path = write_base(tmp_path / "base.safetensors", dtype=getattr(torch, dtype))  # a base in any precision
    learner = OnlineLearner(lora_config(base_path))
    for chunk in chunks(agrawal_examples(320)):
        learner.process(chunk)
    # The trainer's own state stays float32.
    state = learner.state_dict()[0]
    assert {t.dtype for k, t in state.items() if k.startswith("main.")} <= {torch.float32, torch.int64}
    manifest, data = checkpoint(learner, 1, dtype=dtype, full_every=0)
    tensors = decode_tensors(data)[0]
    assert {t.dtype for k, t in tensors.items() if k.startswith("model.")} == {getattr(torch, dtype)}
    assert tensors["featurizer.mean"].dtype == torch.float64  # statistics keep their precision
    model = served(manifest, data, BuildPolicy.of([ARCH], bases=[load_base(base_path)]))
    assert model.network.get_submodule("head").weight.dtype == torch.float32
    rows = [ex.features for ex in agrawal_examples(50, seed=9)]
    got, want = model.predict(rows), learner.predictor.predict(rows)
    assert max(abs(g["1"] - w["1"]) for g, w in zip(got, want)) < 0.05


def test_head_only_freezes_everything_else(tmp_path: Path) -> None:
    base_path = write_base(tmp_path / "base.safetensors")
    spec = plain_spec()
    learner = OnlineLearner(
        LearnerConfig(model_name="m", spec=spec, base=load_base(base_path), trainable="head", head_modules=("head",))
    )
    assert {n for n, p in learner.main.model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    _, data = checkpoint(learner, 1)
    assert {k for k in decode_tensors(data)[0] if k.startswith("model.")} == {"model.head.weight", "model.head.bias"}


def test_a_frozen_parameter_must_come_from_the_base(tmp_path: Path) -> None:
    state = build_model(plain_spec()).state_dict()
    path = tmp_path / "partial.safetensors"
    kept = {k: v for k, v in state.items() if k != "embed.weight" and not k.startswith("head.")}
    path.write_bytes(encode_tensors(kept))
    with pytest.raises(ValueError, match="not in the base"):
        OnlineLearner(lora_config(path))


def test_settings_build_a_lora_learner_and_check_the_device(tmp_path: Path) -> None:
    base_path = write_base(tmp_path / "base.safetensors")
    settings = Settings(
        trainer_features=AGRAWAL_FEATURES,
        trainer_architecture=ARCH,
        trainer_seed=3,
        trainer_base_weights=str(base_path),
        trainer_trainable="lora",
        trainer_lora_layers=list(LORA),
        trainer_head_modules=["head"],
    )
    learner, _ = build_learner(settings)
    assert learner.spec.lora_layers == LORA and learner.config.base is not None
    with pytest.raises(ConfigError, match="needs trainer_base_weights"):
        build_learner(msgspec.structs.replace(settings, trainer_base_weights=""))
    if not torch.cuda.is_available():  # this machine: a clear error at start, not a crash mid-stream
        with pytest.raises(ConfigError, match=r"trainer_device='cuda'.*no CUDA device"):
            build_learner(msgspec.structs.replace(settings, trainer_device="cuda"))
        with pytest.raises(ConfigError, match="no CUDA device"):
            check_device("cuda:1", what="serving_device")
    assert check_device("cpu", what="trainer_device") == torch.device("cpu")


def test_a_node_checks_its_device_and_base_at_start(tmp_path: Path, keypair) -> None:
    from stream_learner.serving import CheckpointSubscriber, cold_start_model

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"serving_device='cuda'.*no CUDA device"):
            CheckpointSubscriber(Settings(serving_device="cuda"), keypair[1], model="m")
    with pytest.raises(ConfigError, match="serving_base_weights: cannot read"):
        CheckpointSubscriber(Settings(serving_base_weights=str(tmp_path / "absent")), keypair[1], model="m")
    # A cold-start node on a frozen base serves the whole untrained model (the base's values, frozen).
    base_path = write_base(tmp_path / "base.safetensors")
    served = cold_start_model(
        Settings(
            trainer_features=AGRAWAL_FEATURES,
            trainer_architecture=ARCH,
            trainer_seed=3,
            trainer_base_weights=str(base_path),
            trainer_trainable="head",
            trainer_head_modules=["head"],
        )
    )
    assert torch.equal(served.network.get_submodule("embed").weight, load_base(base_path).tensors["embed.weight"])


def test_models_built_from_one_cached_skeleton_stay_apart(tmp_path: Path) -> None:
    base_path = write_base(tmp_path / "base.safetensors")
    learner = OnlineLearner(lora_config(base_path))
    policy = BuildPolicy.of([ARCH], bases=[load_base(base_path)])
    rows = [ex.features for ex in agrawal_examples(20, seed=9)]
    stream = list(chunks(agrawal_examples(320)))
    models, wanted = [], []
    for version in (1, 2):
        for chunk in stream[5 * (version - 1) : 5 * version]:
            learner.process(chunk)
        models.append(served(*checkpoint(learner, version, full_every=0), policy))
        wanted.append(learner.predictor.predict(rows))
    assert wanted[0] != wanted[1]
    assert [m.predict(rows) for m in models] == wanted  # the first is not changed by building the second
    hooked = models[1].network.register_forward_hook(lambda *_: None)
    assert not models[0].network._forward_hooks and served(*checkpoint(learner, 3), policy).network._forward_hooks == {}
    hooked.remove()


def test_all_learns_from_the_base_as_a_start_and_publishes_full_versions(tmp_path: Path) -> None:
    base_path = write_base(tmp_path / "base.safetensors", seed=4)
    base = load_base(base_path)
    learner = OnlineLearner(LearnerConfig(model_name="m", spec=plain_spec(seed=3), base=base, trainable="all"))
    state = learner.main.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.tensors.items())  # the base's values, not the seed's
    assert state["embed.weight"].data_ptr() != base.tensors["embed.weight"].data_ptr()  # copied: it learns
    for chunk in chunks(agrawal_examples(96)):
        learner.process(chunk)
    assert not torch.equal(learner.main.model.state_dict()["embed.weight"], base.tensors["embed.weight"])
    manifest, data = checkpoint(learner, 1)
    assert manifest.layout.base_sha256 == base.sha256 and not manifest.layout.delta
    assert "model.embed.weight" in decode_tensors(data)[0]


@pytest.mark.slow
def test_a_challenger_on_a_frozen_base_is_trained_but_not_published(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from stream_learner.optimize.challenger import SessionChallenger

    learner = OnlineLearner(lora_config(write_base(tmp_path / "base.safetensors")))
    assert learner.start_challenger()
    for chunk in chunks(agrawal_examples(128)):
        learner.process(chunk)
    assert learner.challenger is not None and learner.challenger.frozen  # it learns on the base too

    def output_for(name: str) -> object:
        raise AssertionError(f"nothing may be published, asked for an output of {name}")

    hook = SessionChallenger(output_for=output_for, chunk_bytes=1 << 20)
    hook.session = SimpleNamespace(learner=learner)
    parent, _ = checkpoint(learner, 1)
    assert hook.publish(parent) is None and hook.refused_frozen and not hook.published
