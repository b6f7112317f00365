"""The online learner: prequential evaluation, mini-batch updates, zero-distance pseudo-labels.

No Kafka here: a :class:`~stream_learner.learn.session.LearningSession` feeds
it chunks of examples and snapshots its state. A chunk is processed
atomically, in this order:

1. drop duplicates (by example id, over a bounded window) and examples of
   other models; refuse examples whose label the model cannot use
   (:class:`~stream_learner.learn.intake.Intake`);
2. featurize the chunk (statistics that have not seen it), predict every
   example with the current model through the one
   :class:`~stream_learner.learn.predictor.Predictor` (prequential:
   predicted before learned);
3. score labeled and late examples (cumulative and rolling accuracy and log
   loss, or MAE and RMSE, and the same for what the application *served*);
   feed the drift signals to the :class:`~stream_learner.learn.judge.DriftJudge`;
4. pseudo-label the unlabeled examples whose confidence reaches the
   threshold (they train with ``pseudo_weight``); a late label trains on the
   truth and records whether the earlier pseudo-label was right (3 and 4:
   :class:`~stream_learner.learn.prequential.Prequential`);
5. one optimizer step on the chunk's trainable examples, unless the loss or a
   gradient is not finite (batch skipped) or the
   :class:`~stream_learner.learn.parts.SpikeGuard` refuses it (model and
   optimizer rolled back to the last good state, batch skipped;
   :class:`~stream_learner.learn.stepper.Stepper`).

The findings go back to the caller, whose drift policy may act on the
learner (:meth:`OnlineLearner.boost_lr`, :meth:`~OnlineLearner.reset_optimizer`,
:meth:`~OnlineLearner.start_challenger`, :meth:`~OnlineLearner.promote_challenger_if_better`).

Everything the next chunk depends on is in :meth:`OnlineLearner.state_dict`,
each part saving its own, so a learner restored from it and fed the same
chunks ends bit-identical to one that never stopped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..drift import DriftFinding
from ..events import ExampleEvent, class_name
from ..optimize.student import Student, StudentConfig
from ..optimize.window import RecentExamples
from .featurizer import Featurizer, ModelInput, RowsRefused
from .frozen import BaseWeights
from .intake import Intake
from .judge import DriftJudge
from .models import ModelSpec
from .parts import Tensors
from .predictor import Predictor
from .prequential import Prequential
from .stepper import Stepper
from .target import TargetScaler
from .trainable import Trainable

if TYPE_CHECKING:
    from ..drift import DriftWatch
    from .ranks import RankGroup


@dataclass(frozen=True)
class LearnerConfig:
    """How the learner trains (see the README's trainer settings)."""

    model_name: str
    spec: ModelSpec
    optimizer: str = "adam"
    lr: float = 0.01
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    spike_factor: float = 5.0
    spike_warmup_batches: int = 20
    spike_patience: int = 3
    pseudo_enabled: bool = False
    pseudo_threshold: float = 0.9
    pseudo_weight: float = 0.3
    dedup_window: int = 100_000
    pseudo_memory: int = 100_000
    metrics_window: int = 1000
    feature_clip: float = 10.0
    feature_abs_max: float = 1e9
    #: Examples kept raw for the serving variants (0: none; see stream_learner.optimize.window).
    recent_window: int = 0
    #: The distilled student trained alongside (None: none; see stream_learner.optimize.student).
    student: StudentConfig | None = None
    #: A frozen pretrained base and what learns on it (see stream_learner.learn.frozen).
    base: BaseWeights | None = field(default=None, compare=False)
    trainable: str = "all"
    head_modules: tuple[str, ...] = ()
    #: Where the model and the batches live (checked by the builder: see frozen.check_device).
    device: str = "cpu"

    def featurizer(self) -> Featurizer:
        """A fresh featurizer for the spec's features (the learner's and a served model's)."""
        return Featurizer(
            self.spec.inputs or self.spec.features,
            clip=self.feature_clip,
            abs_max=self.feature_abs_max,
            collate=self.spec.collate,
        )


@dataclass
class Rejected:
    """An example the model cannot learn from, with the reason (for the dead-letter topic)."""

    index: int
    kind: str
    reason: str
    field: str = "$.label"


@dataclass
class ChunkResult:
    """What processing one chunk did."""

    trained: bool = False
    loss: float = math.nan
    rejected: list[Rejected] = field(default_factory=list)
    findings: list[DriftFinding] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)


def take_rows(x: ModelInput, index: torch.Tensor) -> ModelInput:
    """The rows ``index`` of a model input: one tensor, or each of its named tensors."""
    if isinstance(x, torch.Tensor):
        return x[index]
    return {k: v[index] for k, v in x.items()}


