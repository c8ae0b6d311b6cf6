"""Cells the model does not know: an out-of-distribution score for every cell, and the line beyond
which a cell is set aside as "unknown — review" and counted in no class.

The score is how far the cell's embedding (the model's pooled features, output 1) lies from the
nearest *reference* cell: the guard set of training cells that ships with the model and, for a
model adapted at a laboratory, the cells that laboratory reviewed (so the lab's own microscope is
known ground). It is a cosine distance: 0 for a cell that looks exactly like one the model was
trained on, larger the further away it lies. A blast, a plasma cell or a smudge lies far from every
normal blood cell the model learnt, even where its class scores are confident.

The threshold comes from the model card (``unknown``): the scores of the training run's
*validation* cells, summarised as quantiles at calibration (``bmc prepare-adapt``). A
laboratory chooses a *level* in its config (``[classify] unknown_level``): the share of the
training laboratory's validation cells that pass, 0.98 by default; 0.99 sets fewer cells aside,
0.95 more, 0 turns the check off.

Numpy only: the device imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bmc.card import ModelCard, file_beside
from bmc.errors import BmcError

DEFAULT_LEVEL = 0.98
#: the calibration grid: share of validation cells within the threshold
LEVELS = (0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999)
SCORE = "cosine distance of the cell's embedding to the nearest reference cell"
FLAG = "unknown"  # a set-aside cell's flag begins with this word


class UnknownError(BmcError, ValueError):
    """A model card whose unknown-cell calibration cannot be used; the message says why."""


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    unit: np.ndarray = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return unit


def distances(embeddings: np.ndarray, reference: np.ndarray, chunk: int = 256, unit: bool = False) -> np.ndarray:
    """Cosine distance of each embedding to its nearest row of ``reference`` (both ``(n, d)``);
    ``unit``: the reference rows are unit vectors already (the detector keeps them so)."""
    ref = reference if unit else _unit(reference)
    emb = _unit(np.atleast_2d(embeddings))
    out = np.empty(len(emb), np.float32)
    for i in range(0, len(emb), chunk):
        # einsum's own loops, not BLAS: a BLAS product this size wakes OpenBLAS's threads, which then
        # spin against the interpreter's (measured: the frame's classification 40% slower)
        out[i : i + chunk] = 1.0 - np.einsum("ij,kj->ik", emb[i : i + chunk], ref).max(axis=1)
    return out


def calibration(val_scores: np.ndarray, reference_cells: int, data: str) -> dict[str, Any]:
    """The card's ``unknown`` section from the validation cells' scores."""
    s = np.asarray(val_scores, np.float64)
    if len(s) < 50:
        raise UnknownError(f"{len(s)} validation cells are too few to calibrate the unknown-cell threshold (need 50)")
    return {
        "score": SCORE,
        "reference": "guard set" + " + reviewed cells of an adapted model",
        "reference_cells": int(reference_cells),
        "data": data,
        "n": int(len(s)),
        "levels": [[q, round(float(np.quantile(s, q)), 6)] for q in LEVELS],
        "default_level": DEFAULT_LEVEL,
    }


def threshold_at(calib: dict[str, Any], level: float) -> float | None:
    """The score beyond which a cell is unknown at ``level`` (interpolated on the card's grid);
    None when ``level`` is 0 (the check is off)."""
    if not level:
        return None
    if not 0 < level < 1:
        raise UnknownError(f"unknown_level must be 0 (off) or between 0 and 1, got {level}")
    grid = np.asarray(calib["levels"], np.float64)
    if level < grid[0, 0] or level > grid[-1, 0]:
        raise UnknownError(f"unknown_level {level} is outside the card's calibration ({grid[0, 0]}–{grid[-1, 0]})")
    return float(np.interp(level, grid[:, 0], grid[:, 1]))


class UnknownCells:
    """Scores cells and says which ones are unknown: ``scores(embeddings)``, ``flags(scores)``."""

    def __init__(self, reference: np.ndarray, calib: dict[str, Any], level: float = DEFAULT_LEVEL):
        self.reference = _unit(reference)  # unit rows
        self.calib = calib
        self.level = level
        self.threshold = threshold_at(calib, level)

    def at(self, level: float) -> "UnknownCells":
        """The same reference at another level (0: off)."""
        out = object.__new__(UnknownCells)
        out.reference, out.calib, out.level, out.threshold = (
            self.reference,
            self.calib,
            level,
            threshold_at(self.calib, level),
        )
        return out

    def with_threshold(self, threshold: float, level: float) -> "UnknownCells":
        """The same reference with a threshold set elsewhere (a laboratory's calibration,
        :mod:`bmc.edge_app.calibration`), at the level it was calibrated for."""
        out = self.at(level)
        out.threshold = float(threshold)
        return out

    @property
    def active(self) -> bool:
        return self.threshold is not None

    def scores(self, embeddings: np.ndarray | None) -> np.ndarray | None:
        if embeddings is None or len(embeddings) == 0:
            return None if embeddings is None else np.zeros(0, np.float32)
        return distances(embeddings, self.reference, unit=True)

    def flag(self, score: float | None) -> str:
        """'' for a cell within the threshold, else the flag that sets it aside."""
        if self.threshold is None or score is None or score <= self.threshold:
            return ""
        return f"{FLAG}: unlike any known cell (distance {score:.3f} > {self.threshold:.3f})"


def reference_of(model_path: str | Path, card: ModelCard) -> np.ndarray:
    """The guard set's embeddings (the shipped reference), checked against the card's sha256."""
    if card.guard is None:
        raise UnknownError(f"{model_path}: its card names no guard set (the unknown-cell reference)")
    path = file_beside(model_path, card.guard, "guard set (the unknown-cell reference)", UnknownError)
    with np.load(path) as z:
        reference: np.ndarray = z["embedding"].astype(np.float32) * float(z["scale"])
    return reference


def load(
    model_path: str | Path, card: ModelCard, level: float = DEFAULT_LEVEL, extra_reference: np.ndarray | None = None
) -> UnknownCells | None:
    """The detector a model card describes, or None where the card has no calibration (an older
    model) or no guard set. ``extra_reference``: an adapted model's reviewed cells."""
    if not card.unknown or not card.guard:
        return None
    ref = reference_of(model_path, card)
    if extra_reference is not None and len(extra_reference):
        ref = np.concatenate([ref, np.asarray(extra_reference, np.float32)])
    return UnknownCells(ref, card.unknown, level)
