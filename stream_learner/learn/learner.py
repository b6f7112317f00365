"""The online learner: prequential evaluation, mini-batch updates, zero-distance pseudo-labels.

No Kafka here: the trainer role feeds it chunks of examples and snapshots
its state. A chunk is processed atomically, in this order:

1. drop duplicates (by example id, over a bounded window) and examples of
   other models; refuse examples whose label the model cannot use;
2. featurize the chunk (statistics that have not seen it), predict every
   example with the current model (prequential: predicted before learned);
3. score labeled and late examples (cumulative and rolling accuracy and log
   loss, or MAE and RMSE, and the same for what the application *served*);
   feed the drift detectors example by example;
4. pseudo-label the unlabeled examples whose confidence reaches the
   threshold (they train with ``pseudo_weight``); a late label trains on the
   truth and records whether the earlier pseudo-label was right;
5. one optimizer step on the chunk's trainable examples, unless the loss or a
   gradient is not finite (batch skipped) or the loss spikes beyond
   ``spike_factor`` times its running average (model and optimizer rolled
   back to the last good state, batch skipped; after ``spike_patience``
   spikes in a row the new loss level is accepted as a concept change and
   learned);
6. apply the drift policy's actions.

Everything the next chunk depends on is in :meth:`OnlineLearner.state_dict`,
so a learner restored from it and fed the same chunks ends bit-identical to
one that never stopped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..drift import DriftFinding
from ..events import ExampleEvent, class_name
from .evaluation import Scoreboard
from .featurizer import Featurizer
from .models import ModelSpec, build_model

_EPS = 1e-15
_UNSEEN = object()


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
    pseudo_enabled: bool = True
    pseudo_threshold: float = 0.9
    pseudo_weight: float = 0.3
    dedup_window: int = 100_000
    pseudo_memory: int = 100_000
    metrics_window: int = 1000
    feature_clip: float = 10.0
    feature_abs_max: float = 1e9


@dataclass
class Rejected:
    """An example the model cannot learn from, with the reason (for the dead-letter topic)."""

    index: int
    kind: str
    reason: str


@dataclass
class ChunkResult:
    """What processing one chunk did."""

    trained: bool = False
    loss: float = math.nan
    rejected: list[Rejected] = field(default_factory=list)
    findings: list[Any] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)


def make_optimizer(name: str, params: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer named in the settings (``adam``, ``adamw`` or ``sgd``).

    Adam and AdamW use torch's fused kernel (one call per parameter instead of about ten
    small ops): 27 against 71 us per step for the default MLP on CPU. Its rounding differs
    from the per-op version in the last bits, and it is deterministic, so a restored trainer
    still ends bit-identical to one that never stopped.
    """
    params = list(params)
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) or None
        return cls(params, lr=lr, weight_decay=weight_decay, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: use adam, adamw or sgd")


def _set_training(model: nn.Module, mode: bool) -> None:
    """``model.train(mode)`` unless it is in that mode already (the call walks every submodule,
    twice per chunk); the learner only ever switches the whole model."""
    if model.training is not mode:
        model.train(mode)


class DedupWindow:
    """The digests (16 bytes) of the last ``size`` distinct examples, oldest evicted first.

    Membership is a set; insertion order is a ring of ``size`` slots in one bytearray, so a
    snapshot is one copy of that buffer (an OrderedDict's was a list of 100 000 objects,
    joined: most of the checkpoint's own time).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.members: set[bytes] = set()
        self.ring = bytearray(16 * size)
        self.next = 0  # the slot the next digest goes to; once full, the oldest one
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def add(self, digest: bytes) -> bool:
        """Remember ``digest``; False if it is already in the window (a duplicate)."""
        if digest in self.members:
            return False
        at = 16 * self.next
        if self.count == self.size:
            self.members.discard(bytes(self.ring[at:at + 16]))
        else:
            self.count += 1
        self.ring[at:at + 16] = digest
        self.members.add(digest)
        self.next = self.next + 1 if self.next + 1 < self.size else 0
        return True

    def snapshot(self) -> bytes:
        """The digests, oldest first, concatenated."""
        if self.count < self.size:
            return bytes(self.ring[:16 * self.count])
        at = 16 * self.next
        return bytes(self.ring[at:]) + bytes(self.ring[:at])

    def load(self, data: bytes) -> None:
        """Restore from :meth:`snapshot` (the oldest beyond ``size`` are dropped)."""
        n = len(data) // 16
        self.__init__(self.size)  # type: ignore[misc]
        for i in range(max(0, n - self.size), n):
            self.add(data[16 * i:16 * i + 16])


def _copy_group(group: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of an optimizer param group, cheaper when its values are immutable (they are for
    torch's optimizers: floats, bools, tuples of floats, None; ``params`` is a list of ints)."""
    if all(_immutable(v) for k, v in group.items() if k != "params"):
        return {**group, "params": list(group["params"])}
    return copy.deepcopy(group)


_SCALARS = frozenset({int, float, bool, str, type(None)})


def _immutable(value: Any) -> bool:
    return type(value) in _SCALARS or (type(value) is tuple and all(type(v) in _SCALARS for v in value))


class _Trainable:
    """A model with its optimizer and last good state (for rollback)."""

    def __init__(self, config: LearnerConfig) -> None:
        self.model: nn.Module = build_model(config.spec)
        self.optimizer = make_optimizer(config.optimizer, self.model.parameters(), config.lr,
                                        config.weight_decay)
        self.good: tuple[dict[str, Any], dict[str, Any]] | None = None

    def remember_good(self) -> None:
        current = self.optimizer.state_dict()
        good = self.good
        if good is None or good[1]["state"].keys() != current["state"].keys():
            self.good = (copy.deepcopy(self.model.state_dict()), copy.deepcopy(current))
            return
        # Copy into the tensors kept last time, in one foreach call: a deep copy per step cost
        # ~30% of training time, a copy_ per tensor ~3 us each.
        dst, src = [], []
        for key, value in self.model.state_dict().items():
            dst.append(good[0][key])
            src.append(value)
        for idx, per_param in current["state"].items():
            kept = good[1]["state"][idx]
            for key, value in per_param.items():
                if isinstance(value, torch.Tensor):
                    dst.append(kept[key])
                    src.append(value)
                else:
                    kept[key] = value
        with torch.no_grad():
            torch._foreach_copy_(dst, src)
        good[1]["param_groups"] = [_copy_group(g) for g in current["param_groups"]]

    def rollback(self) -> bool:
        if self.good is None:
            return False
        # The learning rate is policy (a drift's boost), not state to roll back.
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.model.load_state_dict(self.good[0])
        self.optimizer.load_state_dict(copy.deepcopy(self.good[1]))
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        return True


class OnlineLearner:
    """Learns one model from a stream of joined examples, chunk by chunk."""

    def __init__(self, config: LearnerConfig, *, drift: Any | None = None) -> None:
        self.config = config
        self.spec = config.spec
        self.drift = drift  # a stream_learner.drift monitor + policy, or None
        self._reset()

    def _reset(self) -> None:
        c = self.config
        self.classes = [class_name(x) for x in self.spec.classes]
        self.class_index = {name: i for i, name in enumerate(self.classes)}
        self._served_index: dict[Any, int | None] = {}  # probability key as served -> class index
        self.regression = self.spec.task == "regression"
        self.featurizer = Featurizer(self.spec.features, clip=c.feature_clip, abs_max=c.feature_abs_max)
        self.main = _Trainable(c)
        self.challenger: _Trainable | None = None
        names = (["mae", "rmse_sq", "served_mae", "served_rmse_sq"] if self.regression
                 else ["accuracy", "log_loss", "served_accuracy", "served_log_loss", "pseudo_precision"])
        self.scores = Scoreboard(names, c.metrics_window)
        self.challenger_scores = Scoreboard(["accuracy"], c.metrics_window)
        self.champion_scores = Scoreboard(["accuracy"], c.metrics_window)
        # Target standardization for regression (count, mean, m2).
        self.target = np.zeros(3, dtype=np.float64)
        self.seen = DedupWindow(c.dedup_window)
        self.pseudo: OrderedDict[str, int] = OrderedDict()
        self.loss_ema = math.nan
        self.good_batches = 0
        self.spikes_in_a_row = 0
        self.lr_boost_left = 0
        self.examples_seen = 0
        self.chunk_base = 0
        # Each detector's estimate before the latest value, to tell worse from better.
        self.estimates: dict[str, float] = {}
        self.drift_names: dict[str, list[str]] = {}
        if self.drift is not None:
            for name, det in self.drift.detectors.items():
                self.drift_names.setdefault(det.signal, []).append(name)
        self.drift_counts: dict[str, dict[str, int]] = {}
        self.counts = {
            "labeled": 0, "pseudo": 0, "pseudo_skipped": 0, "late": 0, "duplicates": 0, "other_model": 0,
            "rejected": 0, "batches": 0, "skipped_non_finite": 0, "rollbacks": 0,
        }

    # -- the chunk ---------------------------------------------------------------

    def process(self, chunk: Sequence[ExampleEvent]) -> ChunkResult:
        """Evaluate, then learn from one chunk of examples (see the module docstring)."""
        result = ChunkResult()
        rows: list[ExampleEvent] = []
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
            if ex.kind != "unlabeled" and not (type(ex.label) is str and ex.label in known) and (
                    reason := self._label_problem(ex.label)):
                self.counts["rejected"] += 1
                result.rejected.append(Rejected(i, "invalid_label", reason))
                continue
            rows.append(ex)
        self.chunk_base = self.examples_seen  # drift findings are indexed chunk_base + row
        self.examples_seen += len(chunk)
        if not rows:
            return result

        x = self.featurizer.transform([ex.features for ex in rows])
        with torch.no_grad():
            _set_training(self.main.model, False)
            out = self.main.model(x)
            challenger_out = None
            if self.challenger is not None:
                _set_training(self.challenger.model, False)
                challenger_out = self.challenger.model(x)
        targets, weights, keep = self._evaluate_and_target(rows, out, challenger_out, result)
        if keep:
            # keep is increasing, so keeping as many rows as there are is keeping them all.
            x_keep = x if len(keep) == len(rows) else x[torch.tensor(keep, dtype=torch.long)]
            result.loss = self._step(self.main, x_keep, targets, weights, result, count=True)
            if self.challenger is not None:
                self._step(self.challenger, x_keep, targets, weights, None, count=False)
        return result

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

    def _evaluate_and_target(self, rows: list[ExampleEvent], out: torch.Tensor,
                             challenger_out: torch.Tensor | None,
                             result: ChunkResult) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Prequential scoring and drift input, then the training targets of the chunk."""
        c = self.config
        keep: list[int] = []
        ys: list[float] = []
        ws: list[float] = []
        if self.regression:
            mean, std = self._target_mean_std()
            preds = (out[:, 0].double() * std + mean).tolist()
            for i, ex in enumerate(rows):
                if ex.kind == "unlabeled":
                    self.counts["pseudo_skipped"] += 1  # no confidence for a regression value
                    continue
                y = float(ex.label)  # type: ignore[arg-type]
                err = preds[i] - y
                self.scores.update("mae", abs(err))
                self.scores.update("rmse_sq", err * err)
                if isinstance(ex.prediction, float):
                    self.scores.update("served_mae", abs(ex.prediction - y))
                    self.scores.update("served_rmse_sq", (ex.prediction - y) ** 2)
                self._observe("loss", err * err, result, i)
                self.counts["late" if ex.kind == "late" else "labeled"] += 1
                keep.append(i)
                ys.append(y)
                ws.append(1.0)
            self._update_target_stats(np.array(ys, dtype=np.float64))
            ys_std = [(y - mean) / std for y in ys]
            return torch.tensor(ys_std, dtype=torch.float32), torch.tensor(ws, dtype=torch.float32), keep

        probs = torch.softmax(out.double(), dim=1)
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
                    pseudo[ex.prediction_event_id] = a
                    if len(pseudo) > c.pseudo_memory:
                        pseudo.popitem(last=False)
                    n_pseudo += 1
                else:
                    n_skipped += 1
                continue
            y = class_index[class_name(ex.label)]  # type: ignore[arg-type]
            lab_rows.append(i)
            lab_y.append(y)
            if kind == "late":
                n_late += 1
                was = pseudo.pop(ex.prediction_event_id, None)
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
        signals: list[tuple[str, list[float], list[int]]] = [("confidence", conf_l, list(range(len(rows))))]
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
            served_of = self._served
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
                    "accuracy", [1.0 if challenger_arg[i] == y else 0.0 for i, y in zip(lab_rows, lab_y)])
                self.champion_scores.update_many("accuracy", accuracy)
            signals.append(("error", [0.0 if a == 1.0 else 1.0 for a in accuracy], lab_rows))
            signals.append(("loss", losses, lab_rows))
        if self.drift is not None:
            self._observe_chunk(signals, result)
        return torch.tensor(ys, dtype=torch.long), torch.tensor(ws, dtype=torch.float32), keep

    def _served(self, prediction: Any) -> tuple[int, dict[int, float]] | None:
        """The class the application served and its probabilities, by class index."""
        if not isinstance(prediction, dict):
            return None
        index = self._served_index
        probs = {}
        for k, v in prediction.items():
            i = index.get(k, _UNSEEN)
            if i is _UNSEEN:
                i = self.class_index.get(class_name(k))
                if len(index) < 4096:  # probability keys are the class names: a handful
                    index[k] = i
            if i is not None:
                probs[i] = v
        if not probs:
            return None
        return max(probs, key=probs.__getitem__), probs

    def _observe_chunk(self, signals: list[tuple[str, list[float], list[int]]], result: ChunkResult) -> None:
        """Feed each signal's values (of rows ``rows``) to the detectors a signal at a time, then
        judge the findings in the order :meth:`_observe` per example would have: by row, then in
        the order of ``signals``, then by detector. Detectors watch one signal each, so feeding a
        signal's values in a batch leaves them exactly as feeding them example by example does."""
        found: list[tuple[int, int, DriftFinding, float, float]] = []
        base = self.chunk_base
        for order, (signal, values, rows) in enumerate(signals):
            if not values:
                continue
            findings, estimates = self.drift.observe_many(signal, values, indices=[base + r for r in rows])
            for j, finding in findings:
                est = estimates[finding.detector]
                before = est[j - 1] if j else self.estimates.get(finding.detector, math.nan)
                found.append((rows[j], order, finding, before, est[j]))
            for name in self.drift_names.get(signal, ()):
                self.estimates[name] = estimates[name][-1]
        found.sort(key=lambda f: (f[0], f[1]))
        for _, order, finding, before, after in found:
            self._judge(signals[order][0], finding, before, after, result)

    def _judge(self, signal: str, finding: DriftFinding, before: float, after: float, result: ChunkResult) -> None:
        per = self.drift_counts.setdefault(
            finding.detector, {"warning": 0, "drift": 0, "improvement": 0, "last_drift_index": -1})
        # Detectors see any change of the mean; only a change for the worse
        # (error or loss up, confidence down) is a drift to act on. The model
        # getting better, as it does while it learns, is counted, not acted on.
        worse = after < before if signal == "confidence" else after > before
        if not worse:
            per["improvement"] += 1
            return
        per[finding.kind.value] += 1
        if finding.kind.value == "drift":
            per["last_drift_index"] = finding.index
        result.findings.append(finding)

    def _observe(self, signal: str, value: float, result: ChunkResult, row: int) -> None:
        if self.drift is None:
            return
        findings = self.drift.observe(signal, value, index=self.chunk_base + row)
        detectors = self.drift.detectors
        for finding in findings:
            self._judge(signal, finding, self.estimates.get(finding.detector, math.nan),
                        detectors[finding.detector].estimation, result)
        for name in self.drift_names.get(signal, ()):
            self.estimates[name] = detectors[name].estimation

    def _step(self, t: _Trainable, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
              result: ChunkResult | None, *, count: bool) -> float:
        """One optimizer step; returns the batch loss (NaN when skipped)."""
        c = self.config
        _set_training(t.model, True)
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
        spike = count and self.good_batches >= c.spike_warmup_batches and value > c.spike_factor * self.loss_ema
        if spike and self.spikes_in_a_row < c.spike_patience:
            # The current weights produce an abnormal loss: go back to the last
            # weights that did not, and do not learn from this batch.
            self.spikes_in_a_row += 1
            if t.rollback():
                self.counts["rollbacks"] += 1
            return math.nan
        if spike:
            # The loss stayed high for spike_patience batches in a row: not a
            # bad update but a new level (a concept drift). Accept it and learn.
            self.loss_ema = value
        if count:
            self.spikes_in_a_row = 0
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = list(t.model.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        # A finite total norm means every gradient is finite: one check instead of one per
        # tensor, and the norm is the one clipping needs (clip_grad_norm_ is exactly
        # get_total_norm then clip_grads_with_norm_). Only a non-finite norm (which finite but
        # huge gradients can also give) needs the per-tensor check.
        norm = nn.utils.get_total_norm(grads) if c.clip_norm > 0 and grads else None
        if (norm is None or not math.isfinite(float(norm))) and \
                not all(bool(torch.isfinite(g).all()) for g in grads):
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
            self.good_batches += 1
            self.loss_ema = value if math.isnan(self.loss_ema) else 0.9 * self.loss_ema + 0.1 * value
            if self.lr_boost_left > 0:
                self.lr_boost_left -= 1
                if self.lr_boost_left == 0:
                    self.set_lr(c.lr)
        return value

    # -- regression target statistics ---------------------------------------------

    def _target_mean_std(self) -> tuple[float, float]:
        n, mean, m2 = self.target
        std = math.sqrt(m2 / (n - 1)) if n > 1 else 1.0
        return float(mean), std if std > 1e-12 else 1.0

    def _update_target_stats(self, ys: np.ndarray | None) -> None:
        if ys is None or ys.size == 0:
            return
        n, mean, m2 = self.target
        n_b, mean_b = float(ys.size), float(ys.mean())
        m2_b = float(((ys - mean_b) ** 2).sum())
        total = n + n_b
        delta = mean_b - mean
        self.target = np.array([total, mean + delta * n_b / total, m2 + m2_b + delta * delta * n * n_b / total])

    # -- drift policy actions ---------------------------------------------------------

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of the main model's optimizer."""
        for group in self.main.optimizer.param_groups:
            group["lr"] = lr

    def boost_lr(self, factor: float, steps: int) -> None:
        """Multiply the learning rate by ``factor`` for the next ``steps`` batches."""
        self.set_lr(self.config.lr * factor)
        self.lr_boost_left = steps

    def reset_optimizer(self) -> None:
        """Forget the optimizer's moments (a fresh optimizer on the same weights)."""
        c = self.config
        self.main.optimizer = make_optimizer(c.optimizer, self.main.model.parameters(), c.lr, c.weight_decay)
        self.lr_boost_left = 0

    def start_challenger(self) -> bool:
        """Start a fresh challenger model (no-op if one runs); True if started."""
        if self.challenger is not None:
            return False
        self.challenger = _Trainable(self.config)
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

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything needed to continue bit-identically: (tensors, JSON-able meta)."""
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {}
        for name, t in (("main", self.main), ("challenger", self.challenger)):
            if t is None:
                continue
            _put_trainable(tensors, meta, name, t)
        tensors.update(self.featurizer.state_dict())
        tensors["target"] = torch.from_numpy(self.target.copy())
        seen = self.seen.snapshot()
        tensors["dedup"] = (torch.frombuffer(bytearray(seen), dtype=torch.uint8).reshape(len(seen) // 16, 16)
                            if seen else torch.zeros((0, 16), dtype=torch.uint8))
        meta.update(
            featurizer_counts=self.featurizer.counts, scores=self.scores.state(),
            challenger_scores=self.challenger_scores.state(), champion_scores=self.champion_scores.state(),
            pseudo=self._put_pseudo(tensors),
            loss_ema=None if math.isnan(self.loss_ema) else self.loss_ema, good_batches=self.good_batches,
            spikes_in_a_row=self.spikes_in_a_row,
            lr_boost_left=self.lr_boost_left, examples_seen=self.examples_seen, counts=self.counts,
            drift_counts=self.drift_counts, estimates=self.estimates,
            drift=self.drift.state() if self.drift is not None else None,
        )
        # Tuples (Adam's betas) become lists, as they will when stored as JSON.
        return tensors, json.loads(json.dumps(meta, allow_nan=False))

    def _put_pseudo(self, tensors: dict[str, torch.Tensor]) -> list[list[Any]] | None:
        """The pseudo-label map into ``tensors`` (ids joined by NUL, classes), in order; as
        ``[id, class]`` pairs for the meta only if an id contains a NUL. Up to 100 000 pairs
        as JSON were 90 % of the meta and half of a checkpoint's state_dict time."""
        ids = "\0".join(self.pseudo)
        if any("\0" in k for k in self.pseudo):
            return [[k, v] for k, v in self.pseudo.items()]
        tensors["pseudo.ids"] = torch.frombuffer(bytearray(ids.encode()), dtype=torch.uint8) if ids \
            else torch.zeros(0, dtype=torch.uint8)
        tensors["pseudo.classes"] = torch.from_numpy(
            np.fromiter(self.pseudo.values(), dtype=np.int64, count=len(self.pseudo)))
        return None

    def _get_pseudo(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if meta["pseudo"] is not None:  # pairs in the meta (snapshots before the tensors, or NUL in an id)
            self.pseudo = OrderedDict((k, int(v)) for k, v in meta["pseudo"])
            return
        classes = tensors["pseudo.classes"].tolist()
        ids = tensors["pseudo.ids"].numpy().tobytes().decode().split("\0") if classes else []
        if len(ids) != len(classes):
            raise ValueError(f"state has {len(ids)} pseudo-label ids for {len(classes)} classes")
        self.pseudo = OrderedDict(zip(ids, classes))

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._reset()
        _get_trainable(tensors, meta, "main", self.main)
        if "challenger.model" in meta:
            self.challenger = _Trainable(self.config)
            _get_trainable(tensors, meta, "challenger", self.challenger)
        self.featurizer.load_state_dict(tensors)
        self.featurizer.counts = dict(meta["featurizer_counts"])
        self.target = tensors["target"].numpy().astype(np.float64).copy()
        self.seen.load(tensors["dedup"].contiguous().numpy().tobytes())
        self.scores.restore(meta["scores"])
        self.challenger_scores.restore(meta["challenger_scores"])
        self.champion_scores.restore(meta["champion_scores"])
        self._get_pseudo(tensors, meta)
        self.loss_ema = math.nan if meta["loss_ema"] is None else float(meta["loss_ema"])
        self.good_batches = int(meta["good_batches"])
        self.spikes_in_a_row = int(meta["spikes_in_a_row"])
        self.lr_boost_left = int(meta["lr_boost_left"])
        self.examples_seen = int(meta["examples_seen"])
        self.counts = dict(meta["counts"])
        self.drift_counts = meta["drift_counts"]
        self.estimates = {k: float(v) for k, v in meta["estimates"].items()}
        if self.drift is not None and meta.get("drift") is not None:
            self.drift.restore(meta["drift"])


def _put_optimizer(tensors: dict[str, torch.Tensor], prefix: str, state: dict[str, Any]) -> dict[str, Any]:
    """Flatten an optimizer state_dict: tensors by name, the rest JSON-able."""
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{idx}.{key}"] = value.detach().clone()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return {"param_groups": state["param_groups"], "scalars": scalars,
            "tensor_keys": sorted(f"{idx}.{k}" for idx, p in state["state"].items()
                                  for k, v in p.items() if isinstance(v, torch.Tensor))}


def _get_optimizer(tensors: dict[str, torch.Tensor], prefix: str, meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name in meta["tensor_keys"]:
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = tensors[f"{prefix}.{name}"].clone()
    for idx, scalars in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(scalars)
    return {"state": state, "param_groups": meta["param_groups"]}


def _put_trainable(tensors: dict[str, torch.Tensor], meta: dict[str, Any], name: str, t: _Trainable) -> None:
    for key, value in t.model.state_dict().items():
        tensors[f"{name}.model.{key}"] = value.detach().clone()
    meta[f"{name}.model"] = sorted(t.model.state_dict())
    meta[f"{name}.optimizer"] = _put_optimizer(tensors, f"{name}.optimizer", t.optimizer.state_dict())
    if t.good is not None:
        for key, value in t.good[0].items():
            tensors[f"{name}.good.model.{key}"] = value.detach().clone()
        meta[f"{name}.good.optimizer"] = _put_optimizer(tensors, f"{name}.good.optimizer", t.good[1])


def _get_trainable(tensors: dict[str, torch.Tensor], meta: dict[str, Any], name: str, t: _Trainable) -> None:
    t.model.load_state_dict({key: tensors[f"{name}.model.{key}"] for key in meta[f"{name}.model"]})
    t.optimizer.load_state_dict(_get_optimizer(tensors, f"{name}.optimizer", meta[f"{name}.optimizer"]))
    if f"{name}.good.optimizer" in meta:
        t.good = ({key: tensors[f"{name}.good.model.{key}"].clone() for key in meta[f"{name}.model"]},
                  _get_optimizer(tensors, f"{name}.good.optimizer", meta[f"{name}.good.optimizer"]))