class OnlineLearner:
    """Learns one model from a stream of joined examples, chunk by chunk.

    In a data-parallel ``group`` every rank's learner processes the same
    chunks; only the optimizer step is shared (:mod:`~stream_learner.learn.stepper`).
    """

    def __init__(
        self, config: LearnerConfig, *, drift: DriftWatch | None = None, group: RankGroup | None = None
    ) -> None:
        self.config = config
        self.spec = config.spec
        self.drift = drift
        self.group = group
        self._reset()

    def _reset(self) -> None:
        c = self.config
        self.classes = [class_name(x) for x in self.spec.classes]
        self.class_index = {name: i for i, name in enumerate(self.classes)}
        self.regression = self.spec.task == "regression"
        self.featurizer = c.featurizer()
        self.target = TargetScaler()
        self.main = self._trainable()
        self.challenger: Trainable | None = None
        # One tally for every part (each bumps its own keys): a checkpoint carries it as one dict.
        self.counts = {
            "labeled": 0,
            "pseudo": 0,
            "pseudo_skipped": 0,
            "late": 0,
            "duplicates": 0,
            "other_model": 0,
            "rejected": 0,
            "batches": 0,
            "skipped_non_finite": 0,
            "rollbacks": 0,
        }
        self.judge = DriftJudge(self.drift)
        self.intake = Intake(
            c.model_name,
            self.classes,
            self.class_index,
            regression=self.regression,
            label_abs_max=c.feature_abs_max,
            dedup_window=c.dedup_window,
            counts=self.counts,
        )
        self.prequential = Prequential(
            self.class_index,
            regression=self.regression,
            judge=self.judge,
            target=self.target,
            counts=self.counts,
            metrics_window=c.metrics_window,
            pseudo_memory=c.pseudo_memory,
            pseudo_enabled=c.pseudo_enabled,
            pseudo_threshold=c.pseudo_threshold,
            pseudo_weight=c.pseudo_weight,
        )
        self.stepper = Stepper(
            regression=self.regression,
            clip_norm=c.clip_norm,
            lr=c.lr,
            spike_factor=c.spike_factor,
            spike_warmup_batches=c.spike_warmup_batches,
            spike_patience=c.spike_patience,
            counts=self.counts,
            group=self.group,
        )
        # The serving variants' parts (stream_learner.optimize), when the settings ask for them.
        self.recent = (
            RecentExamples(self.spec.features, c.recent_window, c.feature_abs_max) if c.recent_window else None
        )
        self.student = (
            Student(
                self.spec, c.student, optimizer=c.optimizer, lr=c.lr, weight_decay=c.weight_decay, clip_norm=c.clip_norm
            )
            if c.student is not None
            else None
        )
        self.examples_seen = 0
        self.chunk_base = 0

    def _trainable(self) -> Trainable:
        c = self.config
        return Trainable(
            self.spec,
            c.optimizer,
            c.lr,
            c.weight_decay,
            base=c.base,
            trainable=c.trainable,
            head=c.head_modules,
            device=torch.device(c.device),
        )

    def frozen_tensors(self) -> dict[str, torch.Tensor]:
        """The main model's frozen parameters (the base's values; empty without a frozen base)."""
        return self.main.frozen_state()

    @property
    def predictor(self) -> Predictor:
        """The main model's prediction path (what a checkpoint of this state serves)."""
        return Predictor(self.spec, self.featurizer, self.target, self.main.model)

    @property
    def drift_counts(self) -> dict[str, dict[str, int]]:
        """Per detector: warnings, drifts and improvements judged, and the last drift's index."""
        return self.judge.counts

    # -- the chunk ---------------------------------------------------------------

    def process(self, chunk: Sequence[ExampleEvent]) -> ChunkResult:
        """Evaluate, then learn from one chunk of examples (see the module docstring)."""
        result = ChunkResult()
        rows, where, refused_labels = self.intake.admit(chunk)
        result.rejected.extend(Rejected(i, "invalid_label", reason) for i, reason in refused_labels)
        self.chunk_base = self.examples_seen  # drift findings are indexed chunk_base + row
        self.examples_seen += len(chunk)
        if not rows:
            return result

        predictor = self.predictor
        try:
            x = predictor.featurize([ex.features for ex in rows], learn=True)
        except RowsRefused as refused:
            # Features that do not fit the spec: those examples are refused (dead letters naming the
            # feature), the rest featurized as if they had come alone; nothing was counted or learned.
            for r in sorted(refused.errors):
                error = refused.errors[r]
                self.counts["rejected"] += 1
                result.rejected.append(Rejected(where[r], error.kind, error.reason, error.field))
            rows = [ex for r, ex in enumerate(rows) if r not in refused.errors]
            if not rows:
                return result
            x = predictor.featurize([ex.features for ex in rows], learn=True)
        out = predictor.forward(x)
        if self.recent is not None or self.student is not None:
            self._variant_parts(rows, x, out)
        challenger_out = None
        if self.challenger is not None:
            challenger_out = Predictor(self.spec, self.featurizer, self.target, self.challenger.model).forward(x)
        prequential = self.prequential
        if self.regression:
            targets, weights, keep = prequential.score_regression(rows, predictor, out, result, self.chunk_base)
        else:
            targets, weights, keep = prequential.score_classes(
                rows, predictor, out, challenger_out, result, self.chunk_base
            )
        if keep:
            # keep is increasing, so keeping as many rows as there are is keeping them all.
            x_keep = x if len(keep) == len(rows) else take_rows(x, torch.tensor(keep, dtype=torch.long))
            # The positions (in keep) of the examples that carry a true label: what the spike guard judges.
            truth = [j for j, i in enumerate(keep) if rows[i].kind != "unlabeled"]
            result.loss = self.stepper.step(self.main, x_keep, targets, weights, count=True, truth=truth)
            if self.challenger is not None:
                self.stepper.step(self.challenger, x_keep, targets, weights, count=False)
        return result

    def _variant_parts(self, rows: list[ExampleEvent], x: ModelInput, out: torch.Tensor) -> None:
        """The recent window takes the chunk; the student learns it from the teacher's prequential
        outputs (before the teacher's step, with the target statistics the teacher learns with)."""
        nan = math.nan
        if self.regression:
            labels = [nan if ex.kind == "unlabeled" else float(ex.label) for ex in rows]  # type: ignore[arg-type]
        else:
            index = self.class_index
            labels = [
                nan if ex.kind == "unlabeled" else float(index[class_name(ex.label)])  # type: ignore[arg-type]
                for ex in rows
            ]
        if self.recent is not None:
            self.recent.add([ex.features for ex in rows], labels)
        if self.student is not None:
            # The variants' parts run on numeric specs only (build.learner_config refuses the rest).
            assert isinstance(x, torch.Tensor)
            y = torch.tensor(labels, dtype=torch.float32)
            if self.regression:
                mean, std = self.target.mean_std()
                y = (y - mean) / std
            self.student.learn(x, out, y, regression=self.regression)

    # -- drift policy actions ---------------------------------------------------------

    def boost_lr(self, factor: float, steps: int) -> None:
        """Multiply the learning rate by ``factor`` for the next ``steps`` batches."""
        self.stepper.lr.boost(self.main.optimizer, factor, steps)

    def reset_optimizer(self) -> None:
        """Forget the optimizer's moments (a fresh optimizer on the same weights)."""
        self.main.reset_optimizer()
        self.stepper.lr.boost_left = 0

    def start_challenger(self) -> bool:
        """Start a fresh challenger model (no-op if one runs); True if started."""
        if self.challenger is not None:
            return False
        self.challenger = self._trainable()
        self.prequential.start_challenger()
        return True

    def promote_challenger_if_better(self) -> bool:
        """Replace the main model by the challenger if it scored better since it started."""
        if self.challenger is None:
            return False
        better = self.prequential.challenger_better()
        if better:
            self.main = self.challenger
        self.challenger = None
        return better

    # -- state ---------------------------------------------------------------------------

    def summary(self) -> dict[str, float]:
        """Current metrics (RMSE as the root of the mean squared error)."""
        out = self.prequential.scores.summary()
        for key in [k for k in out if "rmse_sq" in k]:
            out[key.replace("rmse_sq", "rmse")] = math.sqrt(out.pop(key))
        return out

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        """Everything needed to continue bit-identically: (tensors, JSON-able meta), each part its own."""
        tensors: Tensors = {}
        meta: dict[str, Any] = {}
        self.main.save(tensors, meta, "main")
        if self.challenger is not None:
            self.challenger.save(tensors, meta, "challenger")
        if self.student is not None:
            self.student.save(tensors, meta)
        if self.recent is not None:
            self.recent.save(tensors, meta)
        tensors.update(self.featurizer.state_dict())
        tensors["target"] = self.target.state_tensor()
        # The parts in the order the state always had (tensors and meta keys alike).
        self.intake.save(tensors)
        meta.update(
            featurizer_counts=self.featurizer.counts,
            **self.prequential.save(tensors),
            examples_seen=self.examples_seen,
            counts=self.counts,
            **self.stepper.save(tensors),
            **self.judge.save(),
        )
        # Tuples (Adam's betas) become lists, as they will when stored as JSON.
        return tensors, json.loads(json.dumps(meta, allow_nan=False))

    def load_state_dict(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._reset()
        # First: a state learned with another tokenizer says so, before its weights fail to fit.
        self.featurizer.load_state_dict(tensors)
        self.main.load(tensors, meta, "main")
        if "challenger.model" in meta:
            self.challenger = self._trainable()
            self.challenger.load(tensors, meta, "challenger")
        # A state saved before a count existed has none of it yet: it starts at 0.
        self.featurizer.counts = {**self.featurizer.counts, **meta["featurizer_counts"]}
        self.target.load_tensor(tensors["target"])
        self.intake.load(tensors)
        self.prequential.load(tensors, meta)
        self.stepper.load(tensors, meta)
        self.judge.load(meta)
        self.examples_seen = int(meta["examples_seen"])
        # In place: the parts share this dict.
        self.counts.clear()
        self.counts.update(meta["counts"])
        # A state saved before the variants were turned on has no such part: it starts fresh.
        if self.student is not None and "student.model" in meta:
            self.student.load(tensors, meta)
        if self.recent is not None and "recent_total" in meta:
            self.recent.load(tensors, meta)
