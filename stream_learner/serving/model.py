"""One verified checkpoint, built into a model ready to serve.

:func:`load_served_model` turns a :class:`~stream_learner.checkpoint.reader.LoadedCheckpoint`
(signature, chunks and digest already verified) into a :class:`ServedModel`:
a fresh ``nn.Module`` built from the signed architecture, its weights
loaded strictly, the featurizer and target statistics checked and loaded,
eval mode with the parameters frozen, then a smoke prediction that must be
finite. Anything else raises :class:`~stream_learner.serving.failures.ModelLoadError`
and the model is not served.

A served model has no math of its own: it predicts through the learner's
:class:`~stream_learner.learn.predictor.Predictor`, with a featurizer built
as the learner builds its own (:meth:`~stream_learner.learn.learner.LearnerConfig.featurizer`)
and a :class:`~stream_learner.learn.target.TargetScaler`, so a served
prediction is the learner's by construction.

**Trust.** A signing key is not trusted to name code: a node builds only
the built-in architectures and the factories its operator allowed
(:class:`BuildPolicy`, ``serving_allowed_architectures``). Before anything
real is built, the architecture is bounded (features, classes, layers) and
built on torch's ``meta`` device, which allocates nothing: its parameter
count is checked against the policy and its names, shapes and dtypes
against the checkpoint's tensors. Only then is the network made, from the
checkpoint's own tensors. The featurizer and target statistics must be
finite and in range (counts and sums of squares not negative).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checkpoint.reader import LoadedCheckpoint
from ..events import MAX_CLASSES, MAX_FEATURES, CheckpointManifest
from ..learn.featurizer import STATS, TOKENIZER_PREFIX, Featurizer, attach_tokenizers
from ..learn.frozen import DTYPES, BaseWeights
from ..learn.learner import LearnerConfig
from ..learn.models import ModelSpec, build_model
from ..learn.predictor import Predictor
from ..learn.target import TargetScaler
from .failures import ModelLoadError

__all__ = ["BUILT_IN", "BuildPolicy", "ServedModel", "load_served_model"]

#: The architectures every node may build.
BUILT_IN = frozenset({"logreg", "mlp"})
#: Hidden layers an architecture may have, at most.
MAX_LAYERS = 64


@dataclass(frozen=True)
class BuildPolicy:
    """What a node agrees to build from a signed architecture.

    ``allowed``: the architecture kinds (``logreg``, ``mlp``, and the
    ``package.module:function`` factories named in
    ``serving_allowed_architectures``); ``max_parameters``: of the network,
    counted on the meta device before anything is allocated.
    """

    allowed: frozenset[str] = BUILT_IN
    max_parameters: int = 50_000_000
    max_layers: int = MAX_LAYERS
    max_features: int = MAX_FEATURES
    #: The frozen bases this node holds, by SHA-256 (``serving_base_weights``): what deltas apply to.
    bases: Mapping[str, BaseWeights] = dataclasses.field(default_factory=dict, compare=False)
    #: Where the networks run (``serving_device``, checked at start).
    device: str = "cpu"

    @classmethod
    def of(
        cls,
        factories: Iterable[str] = (),
        max_parameters: int = 50_000_000,
        *,
        bases: Iterable[BaseWeights] = (),
        device: str = "cpu",
    ) -> BuildPolicy:
        """The built-ins plus ``factories``, with the ``bases`` held."""
        return cls(
            allowed=BUILT_IN | frozenset(factories),
            max_parameters=max_parameters,
            bases={b.sha256: b for b in bases},
            device=device,
        )


DEFAULT_POLICY = BuildPolicy()

Rows = Sequence[Mapping[str, Any]]
Answer = float | dict[str, float]


@dataclass(frozen=True, eq=False, repr=False)
class ServedModel:
    """One checkpoint, built and ready: what a request uses, never mutated.

    ``predict`` is :meth:`Predictor.predict <stream_learner.learn.predictor.Predictor.predict>`,
    the learner's own path: the features are standardized with the
    checkpoint's featurizer statistics (which prediction never updates),
    the network runs in eval mode without autograd, and its output becomes
    class probabilities or a regression value in target units. For the same
    batch of rows the values are the learner's bit for bit; a row predicted
    in a batch of another size may differ in float32 rounding (about 1e-7
    relative), as torch's CPU kernels depend on the batch shape.
    """

    model: str
    version: int
    manifest: CheckpointManifest
    predictor: Predictor
    loaded_at: float  # time.time() when it became current (when it was built, until then)
    partition: int = -1  # where its manifest record is on the model topic
    offset: int = -1

    def __repr__(self) -> str:
        return f"ServedModel({self.model!r}, version={self.version}, task={self.spec.task!r})"

    @property
    def spec(self) -> ModelSpec:
        """The signed architecture."""
        return self.predictor.spec

    @property
    def network(self) -> nn.Module:
        """The network, in eval mode, parameters frozen."""
        return self.predictor.network

    @property
    def featurizer(self) -> Featurizer:
        """The checkpoint's featurizer (its statistics are never updated here)."""
        return self.predictor.featurizer

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names in output order (empty for regression)."""
        return self.predictor.classes

    @property
    def target_mean(self) -> float:
        """The regression target's mean the outputs are de-standardized with."""
        return self.predictor.target.mean_std()[0]

    @property
    def target_std(self) -> float:
        """The regression target's standard deviation the outputs are de-standardized with."""
        return self.predictor.target.mean_std()[1]

    def outputs(self, rows: Rows) -> torch.Tensor:
        """The network's raw output for ``rows``: logits, or standardized regression values."""
        return self.predictor.forward(self.predictor.featurize(rows))

    def predict(self, rows: Rows) -> list[Answer]:
        """Per row, a regression value or ``{class name: probability}``, as ``PredictionEvent.prediction`` takes it.

        A feature that is absent, ``None``, NaN or out of range is missing
        (imputed); a feature the model does not know is ignored; a value that
        does not fit its declared input raises
        :class:`~stream_learner.learn.featurizer.RowsRefused` (an
        :class:`~stream_learner.errors.EventError` naming the feature).
        """
        return self.predictor.predict(rows)

    def predict_one(self, features: Mapping[str, Any]) -> Answer:
        """:meth:`predict` for one row."""
        return self.predict([features])[0]


