"""The learner's second stage: score a chunk before learning it (prequential), and pick what it trains on.

Every labeled or late example is scored against the prediction of the
model as it was before the chunk: cumulative and rolling accuracy and log
loss (MAE and RMSE for a regression), the same for what the application
*served*, and, while a challenger runs, its accuracy against the
champion's on the same examples. The drift signals (error, loss,
confidence) go to the :class:`~stream_learner.learn.judge.DriftJudge`.
An unlabeled example whose confidence reaches the threshold is
pseudo-labeled (trained with ``pseudo_weight``) and remembered, so that its
late label can score the pseudo-label's precision.

The scoreboards and the pseudo-label memory are this part's state, saved
and restored by it. A chunk is scored on arrays (its kinds, labels,
confidences), with the values, in the same order, of one example at a time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..events import ExampleEvent, class_name
from .evaluation import Scoreboard, ServedClasses
from .judge import DriftJudge, SignalValues
from .parts import PseudoLabels, Tensors
from .predictor import Predictor
from .target import TargetScaler

if TYPE_CHECKING:
    from .learner import ChunkResult

__all__ = ["Prequential"]

_EPS = 1e-15

#: An example's kind as a code of the chunk's kind array.
_KIND = {"labeled": 0, "late": 1, "unlabeled": 2}
_LATE, _UNLABELED = 1, 2

#: A chunk's training batch: (targets, weights, the rows kept, in increasing order).
Targets = tuple[torch.Tensor, torch.Tensor, list[int]]


class Prequential:
    """Scores a chunk before it is learned and returns its training targets (module docstring).

    ``counts`` is the learner's own tally, shared: this part bumps
    ``labeled``, ``late``, ``pseudo`` and ``pseudo_skipped`` in it.
    """

    def __init__(
        self,
        class_index: Mapping[str, int],
        *,
        regression: bool,
        judge: DriftJudge,
        target: TargetScaler,
        counts: dict[str, int],
        metrics_window: int,
        pseudo_memory: int,
        pseudo_enabled: bool,
        pseudo_threshold: float,
        pseudo_weight: float,
    ) -> None:
        self.class_index = class_index
        self.regression = regression
        self.judge = judge
        self.target = target
        self.counts = counts
        self.metrics_window = metrics_window
        self.pseudo_enabled = pseudo_enabled
        self.pseudo_threshold = pseudo_threshold
        self.pseudo_weight = pseudo_weight
        self.served = ServedClasses(class_index)
        self._class_names = tuple(sorted(class_index, key=class_index.__getitem__))  # in class order
        names = (
            ["mae", "rmse_sq", "served_mae", "served_rmse_sq"]
            if regression
            else ["accuracy", "log_loss", "served_accuracy", "served_log_loss", "pseudo_precision"]
        )
        self.scores = Scoreboard(names, metrics_window)
        self.challenger_scores = Scoreboard(["accuracy"], metrics_window)
        self.champion_scores = Scoreboard(["accuracy"], metrics_window)
        self.pseudo = PseudoLabels(pseudo_memory)

    def start_challenger(self) -> None:
        """A challenger starts: its accuracy and the champion's are compared from now on."""
        self.challenger_scores = Scoreboard(["accuracy"], self.metrics_window)
        self.champion_scores = Scoreboard(["accuracy"], self.metrics_window)

    def challenger_better(self) -> bool:
        """True if the challenger scored better than the champion on the examples since it started."""
        ch, champ = self.challenger_scores.means["accuracy"], self.champion_scores.means["accuracy"]
        return ch.n > 0 and ch.cumulative > champ.cumulative

    def score_regression(
        self, rows: list[ExampleEvent], predictor: Predictor, out: torch.Tensor, result: ChunkResult, base: int
    ) -> Targets:
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
        result.findings.extend(self.judge.observe([("loss", losses, keep)], base))
        self.target.update(ys)
        ys_std = [(y - mean) / std for y in ys]
        return torch.tensor(ys_std, dtype=torch.float32), torch.ones(len(ys), dtype=torch.float32), keep

    def score_classes(
        self,
        rows: list[ExampleEvent],
        predictor: Predictor,
        out: torch.Tensor,
        challenger_out: torch.Tensor | None,
        result: ChunkResult,
        base: int,
    ) -> Targets:
        """Prequential scoring and drift signals, pseudo-labels, then the training targets of the chunk.

        Columnar: the chunk's kinds and labels become arrays once, and the scores, the signals and
        the targets are computed on them. Only what depends on order across rows (the pseudo-label
        memory: an unlabeled example remembered, its late label taking it back, maybe in the same
        chunk) is a loop, in row order, over the rows it concerns. The values, and their order, are
        those of scoring one example at a time.
        """
        n = len(rows)
        probs = predictor.probabilities(out)
        conf, arg = probs.max(dim=1)
        conf_l = conf.tolist()
        arg_np = arg.numpy()
        result.confidences.extend(conf_l)
        class_index, pseudo = self.class_index, self.pseudo
        codes = np.array([_KIND[ex.kind] for ex in rows], dtype=np.int8)
        unlabeled, late = codes == _UNLABELED, codes == _LATE
        # The class index of each label (-1: unlabeled); a label is a class name as given, or a
        # number naming one (the intake checked it is one of the model's classes).
        y = np.array(
            [
                -1
                if ex.kind == "unlabeled"
                else class_index[ex.label if type(ex.label) is str else class_name(ex.label)]  # type: ignore[arg-type]
                for ex in rows
            ],
            dtype=np.int64,
        )
        if self.pseudo_enabled:
            pseudo_rows = unlabeled & (conf.numpy() >= self.pseudo_threshold)
        else:
            pseudo_rows = np.zeros(n, dtype=bool)
        # The pseudo-label memory, in row order: remember an unlabeled example's class, take a late one's.
        pseudo_hits: list[float] = []
        touched = np.flatnonzero(pseudo_rows | late)
        if len(touched):
            arg_l = arg.tolist()
            for i in touched.tolist():
                ex = rows[i]
                if pseudo_rows[i]:
                    pseudo.remember(ex.prediction_event_id, arg_l[i])
                else:
                    was = pseudo.take(ex.prediction_event_id)
                    if was is not None:
                        pseudo_hits.append(1.0 if was == y[i] else 0.0)
        labeled = ~unlabeled
        n_pseudo, n_late = int(np.count_nonzero(pseudo_rows)), int(np.count_nonzero(late))
        n_labeled = int(np.count_nonzero(labeled))
        counts = self.counts
        counts["pseudo"] += n_pseudo
        counts["pseudo_skipped"] += n - n_labeled - n_pseudo
        counts["late"] += n_late
        counts["labeled"] += n_labeled - n_late
        signals: list[SignalValues] = [("confidence", conf_l, list(range(n)))]
        if n_labeled:
            lab = np.flatnonzero(labeled)
            lab_y = y[lab]
            lab_rows = lab.tolist()
            # Indexing copies the probabilities exactly: the same floats as float(probs[i, y]).
            p_y = probs.numpy()[lab, lab_y].tolist()
            hit = arg_np[lab] == lab_y
            accuracy = hit.astype(np.float64).tolist()
            log = math.log
            losses = [-log(max(p, _EPS)) for p in p_y]
            scores = self.scores
            scores.update_many("accuracy", accuracy)
            scores.update_many("log_loss", losses)
            served_acc, served_loss = self._served_scores([rows[i].prediction for i in lab_rows], lab_y)
            scores.update_many("served_accuracy", served_acc)
            scores.update_many("served_log_loss", served_loss)
            scores.update_many("pseudo_precision", pseudo_hits)
            if challenger_out is not None:
                challenger_hit = challenger_out.argmax(dim=1).numpy()[lab] == lab_y
                self.challenger_scores.update_many("accuracy", challenger_hit.astype(np.float64).tolist())
                self.champion_scores.update_many("accuracy", accuracy)
            signals.append(("error", (~hit).astype(np.float64).tolist(), lab_rows))
            signals.append(("loss", losses, lab_rows))
        result.findings.extend(self.judge.observe(signals, base))
        keep = np.flatnonzero(labeled | pseudo_rows)
        pseudo_kept = unlabeled[keep]
        ys = np.where(pseudo_kept, arg_np[keep], y[keep])
        ws = np.where(pseudo_kept, np.float32(self.pseudo_weight), np.float32(1.0)).astype(np.float32)
        return torch.from_numpy(ys), torch.from_numpy(ws), keep.tolist()

    def _served_scores(self, predictions: list[Any], y: np.ndarray) -> tuple[list[float], list[float]]:
        """The served accuracy and log loss of labeled examples (their served predictions, their classes).

        When every prediction is ``{class: probability}`` with the model's classes in class order
        (what an application serving this model sends), one matrix: the served class is its
        first most probable one, as :meth:`ServedClasses.of` picks it. Otherwise, prediction by
        prediction (another order, other keys, a value); either way the same values.
        """
        names = self._class_names
        if predictions and all(type(p) is dict and tuple(p) == names for p in predictions):
            matrix = np.array([list(p.values()) for p in predictions], dtype=np.float64)
            accuracy = (matrix.argmax(axis=1) == y).astype(np.float64).tolist()
            log = math.log
            return accuracy, [-log(max(p, _EPS)) for p in matrix[np.arange(len(y)), y].tolist()]
        served_acc: list[float] = []
        served_loss: list[float] = []
        served_of = self.served.of
        for prediction, yi in zip(predictions, y.tolist()):
            served = served_of(prediction)
            if served is not None:
                served_acc.append(1.0 if served[0] == yi else 0.0)
                served_loss.append(-math.log(max(served[1].get(yi, 0.0), _EPS)))
        return served_acc, served_loss

    def save(self, tensors: Tensors) -> dict[str, Any]:
        """The scoreboards' JSON-able state, and the pseudo-labels (into ``tensors``, their meta here)."""
        return {
            "scores": self.scores.state(),
            "challenger_scores": self.challenger_scores.state(),
            "champion_scores": self.champion_scores.state(),
            "pseudo": self.pseudo.save(tensors),
        }

    def load(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`save` wrote."""
        self.scores.restore(meta["scores"])
        self.challenger_scores.restore(meta["challenger_scores"])
        self.champion_scores.restore(meta["champion_scores"])
        self.pseudo.load(tensors, meta["pseudo"])
