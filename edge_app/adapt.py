"""Adaptation to a laboratory's own microscope, on the device, from the cells its people reviewed.

What a model learnt in Barcelona transfers to another microscope in its backbone: the pooled
features still separate the white-cell classes; what does not transfer is the last layer and its
class priors. So ``bmc edge adapt`` refits only that layer — a softmax regression on the cell
embeddings the sessions recorded, in numpy, in seconds — from:

* the cells a person labelled with ``bmc edge review`` (class-balanced: five monocytes weigh as
  much as fifty neutrophils);
* the model's *guard set*, a few hundred embedded training cells per class shipped with it, so
  that the head keeps every class the laboratory did not review;
* an anchor to the shipped head (an L2 penalty on the distance to its weights), so that a handful
  of cells moves it only as far as they justify.

It is validated before anything is written: cross-validation over the reviewed cells, grouped by
field (cells of one field never on both sides), compares the shipped head and the adapted one on
cells neither was fitted on, and a quarter of the guard set, never fitted, measures forgetting. The
adapted model is refused (nothing written) unless it is better on the held-out reviewed cells and
forgets no more than ``max_guard_drop`` points of the training classes.

A model that is written is a new artifact (STYLE.md, "Learning on the device"): the shipped
``.tflite`` copied unchanged, the new head, the guard set and a card that records the base model's
sha256, the sessions, cells per class and reviewers it learnt from, the validation and the date.
The shipped files are never touched.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bmc.card import ModelCard, card_path, file_beside, sha256_file
from bmc.edge_app import sessiondb
from bmc.edge_app.calibration import LabCalibration, calibrate, calibration_order, decided_prefix, session_seed
from bmc.edge_app.differential import NOT_NUCLEATED, ReviewPolicy
from bmc.edge_app.head import Head, softmax
from bmc.edge_app.sessiondb import REJECTED
from bmc.edge_app.unknown import DEFAULT_LEVEL
from bmc.errors import BmcError

if TYPE_CHECKING:
    from bmc.edge_app.classifier import CellClassifier

GUARD_SUFFIX = ".guard.npz"
HEAD_SUFFIX = ".head.npz"
MIN_NEW_CLASS = 3  # reviewed cells a class the model does not know needs before it is learnt


class AdaptError(BmcError, ValueError):
    """Adaptation that cannot be done or is refused; the message says why and what would help."""


@dataclasses.dataclass(frozen=True)
class Settings:
    anchor: float = 0.1  # L2 pull towards the shipped head (on the move, standardised units; data weigh 1 in all)
    components: int = 64  # the directions of the embedding the head may move in
    use_context: bool = True  # those directions from the sessions' cells too, not only the reviewed ones
    guard_weight: float = 1.0  # the guard set's total weight against the reviewed cells' (1.0: equal)
    steps: int = 300
    learning_rate: float = 0.05
    folds: int = 5
    cv_repeats: int = 3  # fold assignments averaged
    max_guard_drop: float = 3.0  # points of guard-set accuracy the adapted head may lose
    # the gates calibrated on the random reviewed cells: the unknown-cell level, and the error rate
    # the cells counted with no person may have (bmc.edge_app.calibration)
    unknown_level: float = DEFAULT_LEVEL
    target_error: float = 0.05
    guard_check: float = 0.25  # share of the guard set held out to measure forgetting
    # the laboratory's reference grows: cells its sessions counted with no person, at least this sure,
    # that the adapted head names the same, join the reviewed cells as known ground (0: off), at most
    # grow_limit of them (an even sample). Off by default: on BCCD it took as many cells from the
    # unknown check as the calibrated confidence rule then set aside as unsure (bench autonomy --days)
    grow_confidence: float = 0.0
    grow_limit: int = 4000
    seed: int = 0


@dataclasses.dataclass
class Reviewed:
    """The reviewed cells of some sessions: embeddings, labels, and where each came from."""

    x: np.ndarray
    labels: list[str]
    groups: list[str]  # one per field: cells of a field stay on one side of a fold
    cell_ids: list[tuple[str, int]]
    sessions: list[str]
    reviewers: list[str]
    context: np.ndarray | None = None  # every recorded cell's embedding: the microscope's variation, label-free
    # the random calibration sample (bmc.edge_app.calibration): which reviewed cells belong to it, and
    # its cells a person rejected or named with a class the model does not learn here (embeddings, fields)
    calibration: list[bool] = dataclasses.field(default_factory=list)
    rejected_x: np.ndarray | None = None
    rejected_groups: list[str] = dataclasses.field(default_factory=list)
    # the cells the sessions counted with no person, sure enough to grow the reference (Settings.grow_confidence)
    counted_x: np.ndarray | None = None
    counted_labels: list[str] = dataclasses.field(default_factory=list)
    counted_groups: list[str] = dataclasses.field(default_factory=list)


# -- the guard set -----------------------------------------------------------------------------------


def load_guard(model_path: str | Path, card: ModelCard) -> dict[str, Any]:
    """The guard set the card names (``card.guard``), beside ``model_path``, checked against its sha256."""
    g = card.guard
    if not g:
        raise AdaptError(
            f"{model_path}: its card names no guard set, so a head fitted on the device could "
            "forget the classes it was not shown; prepare the model with 'bmc prepare-adapt'"
        )
    path = file_beside(model_path, g, "guard set", AdaptError)
    with np.load(path) as z:
        return {
            "x": z["embedding"].astype(np.float32) * float(z["scale"]),
            "y": z["label"].astype(np.int64),
            "labels": [str(l) for l in z["labels"]],
            "w": z["head_w"].astype(np.float32),
            "b": z["head_b"].astype(np.float32),
            "path": path,
            "orientations": int(z["orientations"]),
        }


# -- the reviewed cells --------------------------------------------------------------------------------


def collect(
    sessions: Iterable[str | Path], clf: CellClassifier, grow_confidence: float = Settings.grow_confidence
) -> Reviewed:
    """The reviewed cells (a person's label, not 'rejected') of ``sessions``, with their embeddings:
    as recorded, or recomputed from the cell's crop by ``clf`` for sessions recorded without; and the
    cells counted with no person at least ``grow_confidence`` sure, with their recorded embeddings."""
    from bmc.contract import preprocess, read_image
    from bmc.edge_app.report import session_file

    xs: list[np.ndarray] = []
    labels: list[str] = []
    groups: list[str] = []
    ids: list[tuple[str, int]] = []
    names: list[str] = []
    reviewers: set[str] = set()
    context: list[np.ndarray] = []
    calibration: list[bool] = []
    rejected: list[np.ndarray] = []
    rejected_groups: list[str] = []
    counted: list[np.ndarray] = []
    counted_labels: list[str] = []
    counted_groups: list[str] = []
    size = clf.backend.output_sizes[1]
    # each recorded session once: a folder given twice, or a copy of one, would count its cells twice
    # (and its random sample twice, in the error rate stated from it)
    seen: dict[tuple[str, str, str, str], Path] = {}
    for folder in map(Path, sessions):
        try:
            db = sessiondb.connect(folder)
            recorded = sessiondb.sessions(db)
            for r in recorded:
                key = (r.started, r.device, r.source, r.model_sha256)
                if key in seen:
                    db.close()
                    same = seen[key].resolve() == folder.resolve()
                    raise AdaptError(
                        f"{folder}: given twice"
                        if same
                        else f"{folder} and {seen[key]} hold the same session (started {r.started}): one is a copy "
                        "of the other; give each session once"
                    )
                seen[key] = folder
            cells = sessiondb.cells(db)
            stored = sessiondb.embeddings(db)
            db.close()
            context += list(stored.values())
        except (FileNotFoundError, sessiondb.UnreadableSession) as e:
            raise AdaptError(str(e)) from e
        except sqlite3.DatabaseError as e:
            raise AdaptError(f"{folder / 'session.sqlite'}: not a readable session database ({e})") from e
        other = {(r.model_sha256, r.model_file) for r in recorded if r.model_sha256 != clf.sha256}
        if other:
            raise AdaptError(
                f"{folder}: recorded with {', '.join(f'{f} (sha256 {s[:12]}…)' for s, f in sorted(other))}, "
                f"not with {clf.path.name} (sha256 {clf.sha256[:12]}…): the cells of one adaptation "
                "must share the base model's embedding; adapt each base model's sessions apart"
            )
        names.append(str(folder))
        sample = set()
        for r in recorded:
            in_session = [c.id for c in cells if c.session_id == r.id]
            decided = {c.id for c in cells if c.session_id == r.id and c.reviewed_label}
            order = calibration_order(in_session, session_seed(folder.name, r.id, r.started))
            sample |= set(decided_prefix(order, decided))
        for c in cells:
            if grow_confidence and c.status == "counted" and c.confidence >= grow_confidence and c.id in stored:
                counted.append(stored[c.id])
                counted_labels.append(c.model_label)
                counted_groups.append(f"{folder}|{c.session_id}|{c.source}|{c.frame}")
            if c.id in sample and c.reviewed_label == REJECTED and c.id in stored:
                rejected.append(stored[c.id])
                rejected_groups.append(f"{folder}|{c.session_id}|{c.source}|{c.frame}")
            if not c.reviewed_label or c.reviewed_label == REJECTED:
                continue
            calibration.append(c.id in sample)
            if c.id in stored:
                x = stored[c.id]
                if x.shape != (size,):
                    raise AdaptError(f"{folder}: cell {c.id}'s embedding has {x.size} numbers, the model's {size}")
            else:
                path = session_file(folder, c.crop)
                if path is None or not path.is_file():
                    raise AdaptError(
                        f"{folder}: cell {c.id} ({c.reviewed_label}) has no recorded embedding and its "
                        f"crop {c.crop or '(none saved)'} is missing; record sessions with crops or with "
                        "this bmc, which stores each cell's embedding"
                    )
                try:
                    image = read_image(str(path))
                except ValueError as e:
                    raise AdaptError(f"{folder}: cell {c.id}: {e}") from e
                emb = clf.predict_cells(preprocess(image, clf.contract, "BGR", crop=False)[None])[1]
                if emb is None:
                    raise AdaptError(f"{clf.path.name} gives no embedding: it cannot be adapted on the device")
                x = emb[0]
            xs.append(x)
            labels.append(c.reviewed_label)
            groups.append(f"{folder}|{c.session_id}|{c.source}|{c.frame}")
            ids.append((str(folder), c.id))
            reviewers.add(c.reviewer)
    if not xs:
        raise AdaptError(
            f"no reviewed cells in {', '.join(names)}: review some first (bmc edge review "
            "--for-adapt), 5-10 per class the session found"
        )
    return Reviewed(
        np.stack(xs).astype(np.float32),
        labels,
        groups,
        ids,
        names,
        sorted(reviewers),
        np.stack(context) if context else None,
        calibration,
        np.stack(rejected) if rejected else None,
        rejected_groups,
        np.stack(counted) if counted else None,
        counted_labels,
        counted_groups,
    )


# -- the fit ------------------------------------------------------------------------------------------


def _balanced_weights(y: np.ndarray, total: float) -> np.ndarray:
    """Weights summing to ``total``, shared equally by the classes present (five monocytes weigh as
    much as fifty neutrophils)."""
    counts = np.bincount(y)
    present = int((counts > 0).sum())
    return np.asarray(total / (present * counts[y]))


def subspace(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The mean and the top ``k`` principal directions (embedding x k) of the embeddings ``x``."""
    mu = x.mean(axis=0)
    xc = x - mu
    vals, vecs = np.linalg.eigh((xc.T @ xc) / max(len(x) - 1, 1))
    order = np.argsort(vals)[::-1][:k]
    return mu, vecs[:, order].astype(np.float32)


def fit_head(
    x: np.ndarray,
    y: np.ndarray,
    weight: np.ndarray,
    w0: np.ndarray,
    b0: np.ndarray,
    basis: tuple[np.ndarray, np.ndarray],
    s: Settings = Settings(),
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted softmax regression anchored to the shipped head ``(w0, b0)``; returns ``(w, b)``.

    The head moves from the shipped one only within ``basis`` (the embeddings' main directions:
    ``w = w0 + P @ dw``), with an L2 penalty ``anchor`` on the move in standardised units: a handful
    of cells shifts the head as far as they justify, and a fit takes milliseconds (k x classes
    numbers instead of embedding x classes)."""
    mu, proj = basis
    z = (x - mu) @ proj
    sd = z.std(axis=0) + 1e-6
    z = z / sd
    base = x @ w0 + b0
    n_cls = w0.shape[1]
    dw = np.zeros((z.shape[1], n_cls), np.float32)
    db = np.zeros(n_cls, np.float32)
    onehot = np.eye(n_cls, dtype=np.float32)[y]
    wt = (weight / weight.sum()).astype(np.float32)[:, None]
    m = [np.zeros_like(dw), np.zeros_like(db)]
    v = [np.zeros_like(dw), np.zeros_like(db)]
    for t in range(1, s.steps + 1):
        g = wt * (softmax(base + z @ dw + db) - onehot)
        grads = (z.T @ g + s.anchor * dw, g.sum(axis=0))
        for k, (param, grad) in enumerate(((dw, grads[0]), (db, grads[1]))):
            m[k] = 0.9 * m[k] + 0.1 * grad
            v[k] = 0.999 * v[k] + 0.001 * grad * grad
            param -= s.learning_rate * (m[k] / (1 - 0.9**t)) / (np.sqrt(v[k] / (1 - 0.999**t)) + 1e-8)
    step = proj @ (dw / sd[:, None])  # back to the embedding: w = w0 + P diag(1/sd) dw
    return (w0 + step).astype(np.float32), (b0 + db - mu @ step).astype(np.float32)


def _extend(w0: np.ndarray, b0: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The shipped head with a zero column for each class it does not know (learnt from reviews)."""
    extra = n - w0.shape[1]
    if extra <= 0:
        return w0, b0
    return (
        np.concatenate([w0, np.zeros((len(w0), extra), np.float32)], axis=1),
        np.concatenate([b0, np.full(extra, b0.min(), np.float32)]),
    )


def _recall(y: np.ndarray, pred: np.ndarray, classes: Iterable[int]) -> dict[int, float]:
    return {c: float((pred[y == c] == c).mean()) for c in classes if (y == c).any()}


def _folds(groups: list[str], y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A fold per cell: whole fields, dealt out class by class so every fold sees every class."""
    rng = np.random.default_rng(seed)
    first: dict[str, int] = {}
    for g, label in zip(groups, y):
        first.setdefault(g, label)
    order = sorted(first, key=lambda g: (first[g], rng.random()))
    fold_of = {g: i % k for i, g in enumerate(order)}
    return np.array([fold_of[g] for g in groups])


@dataclasses.dataclass
class Result:
    head: Head
    labels: list[str]
    cells_per_class: dict[str, int]
    cross_validation: dict[str, Any]
    guard: dict[str, Any]
    accepted: bool
    reasons: list[str]
    advice: list[str]
    seconds: float
    oof: np.ndarray | None = None  # each reviewed cell's probabilities from heads not fitted on it
    shipped_probs: np.ndarray | None = None  # each reviewed cell's probabilities from the shipped head
    # where the adapted head was refused and the shipped one kept with the laboratory's gates
    # (keep_shipped_head): why the adapted head was refused
    kept_shipped: list[str] = dataclasses.field(default_factory=list)
    # which reviewed cells are known ground (None: those of a class the head names)
    known: np.ndarray | None = None
    calibration: LabCalibration | None = None  # the gates the random reviewed cells set
    # the counted cells that join the reference (grown_reference), and their fields
    grown: np.ndarray | None = None
    grown_groups: list[str] = dataclasses.field(default_factory=list)

    def reference(self, reviewed: "Reviewed") -> np.ndarray:
        """The adapted model's known ground beside the guard set: the reviewed cells of the classes
        its head names (a cell of a class it cannot name is no known ground for it), and the
        counted cells that grew it."""
        x = reviewed.x[self.named(reviewed)]
        return x if self.grown is None else np.concatenate([x, self.grown])

    def named(self, reviewed: "Reviewed") -> np.ndarray:
        """Which reviewed cells are known ground for this head: those of a class it names (a head
        learns the cells it is fitted on), or the ones :func:`keep_shipped_head` chose."""
        if self.known is not None:
            return self.known
        return np.array([l in self.labels for l in reviewed.labels], bool)

    def gates(self) -> str:
        """One sentence on the gates the random reviewed cells set, and the error they state (or why
        there is no statement): what ``bmc edge adapt`` and the screen say after the table."""
        c = self.calibration
        if c is None:
            return (
                "No random calibration sample: fewer than 20 cells of the sessions' random order were reviewed "
                "from its top without a gap (a cell left undecided ends the sample), so the model's own gates are "
                "kept and no error is stated; bmc edge review --for-calibration 60 lists the cells to review, "
                "gaps first."
            )
        return (
            f"Gates set on {c.cells} randomly chosen reviewed cells: counted without a person from confidence "
            f"{c.min_confidence:.2f}, which {c.passed} of them pass (each judged by the rule the other cells set). "
            f"{c.statement()}."
        )

    def table(self) -> str:
        cv = self.cross_validation
        lines = [
            f"cross-validation over {cv['cells']} reviewed cells in {cv['fields']} fields ({cv['folds']} folds, "
            "grouped by field): recall of each class on cells neither head was fitted on (adapted: the mean over "
            f"{cv.get('repeats', 1)} draws of the folds)",
            f"  {'class':<16}{'cells':>6}{'shipped':>9}{'adapted':>9}",
        ]
        for l in self.labels:
            if l in cv["shipped"]["recall"]:
                lines.append(
                    f"  {l:<16}{self.cells_per_class.get(l, 0):>6}{cv['shipped']['recall'][l]:>9.2f}"
                    f"{cv['adapted']['recall'][l]:>9.2f}"
                )
        lines.append(
            f"  {'balanced':<16}{'':>6}{cv['shipped']['balanced_accuracy']:>9.3f}"
            f"{cv['adapted']['balanced_accuracy']:>9.3f}"
        )
        if "decision" in cv:
            d = cv["decision"]
            lines.append(
                f"  class-balanced log-loss {cv['shipped']['log_loss']:.3f} shipped, {cv['adapted']['log_loss']:.3f} "
                f"adapted: {abs(d['gain']):.3f} {'lower' if d['gain'] >= 0 else 'higher'} (the gain's 95% interval "
                f"{d['low']:+.3f} to {d['high']:+.3f}, paired "
                f"bootstrap over {d['fields']} fields)"
            )
        g = self.guard
        lines.append(
            f"guard set ({g['held_out']} training cells never fitted): accuracy {g['shipped_accuracy']:.3f} "
            f"shipped, {g['adapted_accuracy']:.3f} adapted ({g['drop_points']:+.1f} points lost)"
        )
        return "\n".join(lines)


def adapt(
    reviewed: Reviewed, guard: dict[str, Any], s: Settings = Settings(), log: Callable[[str], None] = print
) -> Result:
    """Fit, cross-validate and judge an adapted head; nothing is written here."""
    t0 = time.perf_counter()
    base = list(guard["labels"])
    counts = Counter(reviewed.labels)
    new = sorted(l for l in counts if l not in base)
    few = [l for l in new if counts[l] < MIN_NEW_CLASS]
    if few:
        raise AdaptError(
            "too few reviewed cells to learn "
            + ", ".join(f"'{l}' ({counts[l]} cell{'s' * (counts[l] != 1)})" for l in few)
            + f", a class the model does not know: review at least {MIN_NEW_CLASS} of each"
        )
    if len(counts) < 2:
        only = next(iter(counts))
        raise AdaptError(
            f"all {counts[only]} reviewed cells are '{only}': a head fitted on one class only learns to "
            "call everything that; review cells of at least two classes (bmc edge review --for-adapt "
            "spreads them)"
        )
    labels = base + new
    index = {l: i for i, l in enumerate(labels)}
    y = np.array([index[l] for l in reviewed.labels])
    x = reviewed.x
    w0, b0 = _extend(guard["w"], guard["b"], len(labels))
    rng = np.random.default_rng(s.seed)
    check = np.zeros(len(guard["y"]), bool)
    for c in np.unique(guard["y"]):  # a stratified quarter of the guard set, never fitted
        members = np.flatnonzero(guard["y"] == c)
        check[rng.choice(members, int(round(len(members) * s.guard_check)), replace=False)] = True
    gx, gy = guard["x"][~check], guard["y"][~check]
    seen = [x, gx] + ([reviewed.context] if reviewed.context is not None and s.use_context else [])
    basis = subspace(np.concatenate(seen), s.components)  # label-free: shared by every fold

    def fit(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xx = np.concatenate([x[lab], gx])
        yy = np.concatenate([y[lab], gy])
        wt = np.concatenate([_balanced_weights(y[lab], 1.0), _balanced_weights(gy, s.guard_weight)])
        return fit_head(xx, yy, wt, w0, b0, basis, s)

    n_groups = len(set(reviewed.groups))
    k = max(2, min(s.folds, n_groups))
    if n_groups < 2:
        raise AdaptError("the reviewed cells all come from one field: review cells of more fields")
    # the shipped head on every reviewed cell; the adapted head on each cell from the folds that did
    # not fit it, over several fold assignments (one assignment of a few dozen cells is noisy)
    # (its own softmax over the classes it knows; it cannot name a new class: probability 0)
    ship_p = np.zeros((len(y), len(labels)), np.float32)
    ship_p[:, : len(base)] = softmax(x @ w0[:, : len(base)] + b0[: len(base)])
    adapted_p = np.zeros((s.cv_repeats, len(y), len(labels)), np.float32)
    for rep in range(s.cv_repeats):
        fold = _folds(reviewed.groups, y, k, s.seed + rep)
        for f in range(k):
            held = fold == f
            w, b = fit(~held)
            adapted_p[rep, held] = softmax(x[held] @ w + b)
    present = sorted(set(y.tolist()))
    cls_w = _balanced_weights(y, 1.0)

    def summary(probs: np.ndarray) -> dict[str, Any]:
        pred = probs.argmax(axis=1)
        rec = _recall(y, pred, present)
        return {
            "balanced_accuracy": float(np.mean(list(rec.values()))),
            "accuracy": float((pred == y).mean()),
            "log_loss": float(-(cls_w * np.log(np.clip(probs[np.arange(len(y)), y], 1e-6, 1))).sum()),
            "recall": {labels[c]: v for c, v in rec.items()},
        }

    reps = [summary(adapted_p[r]) for r in range(s.cv_repeats)]
    adapted: dict[str, Any] = {
        "balanced_accuracy": float(np.mean([r["balanced_accuracy"] for r in reps])),
        "accuracy": float(np.mean([r["accuracy"] for r in reps])),
        "log_loss": float(np.mean([r["log_loss"] for r in reps])),
        "recall": {l: float(np.mean([r["recall"][l] for r in reps])) for l in reps[0]["recall"]},
    }
    shipped = summary(ship_p)
    r_ship = {index[l]: v for l, v in shipped["recall"].items()}
    r_adapt = {index[l]: v for l, v in adapted["recall"].items()}
    cv = {
        "cells": len(y),
        "fields": n_groups,
        "folds": k,
        "repeats": s.cv_repeats,
        "shipped": shipped,
        "adapted": adapted,
    }
    w, b = fit(np.ones(len(y), bool))
    cx, cy = guard["x"][check], guard["y"][check]
    g_ship = float((np.argmax(cx @ w0[:, : len(base)] + b0[: len(base)], axis=1) == cy).mean())
    g_adapt = float((np.argmax(cx @ w + b, axis=1) == cy).mean())
    gd = {
        "held_out": int(check.sum()),
        "shipped_accuracy": g_ship,
        "adapted_accuracy": g_adapt,
        "drop_points": 100 * (g_ship - g_adapt),
    }
    reasons, advice = [], []
    # better, on reviewed cells each head was not fitted on, judged by a proper score that a few
    # dozen cells can measure: the class-balanced log-loss, its paired difference bootstrapped over
    # the reviewed fields; and no class's recall lower by more than its own sampling noise
    decision = paired_log_loss(y, ship_p, adapted_p.mean(axis=0), cls_w, reviewed.groups, s.seed)
    cv["decision"] = decision
    if decision["low"] <= 0:
        reasons.append(
            f"on held-out reviewed cells the adapted head is not surely better than the shipped one: its "
            f"class-balanced log-loss is {abs(decision['gain']):.3f} {'lower' if decision['gain'] >= 0 else 'higher'} "
            f"(the gain's 95% interval {decision['low']:+.3f} to "
            f"{decision['high']:+.3f}, bootstrapped over {decision['fields']} fields; balanced accuracy "
            f"{adapted['balanced_accuracy']:.3f} against {shipped['balanced_accuracy']:.3f})"
        )
    for c in present:
        n_c = int((y == c).sum())
        noise = max(1.0 / n_c, 2.0 * np.sqrt(max(r_ship[c] * (1 - r_ship[c]), 0.25 / n_c) / n_c))
        if r_adapt[c] < r_ship[c] - noise:
            reasons.append(
                f"{labels[c]} loses more than its noise: recall {r_ship[c]:.2f} → {r_adapt[c]:.2f} on {n_c} cells "
                f"(noise ±{noise:.2f})"
            )
    if gd["drop_points"] > s.max_guard_drop:
        reasons.append(
            f"it forgets the training classes: guard-set accuracy {g_adapt:.3f} against {g_ship:.3f} "
            f"(more than {s.max_guard_drop:g} points lost)"
        )
    for c in present:
        n = counts[labels[c]]
        if n < 5 or r_adapt[c] < r_ship[c]:
            advice.append(
                f"{labels[c]} ({n} reviewed, recall {r_ship[c]:.2f} → {r_adapt[c]:.2f}): "
                f"review about {max(5, 10 - n)} more"
            )
    head = Head(w, b, tuple(labels))
    return Result(
        head,
        labels,
        dict(counts),
        cv,
        gd,
        not reasons,
        reasons,
        advice,
        time.perf_counter() - t0,
        oof=adapted_p.mean(axis=0),
        shipped_probs=ship_p,
    )


def paired_log_loss(
    y: np.ndarray,
    ship_p: np.ndarray,
    adapted_p: np.ndarray,
    weight: np.ndarray,
    groups: list[str],
    seed: int = 0,
    rounds: int = 2000,
) -> dict[str, Any]:
    """How much lower the adapted head's class-balanced log-loss is than the shipped head's on the
    same cells (positive: better), with a 95% interval from a paired bootstrap over the fields
    (cells of one field resampled together: they are not independent)."""
    idx = np.arange(len(y))
    d = -np.log(np.clip(ship_p[idx, y], 1e-6, 1)) + np.log(np.clip(adapted_p[idx, y], 1e-6, 1))
    w = np.asarray(weight, np.float64)
    names = sorted(set(groups))
    of = np.array([names.index(g) for g in groups])
    gain = float((w * d).sum() / w.sum())
    rng = np.random.default_rng(seed)
    wd = np.bincount(of, weights=w * d, minlength=len(names))
    ww = np.bincount(of, weights=w, minlength=len(names))
    draws = rng.integers(0, len(names), (rounds, len(names)))
    boot = wd[draws].sum(axis=1) / np.maximum(ww[draws].sum(axis=1), 1e-12)
    low, high = np.quantile(boot, [0.025, 0.975])
    return {"gain": gain, "low": float(low), "high": float(high), "fields": len(names), "rounds": rounds}


def grown_reference(
    result: Result, reviewed: Reviewed, s: Settings = Settings()
) -> tuple[np.ndarray | None, list[str]]:
    """The counted cells that join the reference: those the adapted head names as the session did,
    at least ``s.grow_confidence`` sure, at most ``s.grow_limit`` (an even, seeded sample).

    A cell joins only if the session counted it, so it lay within the unknown-cell threshold of the
    reference of the model that recorded it: the known ground grows by one step per generation of
    sessions, from cells already known, never by absorbing a cell that was set aside."""
    if reviewed.counted_x is None or not s.grow_confidence:
        return None, []
    p = result.head.probabilities(reviewed.counted_x)
    names = np.array(result.labels)[p.argmax(axis=1)]
    keep = np.flatnonzero((names == np.array(reviewed.counted_labels)) & (p.max(axis=1) >= s.grow_confidence))
    if len(keep) > s.grow_limit:
        keep = np.sort(np.random.default_rng(s.seed).choice(keep, s.grow_limit, replace=False))
    if not len(keep):
        return None, []
    return reviewed.counted_x[keep], [reviewed.counted_groups[i] for i in keep]


def calibrate_gates(
    result: Result,
    reviewed: Reviewed,
    guard: dict[str, Any],
    clf: CellClassifier,
    level: float,
    target_error: float,
    lowest: float = 0.0,
) -> LabCalibration | None:
    """The laboratory's gates (:mod:`bmc.edge_app.calibration`) from the random sample among the
    reviewed cells, or None when the sample is too small: out-of-fold probabilities for its reviewed
    cells, the final head's for the cells it rejected (never fitted), and each cell's distance to
    the adapted model's reference (the guard set, the reviewed cells and the counted cells that grew
    it) without its own field."""
    from bmc.edge_app import unknown

    pick = np.flatnonzero(np.asarray(reviewed.calibration, bool)) if reviewed.calibration else np.zeros(0, int)
    n_rej = 0 if reviewed.rejected_x is None else len(reviewed.rejected_x)
    if len(pick) + n_rej < 20 or result.oof is None:
        return None
    index = {l: i for i, l in enumerate(result.labels)}
    probs = [result.oof[i] for i in pick]
    truth: list[int | None] = [index.get(reviewed.labels[i]) for i in pick]
    xs = [reviewed.x[i] for i in pick]
    groups = [reviewed.groups[i] for i in pick]
    if n_rej:
        rej = softmax(reviewed.rejected_x @ result.head.w + result.head.b)
        probs += list(rej)
        truth += [None] * n_rej
        xs += list(reviewed.rejected_x if reviewed.rejected_x is not None else [])
        groups += reviewed.rejected_groups
    card_threshold = None
    distances = None
    if clf.card.unknown:
        card_threshold = unknown.threshold_at(clf.card.unknown, level)
        ref = np.concatenate([guard["x"], result.reference(reviewed)])
        named = [g for g, ok in zip(reviewed.groups, result.named(reviewed)) if ok]
        ref_groups = np.array([""] * len(guard["x"]) + named + result.grown_groups)
        distances = np.array([unknown.distances(x[None], ref[ref_groups != g])[0] for x, g in zip(xs, groups)])
    apart = tuple(i for i, l in enumerate(result.labels) if l in NOT_NUCLEATED)
    return calibrate(np.stack(probs), truth, distances, card_threshold, level, target_error, apart=apart, lowest=lowest)


def keep_shipped_head(
    result: Result, reviewed: Reviewed, guard: dict[str, Any], clf: CellClassifier, s: Settings = Settings()
) -> Result | None:
    """Where the adapted head is refused: the shipped head, unchanged, with the laboratory's gates —
    its reviewed cells as known ground for the unknown-cell check, and the confidence rule and the
    stated error that its random sample sets (the shipped head was fitted on none of those cells, so
    its own probabilities state the error honestly). None when there is no random sample to set them
    (the laboratory then has nothing a refused head does not give it)."""
    if result.accepted or result.shipped_probs is None:
        return None
    base = list(guard["labels"])
    # known ground: only the reviewed cells the shipped head itself names rightly (it learnt none of
    # them: a near-copy of a monocyte it calls a lymphocyte must still be set aside, not counted)
    called = [base[i] for i in result.shipped_probs[:, : len(base)].argmax(axis=1)]
    known = np.array([l == c for l, c in zip(reviewed.labels, called)], bool)
    kept = dataclasses.replace(
        result,
        head=Head(guard["w"], guard["b"], tuple(base)),
        labels=base,
        guard={**result.guard, "adapted_accuracy": result.guard["shipped_accuracy"], "drop_points": 0.0},
        accepted=True,
        reasons=[],
        oof=result.shipped_probs[:, : len(base)],
        calibration=None,
        grown=None,
        grown_groups=[],
        kept_shipped=list(result.reasons),
        known=known,
    )
    # and never a looser confidence rule than the device's own: nothing the laboratory reviewed
    # showed this head better than it was shipped
    kept.calibration = calibrate_gates(
        kept, reviewed, guard, clf, s.unknown_level, s.target_error, lowest=ReviewPolicy().min_confidence
    )
    return kept if kept.calibration is not None else None


def model_to_write(
    result: Result, reviewed: Reviewed, guard: dict[str, Any], clf: CellClassifier, s: Settings = Settings()
) -> Result | None:
    """What an adaptation leaves the laboratory: the adapted head where it was accepted, else the
    shipped head with the laboratory's gates (:func:`keep_shipped_head`), else None (nothing to
    write). ``bmc edge adapt``, the screen and the benchmarks all write this."""
    return result if result.accepted else keep_shipped_head(result, reviewed, guard, clf, s)


def prepare(
    sessions: Iterable[str | Path], clf: CellClassifier, s: Settings = Settings(), log: Callable[[str], None] = print
) -> tuple[dict[str, Any], Reviewed, Result]:
    """(guard set, reviewed cells, judged head) for adapting ``clf`` from ``sessions``: what
    ``bmc edge adapt``, the screen and ``bmc bench adapt`` all do before anything is written."""
    if clf.head is not None:  # an adapted model: start again from its base, the shipped head
        raise AdaptError(
            f"{clf.path} is itself adapted; adapt from its base model "
            f"{(clf.card.base_model or {}).get('file', '?')} with all the sessions to learn from"
        )
    guard = load_guard(clf.path, clf.card)
    reviewed = collect(sessions, clf, s.grow_confidence)
    result = adapt(reviewed, guard, s, log)
    result.grown, result.grown_groups = grown_reference(result, reviewed, s)
    result.calibration = calibrate_gates(result, reviewed, guard, clf, s.unknown_level, s.target_error)
    return guard, reviewed, result


# -- writing the adapted model ---------------------------------------------------------------------------


def free_target(out_dir: str | Path, name: str, clf: CellClassifier) -> Path:
    """The model file ``name`` would be written to in ``out_dir`` (the base file's suffix: .tflite or
    .onnx), or AdaptError when a model of that name is there already (checked before any work)."""
    target = Path(out_dir) / f"{name}{clf.path.suffix}"
    if target.exists() or card_path(target).exists():
        raise AdaptError(f"{target} exists already: choose another name (an adapted model is never overwritten)")
    return target


def write_model(
    result: Result,
    reviewed: Reviewed,
    clf: CellClassifier,
    guard: dict[str, Any],
    out_dir: str | Path,
    name: str,
    s: Settings = Settings(),
) -> Path:
    """The adapted model in ``out_dir``: ``name.tflite`` (the base file, byte for byte),
    ``name.head.npz``, ``name.guard.npz`` and ``name.json``, its card. All four are written in a
    temporary folder first and moved in, the card last: a crash leaves no half-written model that
    ``bmc edge run`` would accept."""
    out_dir = Path(out_dir)
    target = free_target(out_dir, name, clf)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_card = clf.card
    base_path = clf.path
    tmp = Path(tempfile.mkdtemp(prefix=".adapt-", dir=out_dir))
    try:
        shutil.copyfile(base_path, tmp / target.name)
        dataclasses.replace(result.head, reference=result.reference(reviewed)).save(tmp / f"{name}{HEAD_SUFFIX}")
        shutil.copyfile(guard["path"], tmp / f"{name}{GUARD_SUFFIX}")
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        base_labels = list(guard["labels"])
        new = {
            l: {
                "cells": result.cells_per_class[l],
                "note": f"learnt from {result.cells_per_class[l]} cells reviewed at this laboratory",
            }
            for l in result.labels
            if l not in base_labels
        }
        card = {
            "card_schema": 1,
            "file": target.name,
            "sha256": sha256_file(tmp / target.name),
            "size_bytes": (tmp / target.name).stat().st_size,
            "name": name,
            "variant": f"{base_card.get('variant', '')}+{'lab-gates' if result.kept_shipped else 'adapted-head'}",
            "format": base_card.get("format", ""),
            "description": (
                f"{base_card.get('name', base_path.stem)} with its shipped class head and gates set at this "
                "laboratory (the adapted head was refused)"
                if result.kept_shipped
                else f"{base_card.get('name', base_path.stem)} with a class head adapted on the device "
                "to this laboratory's reviewed cells"
            ),
            "int8_only": base_card.get("int8_only", False),
            "created": now,
            "contract": {**base_card["contract"], "labels": list(result.labels)},
            "outputs": base_card.get("outputs"),
            "embedding": base_card.get("embedding"),
            "source_model": base_card.get("source_model"),
            "base_model": {
                "file": base_path.name,
                "sha256": clf.sha256,
                "card_sha256": sha256_file(card_path(base_path)),
                "validation": base_card.get("validation"),
            },
            "head": {
                "file": f"{name}{HEAD_SUFFIX}",
                "sha256": sha256_file(tmp / f"{name}{HEAD_SUFFIX}"),
                "labels": list(result.labels),
                "base_labels": base_labels,
                "new_labels": new,
            },
            "guard": {**base_card["guard"], "file": f"{name}{GUARD_SUFFIX}"},
            **({"unknown": base_card["unknown"]} if base_card.get("unknown") else {}),
            **({"calibration": result.calibration.to_dict()} if result.calibration is not None else {}),
            "adaptation": {
                "date": now,
                "sessions": reviewed.sessions,
                "cells": len(reviewed.labels),
                "cells_per_class": result.cells_per_class,
                "reference": {
                    "reviewed": int(result.named(reviewed).sum()),
                    "counted": 0 if result.grown is None else len(result.grown),
                    "note": (
                        "known ground beside the guard set: the reviewed cells the shipped head names rightly "
                        "(the adapted head was refused, and nothing counted joins it)"
                        if result.kept_shipped
                        else f"known ground beside the guard set: the reviewed cells, and the cells the sessions "
                        f"counted with no person at least {s.grow_confidence:g} sure that the adapted head names the same"
                        if s.grow_confidence > 0
                        else "known ground beside the guard set: the reviewed cells of the classes the head names "
                        "(the cells the sessions counted with no person do not join it: grow 0)"
                    ),
                },
                "reviewers": reviewed.reviewers,
                **({"head_kept": {"why": result.kept_shipped}} if result.kept_shipped else {}),
                "cross_validation": result.cross_validation,
                "guard_check": result.guard,
                "settings": dataclasses.asdict(s),
                "seconds": round(result.seconds, 2),
            },
            "validation": {
                "data": "cross-validation over the reviewed cells, grouped by field; a held-out "
                "quarter of the guard set for forgetting",
                "passed": True,
                "balanced_accuracy": result.cross_validation["shipped" if result.kept_shipped else "adapted"][
                    "balanced_accuracy"
                ],
                "shipped_balanced_accuracy": result.cross_validation["shipped"]["balanced_accuracy"],
                "guard_accuracy": result.guard["adapted_accuracy"],
            },
            "deployable": True,
        }
        (tmp / card_path(target).name).write_text(json.dumps(card, indent=2) + "\n")
        for f in (target.name, f"{name}{HEAD_SUFFIX}", f"{name}{GUARD_SUFFIX}", card_path(target).name):
            os.replace(tmp / f, out_dir / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