def load_served_model(checkpoint: LoadedCheckpoint, policy: BuildPolicy = DEFAULT_POLICY) -> ServedModel:
    """Build the model a verified checkpoint describes, ready to serve.

    The signed ``architecture`` must be one ``policy`` allows
    (``reason="not_allowed"``) and within its bounds (``reason="limit"``);
    it is built on the meta device first and the ``model.*`` tensors must
    match it exactly (the same names, shapes and dtypes, nothing missing or
    extra); the featurizer (``featurizer.*``) and target (``target``)
    statistics must be there, one finite value per feature, counts and sums
    of squares not negative (``reason="state"``). Only then is the network
    made, holding the checkpoint's tensors; it is put in eval mode with its
    parameters frozen, and a smoke prediction must give finite outputs of
    the right shape. Raises :class:`ModelLoadError` otherwise.

    >>> import torch
    >>> from stream_learner.events import CheckpointManifest, WeightsInfo
    >>> spec = ModelSpec(kind="logreg", task="binary", features=["a"], classes=["no", "yes"])
    >>> manifest = CheckpointManifest(
    ...     model="churn", version=3, parent=2, created_at=0, input_offsets=[], counts={}, metrics={},
    ...     drift_state={}, feature_spec=["a"], architecture=spec.to_dict(),
    ...     weights=WeightsInfo(format="safetensors", size=1, chunks=1, sha256="0" * 64))
    >>> tensors = {"model.weight": torch.tensor([[2.0], [-2.0]]), "model.bias": torch.zeros(2),
    ...            "featurizer.count": torch.tensor([0.0], dtype=torch.float64),
    ...            "featurizer.mean": torch.tensor([0.0], dtype=torch.float64),
    ...            "featurizer.m2": torch.tensor([0.0], dtype=torch.float64),
    ...            "target": torch.zeros(3, dtype=torch.float64)}
    >>> served = load_served_model(LoadedCheckpoint(manifest, tensors, {}, "sl.models", 0, 7))
    >>> served
    ServedModel('churn', version=3, task='binary')
    >>> {k: round(p, 4) for k, p in served.predict_one({"a": 0.5}).items()}
    {'no': 0.8808, 'yes': 0.1192}
    >>> try:
    ...     load_served_model(LoadedCheckpoint(manifest, {**tensors, "model.bias": torch.zeros(3)}, {}, "t", 0, 7))
    ... except ModelLoadError as exc:
    ...     print(exc)
    churn v3: model.bias has shape [3] dtype torch.float32, the architecture wants shape [2] dtype torch.float32
    """
    manifest = checkpoint.manifest
    what = f"{manifest.model} v{manifest.version}"
    spec = _spec_from_manifest(manifest, policy)
    for code in (spec.kind, spec.collate):
        if code and code not in policy.allowed:
            raise ModelLoadError(
                f"{what}: {'architecture' if code == spec.kind else 'collate hook'} {code!r} is not allowed on "
                f"this node (allowed: {sorted(policy.allowed)}; see serving_allowed_architectures)",
                "not_allowed",
            )
    try:
        skeleton = _meta_skeleton(spec)
    except Exception as exc:  # an allowed factory may raise anything; the model is refused
        raise ModelLoadError(f"{what}: cannot build architecture {spec.kind!r}: {exc}") from exc
    if not isinstance(skeleton, nn.Module):
        raise ModelLoadError(f"{what}: architecture {spec.kind!r} did not build an nn.Module")
    n_parameters = sum(t.numel() for t in skeleton.state_dict().values())
    if n_parameters > policy.max_parameters:
        raise ModelLoadError(
            f"{what}: architecture {spec.kind!r} has {n_parameters} parameters, the limit is {policy.max_parameters}",
            "limit",
        )
    tensors = _with_base(manifest, checkpoint.tensors, policy, what)
    layout = manifest.layout
    published = DTYPES[layout.dtype] if layout is not None and layout.dtype != "float32" else None
    weights = _strict_weights(skeleton, tensors, what, published)
    _check_statistics(tensors, spec, what)
    if policy.device != "cpu":
        weights = {k: v.to(policy.device) for k, v in weights.items()}
    network = _materialize(skeleton, spec, weights, what)
    network.eval()
    network.requires_grad_(False)

    # Built as the trainer builds its own: LearnerConfig's clip and range (the
    # manifest does not carry them and the trainer never changes them).
    try:
        if spec.inputs:  # each text reads with the tokenizer the checkpoint carries, of the signed digest
            spec = dataclasses.replace(spec, inputs=attach_tokenizers(spec.inputs, tensors))
        featurizer = LearnerConfig(model_name=manifest.model, spec=spec).featurizer()
        featurizer.load_state_dict(tensors)
    except ValueError as exc:
        raise ModelLoadError(f"{what}: {exc}") from None
    target = TargetScaler()
    target.load_tensor(tensors["target"])

    served = ServedModel(
        model=manifest.model,
        version=manifest.version,
        manifest=manifest,
        predictor=Predictor(spec, featurizer, target, network),
        loaded_at=time.time(),
        partition=checkpoint.partition,
        offset=checkpoint.offset,
    )
    _smoke(served, what)
    return served


