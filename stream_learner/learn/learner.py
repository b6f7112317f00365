"""The online learner: prequential evaluation, mini-batch updates, zero-distance pseudo-labels.

No Kafka here: a :class:`~stream_learner.learn.session.LearningSession` feeds
it chunks of examples and snapshots its state. A chunk is processed
atomically, in this order:

1. drop duplicates (by example id, over a bounded window) and examples of
   other models; refuse examples whose label the model cannot use;
2. featurize the chunk (statistics that have not seen it), predict every
   example with the current model through the one
   :class:`~stream_learner.learn.predictor.Predictor` (prequential:
   predicted before learned);
3. score labeled and late examples (cumulative and rolling accuracy and log
   loss, or MAE and RMSE, and the same for what the application *served*);
   feed the drift signals to the :class:`~stream_learner.learn.judge.DriftJudge`;
4. pseudo-label the unlabeled examples whose confidence reaches the
   threshold (they train with ``pseudo_weight``); a late label trains on the
   truth and records whether the earlier pseudo-label was right;
5. one optimizer step on the chunk's trainable examples, unless the loss or a
   gradient is not finite (batch skipped) or the
   :class:`~stream_learner.learn.parts.SpikeGuard` refuses it (model and
   optimizer rolled back to the last good state, batch skipped).

The findings go back to the caller, whose drift policy may act on the
learner (:meth:`OnlineLearner.boost_lr`, :meth:`~OnlineLearner.reset_optimizer`,
:meth:`~OnlineLearner.start_challenger`, :meth:`~OnlineLearner.promote_challenger_if_better`).

Everything the next chunk depends on is in :meth:`OnlineLearner.state_dict`,
each part saving its own, so a learner restored from it and fed the same
chunks ends bit-identical to one that never stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..drift import DriftFinding
from ..events import ExampleEvent, class_name
from ..optimize.student import Student, StudentConfig
from ..optimize.window import RecentExamples
from .evaluation import Scoreboard, ServedClasses
from .featurizer import Featurizer, ModelInput, RowsRefused, move_input
from .frozen import BaseWeights
from .judge import DriftJudge, SignalValues
from .models import ModelSpec
from .parts import DedupWindow, LrSchedule, PseudoLabels, SpikeGuard, Tensors
from .predictor import Predictor, set_training
from .target import TargetScaler
from .trainable import Trainable

if TYPE_CHECKING:
    from ..drift import DriftWatch

_EPS = 1e-15


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
    """Learns one model from a stream of joined examples, chunk by chunk."""

    def __init__(self, config: LearnerConfig, *, drift: DriftWatch | None = None) -> None:
        self.config = config
        self.spec = config.spec
        self.drift = drift
        self._reset()

    def _reset(self) -> None:
        c = self.config
        self.classes = [class_name(x) for x in self.spec.classes]
        self.class_index = {name: i for i, name in enumerate(self.classes)}
        self.served = ServedClasses(self.class_index)
        self.regression = self.spec.task == "regression"
        self.featurizer = c.featurizer()
        self.target = TargetScaler()
        self.main = self._trainable()
        self.challenger: Trainable | None = None
        names = (
            ["mae", "rmse_sq", "served_mae", "served_rmse_sq"]
            if self.regression
            else ["accuracy", "log_loss", "served_accuracy", "served_log_loss", "pseudo_precision"]
        )
        self.scores = Scoreboard(names, c.metrics_window)
        self.challenger_scores = Scoreboard(["accuracy"], c.metrics_window)
        self.champion_scores = Scoreboard(["accuracy"], c.metrics_window)
        self.seen = DedupWindow(c.dedup_window)
        self.pseudo = PseudoLabels(c.pseudo_memory)
        self.guard = SpikeGuard(c.spike_factor, c.spike_warmup_batches, c.spike_patience)
        self.lr = LrSchedule(c.lr)
        self.judge = DriftJudge(self.drift)
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
        rows: list[ExampleEvent] = []
        where: list[int] = []  # each row's index in the chunk
        blake2b, remember, model_name = hashlib.blake2b, self.seen.add, self.config.model_name
        # A label that is one of the class names as given is fine: no need to ask _label_problem.
        known = self.class_index if not self.regression else {}
        for i, ex in enumerate(chunk):
            if not remember(blake2b(ex.example_id.encode(), digest_size=16).digest()):
                self.counts["duplicates"] += 1
                continue
            if ex.model != model_name:
                self.counts["other_model"] += 1
                continue
            if (
                ex.kind != "unlabeled"
                and not (type(ex.label) is str and ex.label in known)
                and (reason := self._label_problem(ex.label))
            ):
                self.counts["rejected"] += 1
                result.rejected.append(Rejected(i, "invalid_label", reason))
                continue
            rows.append(ex)
            where.append(i)
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
        if self.regression:
            targets, weights, keep = self._evaluate_regression(rows, predictor, out, result)
        else:
            targets, weights, keep = self._evaluate_classes(rows, predictor, out, challenger_out, result)
        if keep:
            # keep is increasing, so keeping as many rows as there are is keeping them all.
            x_keep = x if len(keep) == len(rows) else take_rows(x, torch.tensor(keep, dtype=torch.long))
            # The positions (in keep) of the examples that carry a true label: what the spike guard judges.
            truth = [j for j, i in enumerate(keep) if rows[i].kind != "unlabeled"]
            result.loss = self._step(self.main, x_keep, targets, weights, count=True, truth=truth)
            if self.challenger is not None:
                self._step(self.challenger, x_keep, targets, weights, count=False)
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

    def _label_problem(self, label: Any) -> str | None:
        if label is None:
            return "a labeled example has no label"
        if self.regression:
            if isinstance(label, str):
                return f"regression label must be a number, got {label!r}"
            if not abs(label) <= self.config.feature_abs_max:
                return f"label {label!r} is out of range"
            return None
        if class_name(label) not in self.class_index:
            return f"label {class_name(label)!r} is not one of the model's classes {self.classes}"
        return None

    def _evaluate_regression(
        self, rows: list[ExampleEvent], predictor: Predictor, out: torch.Tensor, result: ChunkResult
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Prequential scoring and the loss signal, then the standardized targets of the chunk."""
        mean, std = self.target.mean_std()
        preds = predictor.values(out)
        keep: list[int] = []
        ys: list[float] = []
        losses: list[float] = []
        scores = self.scores
        for i, ex in enumerate(rows):
            if ex.kind == "unlabeled":
                self.counts["pseudo_skipped"] += 1  # no confidence for a regression value
                continue
            y = float(ex.label)  # type: ignore[arg-type]
            err = preds[i] - y
            scores.update("mae", abs(err))
            scores.update("rmse_sq", err * err)
            if isinstance(ex.prediction, float):
                scores.update("served_mae", abs(ex.prediction - y))
                scores.update("served_rmse_sq", (ex.prediction - y) ** 2)
            losses.append(err * err)
            self.counts["late" if ex.kind == "late" else "labeled"] += 1
            keep.append(i)
            ys.append(y)
        result.findings.extend(self.judge.observe([("loss", losses, keep)], self.chunk_base))
        self.target.update(ys)
        ys_std = [(y - mean) / std for y in ys]
        return torch.tensor(ys_std, dtype=torch.float32), torch.ones(len(ys), dtype=torch.float32), keep

    def _evaluate_classes(
        self,
        rows: list[ExampleEvent],
        predictor: Predictor,
        out: torch.Tensor,
        challenger_out: torch.Tensor | None,
        result: ChunkResult,
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Prequential scoring and drift signals, pseudo-labels, then the training targets of the chunk."""
        c = self.config
        keep: list[int] = []
        ys: list[int] = []
        ws: list[float] = []
        probs = predictor.probabilities(out)
        conf, arg = probs.max(dim=1)
        conf_l, arg_l = conf.tolist(), arg.tolist()
        challenger_arg = challenger_out.argmax(dim=1).tolist() if challenger_out is not None else None
        result.confidences.extend(conf_l)
        # One pass in row order for what depends on order across rows (the pseudo-label map,
        # the training targets); the scores and the drift signals are then computed per chunk
        # and fed in row order: the same values, in the same order, as one example at a time.
        class_index, pseudo = self.class_index, self.pseudo
        pseudo_on, threshold, pseudo_weight = c.pseudo_enabled, c.pseudo_threshold, c.pseudo_weight
        lab_rows: list[int] = []
        lab_y: list[int] = []
        pseudo_hits: list[float] = []
        n_pseudo = n_skipped = n_late = 0
        for i, ex in enumerate(rows):
            kind = ex.kind
            if kind == "unlabeled":
                if pseudo_on and conf_l[i] >= threshold:
                    a = arg_l[i]
                    keep.append(i)
                    ys.append(a)
                    ws.append(pseudo_weight)
                    pseudo.remember(ex.prediction_event_id, a)
                    n_pseudo += 1
                else:
                    n_skipped += 1
                continue
            y = class_index[class_name(ex.label)]  # type: ignore[arg-type]
            lab_rows.append(i)
            lab_y.append(y)
            if kind == "late":
                n_late += 1
                was = pseudo.take(ex.prediction_event_id)
                if was is not None:
                    pseudo_hits.append(1.0 if was == y else 0.0)
            keep.append(i)
            ys.append(y)
            ws.append(1.0)
        counts = self.counts
        counts["pseudo"] += n_pseudo
        counts["pseudo_skipped"] += n_skipped
        counts["late"] += n_late
        counts["labeled"] += len(lab_rows) - n_late
        signals: list[SignalValues] = [("confidence", conf_l, list(range(len(rows))))]
        if lab_rows:
            # Indexing copies the probabilities exactly: the same floats as float(probs[i, y]).
            p_y = probs[torch.tensor(lab_rows), torch.tensor(lab_y)].tolist()
            accuracy = [1.0 if arg_l[i] == y else 0.0 for i, y in zip(lab_rows, lab_y)]
            log = math.log
            losses = [-log(max(p, _EPS)) for p in p_y]
            scores = self.scores
            scores.update_many("accuracy", accuracy)
            scores.update_many("log_loss", losses)
            served_acc: list[float] = []
            served_loss: list[float] = []
            served_of = self.served.of
            for i, y in zip(lab_rows, lab_y):
                served = served_of(rows[i].prediction)
                if served is not None:
                    served_acc.append(1.0 if served[0] == y else 0.0)
                    served_loss.append(-log(max(served[1].get(y, 0.0), _EPS)))
            scores.update_many("served_accuracy", served_acc)
            scores.update_many("served_log_loss", served_loss)
            scores.update_many("pseudo_precision", pseudo_hits)
            if challenger_arg is not None:
                self.challenger_scores.update_many(
                    "accuracy", [1.0 if challenger_arg[i] == y else 0.0 for i, y in zip(lab_rows, lab_y)]
                )
                self.champion_scores.update_many("accuracy", accuracy)
            signals.append(("error", [0.0 if a == 1.0 else 1.0 for a in accuracy], lab_rows))
            signals.append(("loss", losses, lab_rows))
        result.findings.extend(self.judge.observe(signals, self.chunk_base))
        return torch.tensor(ys, dtype=torch.long), torch.tensor(ws, dtype=torch.float32), keep

    def _step(
        self,
        t: Trainable,
        x: ModelInput,
        y: torch.Tensor,
        w: torch.Tensor,
        *,
        count: bool,
        truth: list[int] | None = None,
    ) -> float:
        """One optimizer step; returns the batch loss (NaN when skipped). Only the main model
        (``count``) is counted, guarded against spikes (on the per-example losses of the rows at
        ``truth``, the truly labeled ones) and scheduled."""
        c = self.config
        set_training(t.model, True)
        if t.device.type != "cpu":
            x, y, w = move_input(x, t.device), y.to(t.device), w.to(t.device)
        out = t.model(x)
        if self.regression:
            per = (out[:, 0] - y) ** 2
        else:
            per = nn.functional.cross_entropy(out, y, reduction="none")
        loss = (per * w).sum() / w.sum()
        value = float(loss.detach())
        if not math.isfinite(value):
            if count:
                self.counts["skipped_non_finite"] += 1
            return math.nan
        labeled: list[float] = []
        if count:
            labeled = (per if truth is None or len(truth) == len(per) else per[truth]).detach().tolist()
        if count and self.guard.check(labeled) == "rollback":
            # The current weights produce an abnormal loss: go back to the last
            # weights that did not, and do not learn from this batch.
            if t.rollback():
                self.counts["rollbacks"] += 1
            return math.nan
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = t.learning()
        grads = [p.grad for p in params if p.grad is not None]
        # A finite total norm means every gradient is finite: one check instead of one per
        # tensor, and the norm is the one clipping needs (clip_grad_norm_ is exactly
        # get_total_norm then clip_grads_with_norm_). Only a non-finite norm (which finite but
        # huge gradients can also give) needs the per-tensor check.
        norm = nn.utils.get_total_norm(grads) if c.clip_norm > 0 and grads else None
        if (norm is None or not math.isfinite(float(norm))) and not all(bool(torch.isfinite(g).all()) for g in grads):
            t.optimizer.zero_grad(set_to_none=True)
            if count:
                self.counts["skipped_non_finite"] += 1
            return math.nan
        if norm is not None:
            nn.utils.clip_grads_with_norm_(params, c.clip_norm, norm)
        t.remember_good()
        t.optimizer.step()
        if count:
            self.counts["batches"] += 1
            self.guard.learned(labeled)
            self.lr.stepped(t.optimizer)
        return value

    # -- drift policy actions ---------------------------------------------------------

    def boost_lr(self, factor: float, steps: int) -> None:
        """Multiply the learning rate by ``factor`` for the next ``steps`` batches."""
        self.lr.boost(self.main.optimizer, factor, steps)

    def reset_optimizer(self) -> None:
        """Forget the optimizer's moments (a fresh optimizer on the same weights)."""
        self.main.reset_optimizer()
        self.lr.boost_left = 0

    def start_challenger(self) -> bool:
        """Start a fresh challenger model (no-op if one runs); True if started."""
        if self.challenger is not None:
            return False
        self.challenger = self._trainable()
        self.challenger_scores = Scoreboard(["accuracy"], self.config.metrics_window)
        self.champion_scores = Scoreboard(["accuracy"], self.config.metrics_window)
        return True

    def promote_challenger_if_better(self) -> bool:
        """Replace the main model by the challenger if it scored better since it started."""
        if self.challenger is None:
            return False
        ch, champ = self.challenger_scores.means["accuracy"], self.champion_scores.means["accuracy"]
        better = ch.n > 0 and ch.cumulative > champ.cumulative
        if better:
            self.main = self.challenger
        self.challenger = None
        return better

    # -- state ---------------------------------------------------------------------------

    def summary(self) -> dict[str, float]:
        """Current metrics (RMSE as the root of the mean squared error)."""
        out = self.scores.summary()
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
        self.seen.save(tensors)
        meta.update(
            featurizer_counts=self.featurizer.counts,
            scores=self.scores.state(),
            challenger_scores=self.challenger_scores.state(),
            champion_scores=self.champion_scores.state(),
            pseudo=self.pseudo.save(tensors),
            examples_seen=self.examples_seen,
            counts=self.counts,
            **self.guard.save(tensors),
            **self.lr.save(),
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
        self.seen.load(tensors)
        self.scores.restore(meta["scores"])
        self.challenger_scores.restore(meta["challenger_scores"])
        self.champion_scores.restore(meta["champion_scores"])
        self.pseudo.load(tensors, meta["pseudo"])
        self.guard.load(tensors, meta)
        self.lr.load(meta)
        self.judge.load(meta)
        self.examples_seen = int(meta["examples_seen"])
        self.counts = dict(meta["counts"])
        # A state saved before the variants were turned on has no such part: it starts fresh.
        if self.student is not None and "student.model" in meta:
            self.student.load(tensors, meta)
        if self.recent is not None and "recent_total" in meta:
            self.recent.load(tensors, meta)