#: Meta-device models by signed architecture (at most _SKELETON_CACHE): a delta of a large model is swapped
#: in tens of milliseconds, and building its skeleton (hundreds of layers' constructors) was most of them.
_SKELETONS: OrderedDict[str, nn.Module] = OrderedDict()
_SKELETON_CACHE = 4
_SKELETONS_LOCK = threading.Lock()


def _meta_skeleton(spec: ModelSpec) -> nn.Module:
    """A fresh meta-device model of ``spec`` (shapes and counts only: nothing is allocated): a structural
    copy of one built before for the same architecture (see :func:`_structure`)."""
    key = json.dumps(spec.to_dict(), sort_keys=True, default=str)
    with _SKELETONS_LOCK:
        template = _SKELETONS.get(key)
        if template is not None:
            _SKELETONS.move_to_end(key)
    if template is None:
        with torch.device("meta"):
            template = build_model(spec)
        if not isinstance(template, nn.Module):
            return template  # refused by the caller, never cached
        with _SKELETONS_LOCK:
            _SKELETONS[key] = template
            while len(_SKELETONS) > _SKELETON_CACHE:
                _SKELETONS.popitem(last=False)
    return _structure(template)


def _structure(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s tree: new module objects with their own parameter, buffer and child tables,
    holding the template's (meta) tensors until the caller assigns its own in their place (which
    ``load_state_dict(assign=True)`` does, table entry by table entry: the template is never touched).
    Ten times cheaper than ``copy.deepcopy`` for a model of hundreds of layers."""
    clone = copy.copy(module)
    # Every table of its own (parameters, buffers, hooks, ...): nothing done to the copy reaches the template.
    for name, value in vars(module).items():
        if isinstance(value, (dict, set, list)):
            clone.__dict__[name] = copy.copy(value)
    clone.__dict__["_modules"] = {
        name: _structure(child) if child is not None else None for name, child in module._modules.items()
    }
    return clone


def _materialize(skeleton: nn.Module, spec: ModelSpec, weights: Mapping[str, torch.Tensor], what: str) -> nn.Module:
    """The network holding ``weights``: the meta skeleton given the checkpoint's tensors (no second
    copy, no random init), or, for a module with state outside its state dict, a real build."""
    try:
        skeleton.load_state_dict(weights, strict=True, assign=True)
        if not any(t.is_meta for t in (*skeleton.parameters(), *skeleton.buffers())):
            return skeleton
        network = build_model(spec)  # an allowed factory's module with buffers it does not save
        network.load_state_dict(weights, strict=True)
        return network
    except Exception as exc:  # noqa: BLE001 - whatever loading raises, the model is refused
        raise ModelLoadError(f"{what}: weights do not load into the architecture: {exc}") from None


def _spec_from_manifest(manifest: CheckpointManifest, policy: BuildPolicy = DEFAULT_POLICY) -> ModelSpec:
    """The signed architecture as a :class:`ModelSpec`, bounded, checked against the feature spec."""
    arch = dict(manifest.architecture)
    sizes = {"features": policy.max_features, "classes": MAX_CLASSES, "hidden": policy.max_layers}
    for name, limit in sizes.items():
        if isinstance(arch.get(name), list) and len(arch[name]) > limit:
            raise ModelLoadError(f"architecture {name} has {len(arch[name])} entries, the limit is {limit}", "limit")
    if len(manifest.feature_spec) > policy.max_features:
        raise ModelLoadError(
            f"feature_spec has {len(manifest.feature_spec)} names, the limit is {policy.max_features}", "limit"
        )
    known = {f.name for f in dataclasses.fields(ModelSpec)}
    if unknown := sorted(set(arch) - known):
        raise ModelLoadError(f"architecture has fields this reader does not know: {unknown}")
    try:
        for name in ("features", "classes", "hidden"):
            if name in arch:
                if not isinstance(arch[name], list):
                    raise TypeError(f"{name} must be a list, got {type(arch[name]).__name__}")
                arch[name] = tuple(arch[name])
        if not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in arch.get("hidden", ())):
            raise ValueError(f"hidden widths must be positive integers, got {list(arch['hidden'])}")
        spec = ModelSpec(**arch)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"architecture {manifest.architecture!r} is not a model spec: {exc}") from None
    if list(spec.features) != list(manifest.feature_spec):
        raise ModelLoadError(
            f"architecture features {list(spec.features)} differ from the manifest's "
            f"feature_spec {manifest.feature_spec}"
        )
    return spec


def _with_base(
    manifest: CheckpointManifest, tensors: Mapping[str, torch.Tensor], policy: BuildPolicy, what: str
) -> Mapping[str, torch.Tensor]:
    """A delta's tensors with the frozen ones of the base it names (the delta's own win), or the
    tensors as they are (a full checkpoint). A delta on a base this node does not hold is refused
    (``reason="no_base"``): the last good model stays."""
    layout = manifest.layout
    if layout is None or not layout.delta:
        return tensors
    base = policy.bases.get(layout.base_sha256 or "")
    if base is None:
        held = ", ".join(sorted(k[:12] + "..." for k in policy.bases)) or "none (serving_base_weights)"
        raise ModelLoadError(
            f"{what} is a delta on base {(layout.base_sha256 or '?')[:12]}..., this node holds {held}", "no_base"
        )
    return {**{f"model.{k}": v for k, v in base.tensors.items()}, **tensors}


def _strict_weights(
    network: nn.Module, tensors: Mapping[str, torch.Tensor], what: str, published: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The ``model.*`` tensors, renamed for ``network``: the names, shapes and dtypes it has, no more, no less.

    ``published``: the precision the manifest's layout declares; floating tensors in it are cast to
    the architecture's dtype (a node computes as the trainer does), any other dtype is refused.
    """
    weights = {name[len("model.") :]: t for name, t in tensors.items() if name.startswith("model.")}
    if published is not None:
        expected_dtypes = {k: v.dtype for k, v in network.state_dict().items()}
        for name, t in list(weights.items()):
            want_dtype = expected_dtypes.get(name)
            if want_dtype is not None and want_dtype.is_floating_point and t.dtype == published:
                weights[name] = t.to(want_dtype)
    expected = network.state_dict()
    if missing := sorted(set(expected) - set(weights)):
        raise ModelLoadError(f"{what}: weights lack {['model.' + k for k in missing]} that the architecture has")
    if extra := sorted(set(weights) - set(expected)):
        raise ModelLoadError(f"{what}: weights have {['model.' + k for k in extra]} that the architecture lacks")
    for name, want in expected.items():
        got = weights[name]
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise ModelLoadError(
                f"{what}: model.{name} has shape {list(got.shape)} dtype {got.dtype}, the architecture "
                f"wants shape {list(want.shape)} dtype {want.dtype}"
            )
    return weights


def _check_statistics(tensors: Mapping[str, torch.Tensor], spec: ModelSpec, what: str) -> None:
    """Exactly the featurizer statistics (a finite float per numeric feature each), each text's tokenizer
    and the target's 3, besides the weights; counts and sums of squared deviations not negative (a
    negative variance has no square root)."""
    n = sum(1 for i in spec.inputs if i.kind == "numeric") if spec.inputs else len(spec.features)
    expected = {*STATS, "target", *(TOKENIZER_PREFIX + i.name for i in spec.inputs if i.kind == "text")}
    others = {name for name in tensors if not name.startswith("model.")}
    if others != expected:
        raise ModelLoadError(f"{what}: expected statistics {sorted(expected)}, the weights have {sorted(others)}")
    for name in STATS:
        t = tensors[name]
        if tuple(t.shape) != (n,) or not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise ModelLoadError(f"{what}: {name} must be {n} finite floats, got shape {list(t.shape)} {t.dtype}")
    target = tensors["target"]
    if tuple(target.shape) != (3,) or not target.is_floating_point() or not bool(torch.isfinite(target).all()):
        raise ModelLoadError(f"{what}: target must be 3 finite floats (count, mean, m2)")
    for name, t in (
        ("featurizer.count", tensors["featurizer.count"]),
        ("featurizer.m2", tensors["featurizer.m2"]),
        ("target count", target[0:1]),
        ("target m2", target[2:3]),
    ):
        if bool((t < 0).any()):
            raise ModelLoadError(
                f"{what}: {name} has negative values {t[t < 0][:4].tolist()}: not a state a learner can be in", "state"
            )


def _smoke(served: ServedModel, what: str) -> None:
    """Two all-missing rows through the whole path: the shape and finite values, or refuse."""
    rows: list[dict[str, float | None]] = [{}, dict.fromkeys(served.spec.features)]
    predictor = served.predictor
    try:
        out = predictor.forward(predictor.featurize(rows))
        answers = predictor.answers(out)
    except Exception as exc:
        raise ModelLoadError(f"{what}: smoke prediction raised {type(exc).__name__}: {exc}", "smoke") from exc
    if tuple(out.shape) != (len(rows), served.spec.n_outputs):
        raise ModelLoadError(
            f"{what}: the model outputs shape {list(out.shape)} for {len(rows)} rows, "
            f"expected [{len(rows)}, {served.spec.n_outputs}]",
            "architecture",
        )
    values = [v for a in answers for v in (a.values() if isinstance(a, dict) else (a,))]
    if not bool(torch.isfinite(out).all()) or not all(math.isfinite(v) for v in values):
        raise ModelLoadError(f"{what}: smoke prediction is not finite: {answers}", "smoke")
